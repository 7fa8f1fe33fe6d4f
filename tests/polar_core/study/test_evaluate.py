"""polar_core.study.evaluate: honest tables (best-of-k never without top-1) and the
evaluation plumbing, on a tiny random model."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
from tiny import rigged_router, tiny_lm_with_chars

from polar_core.engine.generate import Stopping, generate
from polar_core.program import Program
from polar_core.study.evaluate import (
    RouterUnderTest,
    Runner,
    evaluate_items,
    fallback_row,
    fixed_program_row,
    predict_items,
    router_rows,
    tune_fallback,
)
from polar_core.study.router import RouterConfig, load_default_router, predict_programs
from polar_core.study.supervision import SupervisionSample
from polar_core.study.tables import EvalTable, HonestyError, MethodRow, check_honest, report_markdown
from polar_core.study.tasks import TaskItem, build_prompt, load_suite

D = 4


@pytest.fixture(scope="module")
def lm():
    return tiny_lm_with_chars()


@pytest.fixture(scope="module")
def items(lm):
    """Items whose answer is what the full program says for half of them, so
    the full program scores exactly 50% and a wrong program would differ."""
    questions = [f"question number {i} about {w}" for i, w in enumerate(["cats", "dogs", "trees", "rivers", "maps", "owls"])]
    texts = [t.text for t in generate(lm, questions, None, max_new_tokens=6, chat=False, stopping=Stopping(strings=("\n",)))]
    out = []
    for i, (q, text) in enumerate(zip(questions, texts)):
        answer = text.strip() if i % 2 == 0 and text.strip() else "not this"
        out.append(TaskItem(f"toy/{i}", "toy", q, answer, split="test"))
    return out


def runner_for(lm):
    return Runner(lm, prompt_fn=lambda it: it.question, batch_size=4, max_new_tokens=6, progress=False)


def row(method, **kw):
    base = dict(group="router", n=10, correct=5, total_layer_calls=30, num_layers=D)
    return MethodRow(method, **{**base, **kw})


# ---------------------------------------------------------------- the guard


def test_best_of_k_without_top1_is_refused():
    best = row("Router best-of-5 (oracle)", oracle=True, best_of_k_of="Router top-1")
    with pytest.raises(HonestyError, match="never report best-of-k without top-1"):
        EvalTable("t", (row("Full program", group="full"), best))
    with pytest.raises(HonestyError):
        EvalTable("t", (best, row("Router top-1")))  # top-1 below, not above
    with pytest.raises(HonestyError):
        EvalTable("t", (row("Router top-1", n=9), best))  # on different items
    with pytest.raises(HonestyError, match="oracle"):
        EvalTable("t", (row("Router top-1"), dataclasses.replace(best, method="Router best-of-5")))
    with pytest.raises(HonestyError, match="mark it oracle"):
        check_honest([row("Router top-1"), dataclasses.replace(best, oracle=False)])


def test_a_table_cannot_lose_its_top1_row_after_construction():
    table = EvalTable("t", (row("Router top-1"), row("Router best-of-5 (oracle)", oracle=True, best_of_k_of="Router top-1")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.rows = table.rows[1:]
    md = table.to_markdown().splitlines()
    top = next(i for i, line in enumerate(md) if "Router top-1" in line)
    assert "best-of-5 (oracle)" in md[top + 1]
    assert [p["method"] for p in table.points()] == ["Router top-1", "Router best-of-5 (oracle)"]


def test_router_rows_always_come_as_a_pair(lm, items):
    runner = runner_for(lm)
    preds = [[(Program.full(D), 0.0), (Program.drop_layers(D, [1]), -1.0)] for _ in items]
    top, best = router_rows(runner, items, preds, "R", k=2)
    check_honest([top, best])
    assert best.correct >= top.correct  # any-of-k is right at least as often as top-1
    assert top.note.startswith("deployable") and "(oracle)" in best.method


# ---------------------------------------------------------------- the evaluation


def test_rigged_router_equals_the_full_program_row(lm, items):
    """A router that always picks the full program must reproduce the full row."""
    config = RouterConfig("tiny-llama", D, 32, d_model=32, num_heads=2, max_tokens=64)
    router = rigged_router(config, "keep")
    runner = runner_for(lm)
    preds = predict_items(lm, router, runner, items, k=3)
    assert all(p[0][0] == Program.full(D) for p in preds)
    table = evaluate_items(runner, items, [RouterUnderTest("Rigged", preds)], k=3, title="rigged",
                           calibration_prompts=[it.question for it in items])
    full, top1 = table.row("Full program"), table.row("Rigged top-1")
    assert full.correct == 3 and full.n == len(items)  # the item set works as designed
    assert (top1.correct, top1.n, top1.layer_calls, top1.compute_fraction) == (
        full.correct, full.n, full.layer_calls, full.compute_fraction)
    # No layer is saved, so every static baseline is the full program too.
    statics = [r for r in table.rows if r.group == "static"]
    assert len(statics) == 3 and all(r.correct == full.correct and r.layer_calls == D for r in statics)


def test_evaluation_table_with_static_baselines_and_search_oracle(lm, items):
    runner = runner_for(lm)
    skipper = [[(Program.drop_layers(D, [1, 2]), -0.1), (Program.full(D), -2.0)] for _ in items]
    search = [SupervisionSample(it.question, it.answer, (Program.drop_layers(D, [3]),)) for it in items[:2]]
    table = evaluate_items(runner, items, [RouterUnderTest("Skipper", skipper)], k=2, title="t",
                           search_samples=search, calibration_prompts=[it.question for it in items])
    methods = [r.method for r in table.rows]
    assert methods[:3] == ["Full program", "Skipper top-1", "Skipper best-of-2 (oracle)"]
    assert {"ShortGPT @ 2", "Gromov @ 2", "Early exit @ 2"} <= set(methods)
    assert table.row("Skipper top-1").layer_calls == 2
    assert all(r.layer_calls == 2 for r in table.rows if r.group == "static")
    oracle = table.row("Search oracle (oracle)")
    assert oracle.layer_calls == (3 * 2 + D * (len(items) - 2)) / len(items)
    text = report_markdown([table], "header")
    assert text.startswith("header") and "| Skipper best-of-2 (oracle) |" in text


def test_fallback_row_spans_full_and_top1(lm, items):
    runner = runner_for(lm)
    preds = [[(Program.drop_layers(D, [1, 2]), -0.5 - i)] for i in range(len(items))]
    always = fallback_row(runner, items, preds, "R", threshold=math.inf)
    never = fallback_row(runner, items, preds, "R", threshold=-math.inf)
    full = fixed_program_row(runner, items, Program.full(D), "Full", "full")
    top, _ = router_rows(runner, items, preds, "R", k=1)
    assert (always.correct, always.layer_calls) == (full.correct, full.layer_calls)
    assert (never.correct, never.layer_calls) == (top.correct, top.layer_calls)
    half = fallback_row(runner, items, preds, "R", threshold=-2.0)  # keeps the 2 most confident
    assert half.layer_calls == (2 * 2 + D * (len(items) - 2)) / len(items)
    threshold, note = tune_fallback(runner, items, preds, max_compute=1.0)
    chosen = fallback_row(runner, items, preds, "R", threshold)
    assert chosen.correct == max(r.correct for r in (always, never, half, chosen)) and "val" in note


def test_runner_generates_each_pair_once(lm, items):
    runner = runner_for(lm)
    runner.correct(items, [Program.full(D)] * len(items))
    done = dict(runner.results)
    runner.correct(items, [Program.full(D)] * len(items))
    assert runner.results == done and len(done) == len(items)


# ---------------------------------------------------------------- the shipped router


@pytest.mark.real_model
def test_shipped_router_predicts_valid_programs_for_a_suite_prompt(real_lm):
    router = load_default_router(real_lm)
    if router is None:
        pytest.skip("no router ships for the default model yet")
    item = load_suite("capitals", "test")[0]
    top = predict_programs(real_lm, router, build_prompt(item), k=5)
    assert len(top) == 5 and len({p for p, _ in top}) == 5
    assert all(p.num_layers == real_lm.num_layers for p, _ in top)
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)


# ---------------------------------------------------------------- intervals, suggestions, held-out families


def test_wilson_interval_matches_known_values():
    from polar_core.study.tables import wilson_interval

    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775  # stays inside [0, 1] at 0/n
    lo, hi = wilson_interval(64, 64)
    assert hi == 1.0 and 0.94 < lo < 0.95
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_every_row_carries_its_interval_in_frame_markdown_and_json():
    table = EvalTable("t", (row("Full program", group="full", correct=23, n=64),))
    frame = table.frame()
    assert {"n", "correct", "accuracy", "ci_low", "ci_high", "compute_fraction"} <= set(frame.columns)
    record = table.to_dict()["rows"][0]
    assert record["ci_low"] < record["accuracy"] < record["ci_high"]
    assert "95% CI" in table.to_markdown() and "25.3%-48.2%" in table.to_markdown()  # 23 / 64
    assert {"ci_low", "ci_high"} <= set(table.points()[0])


def test_the_json_record_is_strict_json():
    """A top-1 row has no best-of-k: the record says null, not NaN (which strict JSON lacks)."""
    table = EvalTable("t", (row("Full program", group="full"), row("Router top-1"),
                            row("Router best-of-3 (oracle)", oracle=True, best_of_k_of="Router top-1")))
    records = table.to_dict()["rows"]
    assert records[1]["best_of_k_of"] is None and records[2]["best_of_k_of"] == "Router top-1"
    json.dumps(table.to_dict(), allow_nan=False)


def test_suggestions_row_and_its_static_baselines(lm, items):
    """Suggested programs get a row (never an oracle) and static baselines at their depth."""
    runner = runner_for(lm)
    suggested = [Program.drop_layers(D, [2])] * len(items)
    table = evaluate_items(runner, items, [], k=1, title="t", suggested=suggested,
                           calibration_prompts=[it.question for it in items])
    from polar_core.study.evaluate import SUGGESTIONS_LABEL

    got = table.row(SUGGESTIONS_LABEL)
    assert not got.oracle and got.layer_calls == D - 1 and "verified" in got.note
    assert {"ShortGPT @ 3", "Gromov @ 3", "Early exit @ 3"} <= {r.method for r in table.rows}


def test_input_dependence_counts_distinct_programs_per_family():
    from polar_core.study.evaluate import input_dependence

    its = [TaskItem(f"{f}/{i}", f, f"q{f}{i}", "a", split="test") for f in ("a", "b") for i in range(4)]
    progs = [Program.full(D)] * 3 + [Program.drop_layers(D, [1])] + [Program.drop_layers(D, [2])] * 4
    dep = input_dependence(its, progs)
    assert dep["distinct_top1"] == 3
    assert dep["by_family"]["a"] == {"n": 4, "distinct": 2, "differs_from_mode": 0.25}
    assert dep["by_family"]["b"]["distinct"] == 1


def test_leave_one_family_out_trains_without_each_family(lm):
    from polar_core.study.evaluate import Recipe, _Setting, leave_one_out_table
    from polar_core.study.router import Router
    from polar_core.study.tasks import sample_items

    families = ("capitals", "plurals")
    train = [SupervisionSample(it.question, it.answer, (Program.drop_layers(D, [1]),), (), 1.0)
             for f in families for it in sample_items(f, 3, "train")]
    items = [it for f in families for it in sample_items(f, 2, "test")]
    runner = Runner(lm, batch_size=4, max_new_tokens=4, progress=False)
    config = RouterConfig("tiny-llama", D, 32, d_model=32, num_heads=2, max_tokens=64)
    main = [[(Program.full(D), 0.0)] for _ in items]
    table = leave_one_out_table(_Setting(lm, runner, "test", 1, [], []), Router(config), items, main, train,
                                families, recipe=Recipe(epochs=1), progress=False)
    methods = [r.method for r in table.rows]
    assert "capitals: router trained without capitals, top-1" in methods
    assert table.row("capitals: router trained without capitals, top-1").note == "3 training samples"
    assert table.row("All families: full").n == len(items)


def test_a_gated_router_shows_its_deployable_top1_and_the_ablation_beside_it(lm, items):
    """Where the familiarity gate ran the full program, top-1 counts that, and
    the router's own pick is a separate ablation row (never the headline)."""
    from polar_core.study.router import Routed

    skip = Program.drop_layers(D, [1, 2])
    routed = [Routed([(skip, -0.1)], -3.0, 0.9 if i < 2 else 0.1, 0.5) for i in range(len(items))]
    under = RouterUnderTest.of("Gated", routed)
    assert [p[0][0] for p in under.predictions] == [skip, skip] + [Program.full(D)] * (len(items) - 2)
    table = evaluate_items(runner_for(lm), items, [under], k=1, title="t", static=False)
    top, own = table.row("Gated top-1"), table.row("Gated top-1 without the familiarity gate")
    assert "4 of 6 prompts unfamiliar, the full program instead of the router's own pick on 4" in top.note
    assert own.note.startswith("ablation") and own.group == "router-ablation"
    assert "**Gated top-1 without" not in table.to_markdown()  # an ablation is never shown as a headline
    assert top.layer_calls == (2 * 2 + D * 4) / len(items) and own.layer_calls == 2
    part = under.subset([0, 5])
    assert part.ungated == [under.ungated[0], under.ungated[5]] and part.unfamiliar == [False, True]
    assert RouterUnderTest.of("Plain", routed[:2]).ungated is None  # nothing gated: no ablation row
    # An unfamiliar prompt where the router itself picked the full program is counted, not changed.
    same = [Routed([(Program.full(D), -0.1)], -0.1, 0.1, 0.5)]
    assert RouterUnderTest.of("Same", same).gate_note().startswith("familiarity gate: 1 of 1 prompts unfamiliar")
