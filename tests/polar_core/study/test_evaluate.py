"""polar_core.study.evaluate: honest tables (best-of-k never without top-1) and the
evaluation plumbing, on a tiny random model."""
from __future__ import annotations

import dataclasses
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
