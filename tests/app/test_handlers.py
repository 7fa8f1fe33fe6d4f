"""Handlers without a browser: input checks, the three synced program views,
presets, URL state, JSON upload/download, and runs on the real model."""
from __future__ import annotations

import json
import math

import pytest
from tiny import build_tiny

from app import handlers as H
from app.session import InputError, Session, check_model_spec
from polar_core.engine.drafts import MAX_PROPOSAL, DraftStats
from polar_core.program import Program

D = 30


# ---------------------------------------------------------------- inputs
@pytest.mark.parametrize("prompt, message", [("", "Type a prompt"), ("   \n", "Type a prompt"), (None, "Type a prompt"),
                                             ("x" * (H.MAX_PROMPT_CHARS + 1), "limit")])
def test_bad_prompt(prompt, message):
    with pytest.raises(InputError, match=message):
        H.check_prompt(prompt)


@pytest.mark.parametrize("expected, message", [("a\nb", "one line"), ("x" * 300, "limit"), (3, "text")])
def test_bad_expected(expected, message):
    with pytest.raises(InputError, match=message):
        H.check_expected(expected)


@pytest.mark.parametrize("text, message", [
    ("0-30", "out of range"), ("", "empty"), ("5-2", "backwards"), ("0-29x99", "limit"),
    ("zero", "cannot read"), ("0,,1", "empty item"), ("1" * 3000, "limit"), (None, "must be text"),
])
def test_bad_program_text_gives_one_message(text, message):
    with pytest.raises(InputError, match=message):
        H.parse_program(text, D)


# ------------------------------------------------------------------ grid
def test_grid_round_trip_of_a_per_layer_program():
    program = Program((0, 1, 1, 1, 2, 4), 5)
    rows, note = H.grid_rows(program)
    assert rows == [[0, True, 1], [1, True, 3], [2, True, 1], [3, False, 1], [4, True, 1]]
    assert "Untick" in note
    assert H.program_from_grid(rows, 5) == program


def test_grid_reads_browser_values():
    """Cells arrive as strings or floats from the page; 'false'/'true' and 2.0 must read right."""
    rows = [[0, "true", "1"], [1, "false", 1.0], [2, True, 2.0]]
    assert H.program_from_grid(rows, 3).path == (0, 2, 2)


@pytest.mark.parametrize("path", [(0, 1, 2, 1, 2, 3), (3, 2, 1, 0)])
def test_grid_says_when_it_cannot_express_a_program(path):
    rows, note = H.grid_rows(Program(path, 4))
    assert "cannot express" in note
    assert [r[2] for r in rows] == [Program(path, 4).layer_counts()[i] or 1 for i in range(4)]


@pytest.mark.parametrize("rows, message", [
    ([[0, False, 1], [1, False, 1]], "Every layer is skipped"),
    ([[0, True, 9], [1, True, 1]], "whole number 1–4"),
    ([[0, True, "two"], [1, True, 1]], "whole number"),
    ([[0, True, 1]], "has 1 rows"),
    ([[0, True], [1, True, 1]], "incomplete"),
    ("nonsense", "not a table"),
])
def test_bad_grid(rows, message):
    with pytest.raises(InputError, match=message):
        H.program_from_grid(rows, 2)


def test_editor_view_keeps_three_views_in_sync():
    program = Program.parse("0-11, 12-15x2, 16-29", D)
    view = H.editor_view(program)
    assert Program.parse(view.text, D) == program
    assert [r[2] for r in view.rows[12:16]] == [2, 2, 2, 2]
    keep, repeat = (t for t in view.roll.data if t.type == "heatmap" and t.name in ("keep", "repeat / loop"))
    assert sum(v == v for row in repeat.z for v in row if v is not None) == 4  # four looped steps


# --------------------------------------------------------------- presets
def test_presets_on_a_tiny_model():
    lm = build_tiny("llama")  # 4 layers
    assert H.preset_program(lm, "full").is_full
    assert H.preset_program(lm, "early_exit", n=2).path == (0, 1)
    assert H.preset_program(lm, "skip", a=1, b=2).path == (0, 3)
    assert H.preset_program(lm, "loop", a=1, b=2, r=3).path == (0, 1, 2, 1, 2, 1, 2, 3)


@pytest.mark.parametrize("preset, kwargs, message", [
    ("nope", {}, "Unknown preset"), ("early_exit", {"n": 0}, "from 1 to 4"), ("early_exit", {"n": 2.5}, "whole"),
    ("skip", {"a": 3, "b": 1}, "backwards"), ("skip", {"a": 0, "b": 3}, "nothing to run"),
    ("loop", {"a": 0, "b": 1, "r": 9}, "from 1 to 4"), ("loop", {"a": "x", "b": 1}, "whole"),
    ("shortgpt", {"n": 2}, "redundancy"),  # nothing measured for a random tiny model
])
def test_bad_preset_numbers(preset, kwargs, message):
    with pytest.raises(InputError, match=message):
        H.preset_program(build_tiny("llama"), preset, **kwargs)


# ------------------------------------------------------------- URL state
def test_url_state_round_trip():
    state = {"prompt": "Q: What is 2 + 2?\nA:", "program": "0-11, 12-15x2, 16-29", "expected": "4 & «vier»",
             "model": "smollm2-135m-instruct"}
    query = H.encode_url_state(**state)
    assert query.startswith("?") and "\n" not in query and " " not in query
    assert H.decode_url_state(query) == state
    assert H.encode_url_state() == ""


def test_url_state_ignores_unknown_keys_and_cuts_long_values():
    got = H.decode_url_state({"prompt": "p" * 10_000, "evil": "x", "program": ""})
    assert set(got) == {"prompt"} and len(got["prompt"]) == H.MAX_PROMPT_CHARS


# ------------------------------------------------------------ JSON files
def test_program_json_round_trip():
    text = H.program_json("0-11, 12-15x2, 16-29", D, model="m", prompt="p")
    assert json.loads(text)["num_layers"] == D
    assert H.program_from_upload(text.encode(), D) == Program.parse("0-11, 12-15x2, 16-29", D)


@pytest.mark.parametrize("data, message", [
    (b"x" * (H.MAX_UPLOAD_BYTES + 1), "at most 64 KB"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "one JSON object"),
    (json.dumps({"path": [0, 1], "num_layers": D, "cmd": "rm"}).encode(), "Unknown keys"),
    (json.dumps({"path": [0, 99], "num_layers": D}).encode(), "out of range"),
    (json.dumps({"path": [0, 1], "num_layers": 12}).encode(), "12 layers"),
    (json.dumps({"path": "0-3", "num_layers": D}).encode(), "must be a list"),
    (None, "json file"),
])
def test_bad_uploads(data, message):
    with pytest.raises(InputError, match=message):
        H.program_from_upload(data, D)


def test_limits_from_the_environment_apply_to_the_page(monkeypatch):
    """An operator's POLAR_* limits bind the page's program text and uploads."""
    monkeypatch.setenv("POLAR_MAX_UPLOAD_BYTES", "64")
    monkeypatch.setenv("POLAR_MAX_STEPS_PER_LAYER", "1")
    with pytest.raises(InputError, match="the limit is 30"):
        H.parse_program("0-29, 29", D)
    assert H.parse_program("0-29", D).layer_calls == 30
    with pytest.raises(InputError, match="at most 0 KB"):
        H.program_from_upload(json.dumps({"path": list(range(D)), "num_layers": D}).encode(), D)
    monkeypatch.setenv("POLAR_MAX_UPLOAD_BYTES", "4096")
    with pytest.raises(InputError, match="31 steps; the limit is 30"):
        H.program_from_upload(json.dumps({"path": list(range(D)) + [0], "num_layers": D}).encode(), D)


# ---------------------------------------------------------------- models
def test_model_allow_list(monkeypatch):
    monkeypatch.delenv("POLAR_MODELS", raising=False)
    monkeypatch.delenv("POLAR_ALLOW_ANY_MODEL", raising=False)
    assert check_model_spec(None) == "smollm2-135m-instruct"
    with pytest.raises(InputError, match="not offered"):
        check_model_spec("Qwen/Qwen2.5-3B-Instruct")
    monkeypatch.setenv("POLAR_MODELS", "a/b, smollm2-135m-instruct")
    assert check_model_spec("") == "a/b"
    monkeypatch.setenv("POLAR_ALLOW_ANY_MODEL", "1")
    assert check_model_spec("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"
    for path in ("/etc/passwd", "../x/y", "~/model", "a/b/c"):
        with pytest.raises(InputError, match="hub id"):
            check_model_spec(path)


def test_search_checks_its_inputs_before_running():
    lm = build_tiny("llama")
    with pytest.raises(InputError, match="expected answer"):
        H.search_programs(lm, "Q: x?\nA:", "", "greedy", 10)
    with pytest.raises(InputError, match="Unknown search method"):
        H.search_programs(lm, "Q: x?\nA:", "4", "beam", 10)
    with pytest.raises(InputError, match="limit"):
        H.search_programs(lm, "Q: x?\nA:", "4", "greedy", 10**5)


# ------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def capital():
    from polar_core.study import tasks

    item = tasks.get_item("capitals/russia")
    return tasks.build_prompt(item), item.answer


@pytest.mark.real_model
def test_run_full_then_edited(real_lm, capital):
    prompt, answer = capital
    session = Session()
    full = H.run(real_lm, session, prompt, "full", answer)
    assert full.edited.correct and full.same_answer and full.edited.steps == 30
    baseline = session.baseline
    edited = H.run(real_lm, session, prompt, "0-19", answer)
    assert session.baseline is baseline  # the full program was not rerun for the edit
    assert edited.edited.steps == 20 and not edited.same_answer
    assert edited.full.text == full.full.text and edited.edited.correct is False
    assert any(label == "changed" for _, label in edited.edited.spans)
    assert "\n" not in "".join(t for t, _ in edited.full.spans)  # cut at the stop token
    assert set(edited.figures) >= {"similarity", "logit_lens", "answer_probability", "alignment", "block_influence"}
    assert len(edited.figures["similarity"].data[0].x) == 21  # emb + 20 steps
    assert "33% compute saved" in edited.summary


@pytest.mark.real_model
def test_the_previous_edit_answer_is_a_draft_for_the_next(real_lm):
    """Rerunning an edit (or a close one) decodes its answer from the previous
    edit's, 1 + MAX_PROPOSAL tokens a pass, and the answer is the one plain decoding gives."""
    prompt, session = "Write a short story about a cat who learns to swim.", Session()
    H.run(real_lm, session, prompt, "full")
    first = H.run(real_lm, session, prompt, "0-9, 11-29")
    assert session.last_edit_tokens == first.trace.token_ids
    again = H.run(real_lm, session, prompt, "0-9, 11-29")
    n = len(again.trace.token_ids)
    assert again.trace.token_ids == first.trace.token_ids and n > 8
    # The first token comes from the prompt pass; each pass keeps its proposal and adds its own next choice.
    passes = math.ceil((n - 1) / (MAX_PROPOSAL + 1))
    assert again.trace.drafts == DraftStats(decode_passes=passes, draft_tokens_kept=n - 1 - passes)
    H.run(real_lm, session, "Name three colours.", "full")  # a new prompt forgets the old edit
    assert session.last_edit_tokens == []


@pytest.mark.real_model
def test_a_superseded_run_stops_and_leaves_no_baseline(real_lm, capital):
    session = Session()
    with pytest.raises(H.Superseded):
        H.run(real_lm, session, capital[0], "0-19", capital[1], should_stop=lambda: True)
    assert session.baseline is None  # a cut-short full answer must not be reused
    H.run(real_lm, session, capital[0], "full", capital[1])
    baseline = session.baseline
    with pytest.raises(H.Superseded):  # the edit itself is cut short; the baseline stays
        H.run(real_lm, session, capital[0], "0-19", capital[1], should_stop=lambda: True)
    assert session.baseline is baseline


PAGE_PROMPT = "Write a short story about a cat who learns to swim."  # runs to the 32-token cap
SKIP = {"__type__": "update"}


def _page_run(page, program="0-19", claim=True):
    from app import ui

    return list(ui.page_run(True, PAGE_PROMPT, program, "", False, None, Session(), page, claim=claim))


def _run_in_thread(ready_after, fn):
    """fn() in a thread that is under way once `ready_after` is called (a spy on it); returns (thread, result)."""
    import threading

    from app import ui

    result, started = {}, threading.Event()
    original = getattr(ui.RUN_TICKETS, ready_after)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        started.set()
        return out

    setattr(ui.RUN_TICKETS, ready_after, spy)  # an instance attribute over the method, removed below
    try:
        thread = threading.Thread(target=lambda: result.setdefault("out", fn()))
        thread.start()
        assert started.wait(60)
    finally:
        vars(ui.RUN_TICKETS).pop(ready_after)
    return thread, result


@pytest.mark.real_model
def test_a_newer_run_of_the_same_page_stops_the_older_one(real_lm):
    """Two runs of one page at once: the older stops at its next token and draws nothing."""
    from types import SimpleNamespace

    page, other = SimpleNamespace(session_hash="page-1"), SimpleNamespace(session_hash="page-2")
    thread, older = _run_in_thread("start", lambda: _page_run(page))
    newer, unrelated = _page_run(page)[-1], _page_run(other)[-1]
    thread.join(120)
    assert all(out == SKIP for out in older["out"][-1])  # gr.skip(): nothing stale is drawn
    assert newer[-2]["edited_answer"] and newer[-2]["edited_answer"] == unrelated[-2]["edited_answer"]


@pytest.mark.real_model
def test_an_edit_stops_the_run_in_progress_and_a_late_run_of_an_old_program_draws_nothing(real_lm):
    """Regression: with auto-run on, the answer of an older edit stayed on the page
    while the editor held the newer program."""
    from types import SimpleNamespace

    from app import ui

    page = SimpleNamespace(session_hash="page-3")
    thread, running = _run_in_thread("start", lambda: _page_run(page, "0-19"))
    ui.RUN_TICKETS.edited("page-3", "0-9, 11-29")  # the editor moved on (an edit with auto-run on)
    thread.join(120)
    assert all(out == SKIP for out in running["out"][-1])
    late = _page_run(page, "0-19", claim=False)  # the old program's auto-run, arriving after the edit
    assert all(out == SKIP for out in late[-1]) and len(late) == 1  # no ticket taken, no "running" said
    final = _page_run(page, "0-9, 11-29", claim=False)
    assert final[0][2].startswith("Edited program `0-9, 11-29` · running")  # says at once what it runs
    assert final[-1][-2]["stamp"]["program"] == "0-9, 11-29"


@pytest.mark.real_model
def test_a_run_streams_its_answers_then_everything(real_lm):
    from app import ui

    outputs = list(ui.api_run(PAGE_PROMPT, "0-9, 11-29", "", None, False, Session()))
    partial, final = outputs[:-1], outputs[-1]
    assert len(partial) >= 2  # 2 x 32 tokens take seconds: several updates at <= 1 per STREAM_SECONDS
    assert all(out[4:] == (SKIP,) * (len(out) - 4) for out in partial)  # summary, plots: untouched
    assert partial[0][0] == "Full program · generating…"  # the full answer comes first (a new prompt)
    edited_texts = [out[3][0][0] for out in partial if out[2] != SKIP]
    details = final[-2]
    assert edited_texts and details["edited_answer"].startswith(edited_texts[0].rstrip("…"))
    assert final[6] is not SKIP and "layer calls" in final[4]
    assert details["stamp"] == {"prompt": PAGE_PROMPT, "program": "0-9, 11-29", "model": real_lm.name,
                                "expected": "", "rule": "contains"}


def test_closing_a_streaming_run_stops_the_model(real_lm):
    """Gradio closes a streaming handler whose client left: the run must stop at its next token."""
    import threading

    from app import handlers, ui

    stopped = threading.Event()
    original = handlers.run

    def watched_run(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except handlers.Superseded:
            stopped.set()
            raise

    handlers.run = watched_run
    try:
        run = ui.api_run(PAGE_PROMPT, "0-19", "", None, False, Session())
        next(run)  # the first partial answer: generation is under way
        run.close()
        assert stopped.wait(10)  # long before the two 32-token answers would have finished
    finally:
        handlers.run = original


def test_run_tickets_stop_older_runs_and_runs_of_programs_the_editor_left():
    from app.session import RunTickets

    tickets = RunTickets(capacity=2)
    first, other = tickets.start("a", "0-29"), tickets.start("b", "0-29")
    assert not first() and not other()
    second = tickets.start("a", "0-19", claim=True)  # Run with a program typed without Enter
    assert first() and not second() and not other()
    tickets.edited("a", "0-9")
    assert second()  # an edit stops the run in progress
    assert tickets.start("a", "0-19") is None  # an auto-run of a program the editor no longer holds
    third = tickets.start("a", "0-9")
    assert not third()
    tickets.edited("c", "0-29")
    tickets.edited("d", "0-29")  # over capacity: "a" and "b" are forgotten, so their runs stop
    assert third() and other()


@pytest.mark.real_model
def test_predict_without_router_says_so(real_lm, capital):
    pred = H.predict(real_lm, capital[0])
    assert [r[0] for r in pred.rows] == list(range(1, len(pred.rows) + 1))
    if H.ROUTER_SOURCE not in pred.sources:
        assert "No router loaded" in pred.message


def test_predict_shows_router_rows_then_verified_suggestions(monkeypatch, tmp_path):
    """The router's ranking first, then suggestions marked as such; each
    suggestion decodes to the full program's answer."""
    from tiny import rigged_router, tiny_lm_with_chars

    from polar_core.study.router import RouterConfig, save_router

    lm = tiny_lm_with_chars()
    save_router(rigged_router(RouterConfig.for_model(lm), "keep"), tmp_path / "router")
    monkeypatch.setenv(H.ROUTER_ENV, str(tmp_path / "router"))
    pred = H.predict(lm, "Q: one\nA: two\n\nQ: three\nA:", k=2)
    n_router = pred.sources.count(H.ROUTER_SOURCE)
    assert n_router == 2 and pred.sources[:2] == [H.ROUTER_SOURCE] * 2
    assert all(src == H.SUGGESTED_SOURCE for src in pred.sources[2:])
    assert [row[4] for row in pred.rows] == pred.sources and len(pred.rows[0]) == len(H.PREDICT_COLUMNS)


def test_predict_says_when_the_prompt_is_unfamiliar_and_runs_the_full_program(monkeypatch, tmp_path):
    """A prompt unlike every training prompt: top-1 is the full program, marked
    as the gate's choice, with the similarity and threshold in the message."""
    from tiny import tiny_lm_with_chars

    from polar_core.study.router import RouterConfig, save_router, train_router
    from polar_core.study.supervision import SupervisionSample

    lm = tiny_lm_with_chars()
    skip = H.Program.drop_layers(lm.num_layers, [1])
    samples = [SupervisionSample(q, "x", (skip,)) for i in range(6) for q in (f"alpha alpha {i}", f"zzz beta {i} zzz")]
    config = RouterConfig.for_model(lm, d_model=32, num_heads=2, max_tokens=64)
    router = train_router(lm, samples, config, epochs=2, progress=False, familiar_quantile=0.0)
    save_router(router, tmp_path / "router")
    monkeypatch.setenv(H.ROUTER_ENV, str(tmp_path / "router"))
    known = H.predict(lm, "alpha alpha 3", k=2, suggestions=0)
    assert known.sources == [H.ROUTER_SOURCE] * 2 and "unlike" not in known.message
    strange = H.predict(lm, "QQQQ ???? !!!!", k=2, suggestions=0)
    assert strange.sources == [H.GATED_SOURCE, H.ROUTER_SOURCE] and strange.programs[0].is_full
    assert "unlike the prompts the router was trained on" in strange.message
    assert f"{router.config.familiar_threshold:.3f}" in strange.message


def test_evaluate_checks_its_inputs():
    with pytest.raises(InputError, match="Unknown task family"):
        H.evaluate_family(build_tiny("llama"), "poetry", 5, 1)
    with pytest.raises(InputError, match="Items"):
        H.evaluate_family(build_tiny("llama"), "capitals", 0, 1)


@pytest.mark.parametrize("model, depth", [("smollm2-135m-instruct", D), ("gemma3-270m", 18)])
def test_learn_examples_match_their_measured_facts(model, depth):
    """The tour's text is backed by facts measured on each model (app/curate_examples.py)."""
    examples = {ex["kind"]: ex for ex in H.learn_examples(model)}
    assert set(examples) == {"skip", "break", "fix", "emerge"}
    for ex in examples.values():
        H.check_prompt(ex["prompt"])
        H.parse_program(ex["program"], depth)
    skip = examples["skip"]
    assert list(Program.parse(skip["program"], depth).skipped_layers()) == skip["facts"]["skipped"]
    assert skip["facts"]["answer"] in skip["explanation"]
    assert examples["fix"]["facts"]["full_answer"] != examples["fix"]["facts"]["fixed_answer"]


@pytest.mark.real_model
def test_evaluate_a_family(real_lm):
    table, report, fig, notes = H.evaluate_family(real_lm, "capitals", 5, 6)
    assert table.iloc[0]["method"] == "Full program" and len(table) >= 2
    assert "| Method" in report and "Static" in notes  # the notes show on the page, not only in the report
    assert len([t for t in fig.data if t.mode in ("markers", "markers+text")]) == len(table)
    static = table[table["method"].str.contains("@")]
    # Guards baselines that ran "@ 30" as the full program when the router keeps every layer.
    assert len(static) == 3 and all(float(x) < real_lm.num_layers for x in static["layer calls/token"])


@pytest.mark.real_model
def test_redundancy_presets_use_the_shipped_measurement(real_lm):
    shortgpt = H.preset_program(real_lm, "shortgpt", n=3)
    gromov = H.preset_program(real_lm, "gromov", n=4)
    assert shortgpt.layer_calls == 27 and len(shortgpt.skipped_layers()) == 3
    skipped = gromov.skipped_layers()
    assert len(skipped) == 4 and skipped == tuple(range(skipped[0], skipped[0] + 4))  # one block


# ------------------------------------------------ what the page shows, and its data
@pytest.mark.real_model
def test_a_free_text_answer_that_contains_the_expected_one_is_right(real_lm):
    """Regression: "The capital of France is Paris." was ✗ against "Paris" for every program."""
    view = H.run(real_lm, Session(), "What is the capital of France?", "full", "Paris")
    assert "Paris" in view.full.text and view.full.correct is True
    assert view.rule_text == "contains “Paris”" and view.stamp.rule == "contains"
    assert H.answer_heading("Full program", view.full, view.rule_text).endswith("✓ right — contains “Paris”")
    exact = H.run(real_lm, Session(), "What is the capital of France?", "full", "Paris", exact=True)
    assert exact.full.correct is False and exact.rule_text == "is “Paris” (exact)"


@pytest.mark.real_model
def test_answers_are_decoded_whole(real_lm):
    """Regression: answers decoded token by token showed an emoji as '�����'."""
    view = H.run(real_lm, Session(), "Repeat exactly: 🎉🐱🚀", "full")
    assert "🎉🐱🚀" in view.full.text
    assert "\ufffd" not in "".join(text for text, _ in view.full.spans)


@pytest.mark.real_model
def test_the_lens_of_the_full_program_shows_a_token_on_every_step(real_lm, capital):
    """Regression: over 24 steps the lens drew no token text; the full program has 30."""
    lens = H.run(real_lm, Session(), capital[0], "full", capital[1]).figures["logit_lens"]
    (cells,) = lens.data
    assert cells.texttemplate == "%{text}" and len(cells.text) == 30
    assert all(row[0] for row in cells.text) and len(lens.layout.yaxis.ticktext) == 30
    assert any(shape.line.color == "#D62728" for shape in lens.layout.shapes)  # the answer token outlined


@pytest.mark.real_model
def test_a_run_record_holds_the_data_behind_every_chart(real_lm, capital):
    view = H.run(real_lm, Session(), capital[0], "0-2, 4-24, 27-29", capital[1])
    table = H.step_table(view.analysis)
    assert len(table) == 27 and list(table["layer"][:4]) == [0, 1, 2, 4]
    for column in ("block_influence", "cos_to_full_same_layer", "top1_token", "top5_prob", "answer_token_prob",
                   "expected_token_rank", "similarity_to_emb", "similarity_to_s27·L29"):
        assert column in table.columns, column
    record = H.run_record(view)
    text = json.dumps(record, allow_nan=False)  # strict JSON: no NaN
    assert record["stamp"]["program"] == "0-2, 4-24, 27-29" and record["edited_layers"] == 27
    assert len(record["data"]["similarity"]["matrix"]) == 28 and len(record["data"]["steps"]) == 27
    assert len(record["data"]["full_program"]["answer_token_prob"]) == 30
    assert len(text) < 200_000


def test_preset_fields_show_only_when_the_preset_uses_them():
    from app import ui

    visible = lambda preset: [u["visible"] for u in ui.on_preset_choice(preset)]  # noqa: E731 (n, a, b, r)
    assert visible("full") == [False, False, False, False]
    assert visible("shortgpt") == [True, False, False, False]
    assert visible("skip") == [False, True, True, False]
    assert visible("loop") == [False, True, True, True]
    assert ui.on_preset_choice("early_exit")[0]["label"].startswith("k")


@pytest.mark.real_model
def test_row_picks_take_a_row_index(real_lm):
    import gradio as gr

    from app import ui

    table = {"headers": ["rank", "program"], "data": [[1, "0-29"], [2, "0-19"]]}
    text, *_ = ui.on_pick_row(table, 1, None)
    assert text == "0-19"
    for row in (2, -1, "x"):
        with pytest.raises(gr.Error, match="row"):
            ui.on_pick_row(table, row, None)


@pytest.mark.real_model
def test_a_bad_grid_cell_is_reset_with_a_warning_not_an_error(real_lm):
    """Regression: times=9 left 9 in the cell and an error badge on the page."""
    from app import ui

    rows = [[i, True, 9 if i == 5 else 1] for i in range(D)]
    with pytest.warns(UserWarning, match="whole number 1–4"):
        text, grid, *_ = ui.on_grid_page(rows, "0-19", None)
    assert text == "0-19" and [r[2] for r in grid] == [1] * D and [r[1] for r in grid].count(True) == 20
    text, grid, *_ = ui.on_grid_page([[i, i != 3, 1] for i in range(D)], "0-29", None)
    assert text == "0-2, 4-29" and grid == {"__type__": "update"}  # a valid grid is left as the user left it


def test_the_same_lesson_compares_the_two_models():
    """Both models' skip lessons ask the same question, so their redundancy compares directly."""
    smol, gemma = ({ex["kind"]: ex for ex in H.learn_examples(m)}["skip"] for m in H.lesson_models())
    assert H.lesson_models()[0] == "smollm2-135m-instruct"
    assert smol["facts"]["item"] == gemma["facts"]["item"]
    assert smol["facts"]["skipped"] != gemma["facts"]["skipped"]


@pytest.mark.real_model
def test_the_status_line_of_a_base_model_says_how_it_is_prompted_and_carries_its_notice(real_gemma):
    line = H.model_status(real_gemma)
    assert "gemma3_text" in line and "Question: …⏎Answer:" in line and "Gemma Terms of Use" in line


@pytest.mark.real_model
def test_the_status_line_says_how_the_cpu_decodes(real_lm):
    import dataclasses

    from polar_core.engine.cpu.lean import LeanDecoding

    if real_lm.lean is None or not real_lm.lean.ready:
        pytest.skip(f"no lean step on this load: {real_lm.lean}")
    line = H.model_status(real_lm)
    assert f"decoding on the GGUF codes with the lean C step ({real_lm.lean.vectors})" in line
    off = dataclasses.replace(real_lm, lean=LeanDecoding("lean step off (POLAR_LEAN=0)", switched_off=True))
    assert "lean C step off (POLAR_LEAN=0)" in H.model_status(off) and "with the lean" not in H.model_status(off)
