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
    assert rows == [[0, True, 1, "keep"], [1, True, 3, "loop ×3"], [2, True, 1, "keep"],
                    [3, False, 1, "skip"], [4, True, 1, "keep"]]
    assert "Untick" in note
    assert H.program_from_grid(rows, 5) == program


def test_grid_reads_browser_values():
    """Cells arrive as strings or floats from the page; 'false'/'true' and 2.0 must read right."""
    rows = [[0, "true", "1", "keep"], [1, "false", 1.0, "keep"], [2, True, 2.0, "keep"]]
    assert H.program_from_grid(rows, 3).path == (0, 2, 2)


@pytest.mark.parametrize("path", [(0, 1, 2, 1, 2, 3), (3, 2, 1, 0)])
def test_grid_says_when_it_cannot_express_a_program(path):
    rows, note = H.grid_rows(Program(path, 4))
    assert "cannot express" in note
    assert [r[2] for r in rows] == [Program(path, 4).layer_counts()[i] or 1 for i in range(4)]


@pytest.mark.parametrize("rows, message", [
    ([[0, False, 1, ""], [1, False, 1, ""]], "Every layer is skipped"),
    ([[0, True, 9, ""], [1, True, 1, ""]], "whole number 1–4"),
    ([[0, True, "two", ""], [1, True, 1, ""]], "whole number"),
    ([[0, True, 1, ""]], "has 1 rows"),
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


@pytest.mark.real_model
def test_a_newer_run_of_the_same_page_stops_the_older_one(real_lm):
    """Two runs of one browser session at once (an edit while a run is going):
    the older stops at its next token and its outputs are skipped."""
    import threading
    from types import SimpleNamespace

    from app import ui

    page, other = SimpleNamespace(session_hash="page-1"), SimpleNamespace(session_hash="page-2")
    prompt = "Write a short story about a cat who learns to swim."  # runs to the 32-token cap
    older: dict = {}
    started = threading.Event()
    issue = ui.RUN_TICKETS.issue  # the bound method

    def issue_and_signal(key):
        should_stop = issue(key)
        started.set()
        return should_stop

    def run_older():
        older["out"] = list(ui.on_run(prompt, "0-19", "", None, Session(), page))[-1]

    ui.RUN_TICKETS.issue = issue_and_signal  # an instance attribute over the method, popped below
    try:
        thread = threading.Thread(target=run_older)
        thread.start()
        started.wait(30)
        vars(ui.RUN_TICKETS).pop("issue")
        newer = list(ui.on_run(prompt, "0-19", "", None, Session(), page))[-1]
        unrelated = list(ui.on_run(prompt, "0-19", "", None, Session(), other))[-1]
        thread.join(120)
    finally:
        vars(ui.RUN_TICKETS).pop("issue", None)
    assert all(out == {"__type__": "update"} for out in older["out"])  # gr.skip(): nothing stale is drawn
    assert newer[-2]["edited_answer"] and newer[-2]["edited_answer"] == unrelated[-2]["edited_answer"]


@pytest.mark.real_model
def test_a_run_streams_its_answers_then_everything(real_lm):
    from app import ui

    prompt = "Write a short story about a cat who learns to swim."
    outputs = list(ui.on_run(prompt, "0-9, 11-29", "", None, Session()))
    partial, final = outputs[:-1], outputs[-1]
    assert len(partial) >= 2  # 2 x 32 tokens take seconds: several updates at <= 1 per STREAM_SECONDS
    skip = {"__type__": "update"}
    assert all(out[4:] == (skip,) * (ui.RUN_OUTPUTS - 4) for out in partial)  # summary, plots: untouched
    assert partial[0][0] == "Full program · generating…"  # the full answer comes first (a new prompt)
    edited_texts = [out[3][0][0] for out in partial if out[2] != skip]
    details = final[-2]
    assert edited_texts and details["edited_answer"].startswith(edited_texts[0].rstrip("…"))
    assert final[5] is not skip and "layer calls" in final[4]


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
        run = ui.on_run("Write a short story about a cat who learns to swim.", "0-19", "", None, Session())
        next(run)  # the first partial answer: generation is under way
        run.close()
        assert stopped.wait(10)  # long before the two 32-token answers would have finished
    finally:
        handlers.run = original


def test_run_tickets_stop_only_older_runs_of_the_same_session():
    from app.session import RunTickets

    tickets = RunTickets(capacity=2)
    first, other = tickets.issue("a"), tickets.issue("b")
    assert not first() and not other()
    second = tickets.issue("a")
    assert first() and not second() and not other()
    tickets.issue("c")
    tickets.issue("d")  # over capacity: "a" and "b" are forgotten, so their runs stop
    assert second() and other()


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


def test_evaluate_checks_its_inputs():
    with pytest.raises(InputError, match="Unknown task family"):
        H.evaluate_family(build_tiny("llama"), "poetry", 5, 1)
    with pytest.raises(InputError, match="Items"):
        H.evaluate_family(build_tiny("llama"), "capitals", 0, 1)


def test_learn_examples_match_their_measured_facts():
    """The tour's text is backed by facts measured on the default model (app/curate_examples.py)."""
    examples = {ex["kind"]: ex for ex in H.learn_examples()}
    assert set(examples) == {"skip", "break", "fix", "emerge"}
    for ex in examples.values():
        H.check_prompt(ex["prompt"])
        H.parse_program(ex["program"], D)
    skip = examples["skip"]
    assert list(Program.parse(skip["program"], D).skipped_layers()) == skip["facts"]["skipped"]
    assert skip["facts"]["answer"] in skip["explanation"]
    assert examples["fix"]["facts"]["full_answer"] != examples["fix"]["facts"]["fixed_answer"]


@pytest.mark.real_model
def test_evaluate_a_family(real_lm):
    table, report, fig = H.evaluate_family(real_lm, "capitals", 5, 6)
    assert table.iloc[0]["method"] == "Full program" and len(table) >= 2
    assert "| Method" in report
    assert len([t for t in fig.data if t.mode == "markers+text"]) == len(table)
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
