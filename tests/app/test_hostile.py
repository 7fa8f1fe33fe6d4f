"""Hostile input at the handler level (issue 14): what a browser or API client
can send must end in one clear message, never an element, a crash or unbounded work."""
from __future__ import annotations

import re
from pathlib import Path

from app.escape import code_md, escape_html, escape_md

UI = Path(__file__).resolve().parents[2] / "app" / "ui.py"


def test_toasts_go_through_the_escaping_helpers():
    """Regression: `gr.Warning(f"{exc} ...")` quoted a URL parameter as live HTML.
    Every toast in app/ui.py is made by _error/_warn/_info, which escape."""
    source = UI.read_text(encoding="utf-8")
    calls = re.findall(r"gr\.(Error|Warning|Info)\((.*)", source)
    assert calls and all(arg.startswith("escape_html(") for _, arg in calls), calls


def test_escaping_leaves_no_tag_and_no_link():
    payload = '<a href="http://t.invalid/x">hi</a><img src=x> www.t.invalid me@t.invalid `code`'
    assert "<" not in escape_html(payload) and "<" not in escape_md(payload) and "<" not in code_md(payload)
    # Markdown autolinks bare URLs: no "http://", "www." or "@" survives unescaped.
    md = escape_md(payload)
    assert "http://" not in md and "www." not in md and "me@" not in md
    assert "`" not in code_md(payload)


# ---------------------------------------------------------------- routers
import json  # noqa: E402

import pytest  # noqa: E402
from tiny import rigged_router, tiny_lm_with_chars  # noqa: E402

from app import handlers as H  # noqa: E402
from polar_core.study.router import RouterConfig, save_router  # noqa: E402

PROMPT = "Q: What is the capital of France?\nA:"


@pytest.fixture
def lm():
    return tiny_lm_with_chars()


@pytest.mark.parametrize("size", [{"max_tokens": 10_000_000_000}, {"d_model": 1_048_576, "num_heads": 4},
                                  {"num_blocks": 10**12}, {"d_model": 8192, "max_tokens": 65536}])
def test_an_oversized_router_config_is_refused_before_allocating(lm, tmp_path, monkeypatch, size):
    """Regression: "max_tokens": 10000000000 or "d_model": 1048576 passed validation,
    then building the network raised a raw RuntimeError and the app exited in warm-up."""
    folder = tmp_path / "router"
    save_router(rigged_router(RouterConfig.for_model(lm)), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **size}))
    monkeypatch.setenv(H.ROUTER_ENV, str(folder))
    router, why = H.load_router_for(lm)
    assert router is None and "at most" in why
    assert H.predict(lm, PROMPT).message.startswith("No router loaded")


def test_any_failure_to_build_a_router_is_no_router_and_the_app_starts(lm, tmp_path, monkeypatch):
    from app import ui
    from polar_core.study.router import checkpoint

    folder = tmp_path / "router"
    save_router(rigged_router(RouterConfig.for_model(lm)), folder)
    monkeypatch.setenv(H.ROUTER_ENV, str(folder))

    def no_memory(config):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(checkpoint, "Router", no_memory)
    router, why = H.load_router_for(lm)
    assert router is None and "not enough memory" in why
    monkeypatch.setattr(ui, "get_model", lambda spec: lm)
    ui.warm_up()  # logs the missing router and returns: the server starts


# -------------------------------------------------------------- deadlines
import threading  # noqa: E402
import time  # noqa: E402

from app.session import InputError, Session  # noqa: E402

FREE_TEXT = "Which planet is the largest in our solar system? Answer in one word."


def test_a_search_stops_at_the_job_time_limit_with_partial_results(lm, monkeypatch):
    """Regression: a greedy search at budget 400 on a free-text prompt ran 778 s
    and could not be stopped. With $POLAR_JOB_SECONDS it stops and says so."""
    monkeypatch.setenv("POLAR_JOB_SECONDS", "0.01")
    view = H.search_programs(lm, FREE_TEXT, "Jupiter", "greedy", 400)
    assert view.message.startswith("**Partial results**") and "time limit of 0.01 s" in view.message
    scored = int(view.message.split(" after ")[1].split(" of ")[0])
    assert scored < 400


def test_a_search_stops_when_the_client_leaves(lm):
    view = H.search_programs(lm, FREE_TEXT, "Jupiter", "greedy", 400, cancelled=lambda: True)
    assert "stopped: cancelled" in view.message


def test_an_evaluation_stops_at_the_job_time_limit_with_partial_results(lm, monkeypatch):
    monkeypatch.setenv("POLAR_JOB_SECONDS", "0.01")
    table, report, fig, notes = H.evaluate_family(lm, "capitals", 20, 1)
    assert "Partial results" in notes and "time limit of 0.01 s" in notes and "stopped after" in notes
    assert len(table) < 3  # not every method ran


def test_the_prompt_pass_respects_the_request_time_limit(lm, monkeypatch):
    """Regression: with POLAR_REQUEST_SECONDS=1, /run on 0-29x4 with a 493-token
    prompt took 27.9 s, all but 0.4 s of it in the prompt pass, which never
    looked at the clock. Now it stops between steps and says why."""
    monkeypatch.setenv("POLAR_REQUEST_SECONDS", "0.000001")
    with pytest.raises(InputError, match="did not finish within the time limit"):
        H.run(lm, Session(), PROMPT * 10, "0-3x4")


def test_a_stopped_page_job_stops_its_work():
    """The search / evaluation handlers run their work in a thread: closing
    the generator (Gradio does when the client leaves or Stop is pressed)
    sets the work's cancel flag."""
    from app import ui

    ended = threading.Event()

    def work(cancelled):
        while not cancelled():
            time.sleep(0.01)
        ended.set()
        return "stopped"

    job = ui._until_done(work)
    assert next(job) is None  # still running: the page gets a chance to stop it
    job.close()
    assert ended.wait(5)


# ------------------------------------------------------------------ inputs
from app.session import MODELS_ENV, check_model_spec, get_model  # noqa: E402
from polar_core.limits import json_depth, load_json  # noqa: E402


def test_deeply_nested_upload_is_a_message_not_a_recursion_error(lm):
    """Regression: {"path": [[[...30,000 deep...]]]} raised RecursionError."""
    deep = b'{"path": ' + b"[" * 30_000 + b"]" * 30_000 + b', "num_layers": 4}'
    with pytest.raises(InputError, match="nests 30001 levels deep; at most 32"):
        H.program_from_upload(deep, lm.num_layers)


def test_a_5000_digit_layer_index_is_a_message(lm):
    """Regression: a 5,000-digit layer index raised a bare ValueError (no message)."""
    with pytest.raises(InputError, match="5000 digits"):
        H.program_from_upload('{"path": [0, ' + "9" * 5000 + '], "num_layers": 4}', lm.num_layers)
    with pytest.raises(InputError, match="too large"):  # the text form, too
        H.parse_program("0, " + "9" * 1990, lm.num_layers)


def test_json_depth_counts_brackets_outside_strings():
    assert json_depth(b'{"a": [[1], "[[[[{{"], "b": {"c": "\\"]]"}}') == 3
    assert load_json('{"a": "\\"[[["}', 100) == {"a": '"[[['}


@pytest.mark.parametrize("bad", ["\ud800 What is 2+2?", "What is\x00 2+2?"])
def test_surrogates_and_nul_are_refused_before_any_model_work(bad):
    """Regression: a lone surrogate in the prompt or expected answer made the
    tokenizer raise TypeError, for `expected` after the whole run was computed."""
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the model was used ({name}) before the text was checked")

    for prompt, expected in ((bad, "4"), ("What is 2+2?", bad)):
        with pytest.raises(InputError, match="not text"):
            H.run(Untouchable(), Session(), prompt, "full", expected)
        with pytest.raises(InputError, match="not text"):
            H.search_programs(Untouchable(), prompt, expected, "greedy", 10)


def _handlers_and_arguments():
    """Every page and API handler with arguments that work (for a tiny model named tiny-llama)."""
    from app import ui

    text = "0-3"
    grid = [[i, True, 1] for i in range(4)]
    return [
        (ui.on_model, ["tiny-llama"]),
        (ui.on_text, [text, "tiny-llama"]),
        (ui.on_grid, [grid, text, "tiny-llama"]),
        (ui.on_preset, ["skip", 1, 1, 2, 2, "tiny-llama"]),
        (ui.on_upload, [b'{"path": [0, 1], "num_layers": 4}', "tiny-llama"]),
        (ui.on_example, [ui.EXAMPLE_LABELS[0]]),
        (ui.on_predict, [PROMPT, "tiny-llama"]),
        (ui.on_pick_row, [[[1, text, 4, 0.0]], 0, "tiny-llama"]),
        (ui.on_search, [PROMPT, "Paris", "greedy", 10, "tiny-llama", False]),
        (ui.on_evaluate, ["capitals", 5, 1, "tiny-llama"]),
        (ui.on_learn, ["tiny-llama", 0]),
        (ui.api_run, [PROMPT, text, "Paris", "tiny-llama", False, None]),
    ]


def test_wrong_types_from_the_api_are_one_clear_error(lm, monkeypatch):
    """Regression: `model` sent as a list raised AttributeError. Every argument of
    every handler, sent as a list, a dict or a number, ends in a gr.Error or works."""
    import gradio as gr

    from app import ui

    monkeypatch.setenv(MODELS_ENV, "tiny-llama")
    monkeypatch.setattr(ui, "get_model", lambda spec: (check_model_spec(spec), lm)[1])
    with pytest.raises(InputError, match="must be named by text"):
        get_model(["smollm2-135m-instruct"])
    for handler, good in _handlers_and_arguments():
        for i in range(len(good)):
            for wrong in (["x"], {"a": [1]}, 3.5):
                args = [*good[:i], wrong, *good[i + 1:]]
                try:
                    out = handler(*args)
                    if hasattr(out, "__next__"):
                        list(out)
                except gr.Error:
                    pass
                except Exception as exc:  # noqa: BLE001 - the point of the test
                    raise AssertionError(f"{handler.__name__} argument {i} = {wrong!r}: {exc!r}") from exc


# ------------------------------------------------------------------- files
import os  # noqa: E402
import stat  # noqa: E402


def test_downloads_live_in_a_private_folder_bounded_in_count_and_age():
    """Regression: 200 distinct edits left 194 files, never deleted, under
    predictable names in the shared $TMPDIR/polar-explorer."""
    from app.ui import Downloads

    downloads = Downloads(max_files=5, max_age_s=100)
    paths = [Path(downloads.write(f"program-{i}.json", "{}")) for i in range(12)]
    folder = downloads.folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.name.startswith("polar-explorer-")
    kept = sorted(p.name for p in folder.iterdir())
    assert len(kept) == 5 and paths[-1].name in kept
    for p in folder.iterdir():  # an hour later, every file is stale
        os.utime(p, (0, 0))
    downloads.write("program-new.json", "{}")
    assert [p.name for p in folder.iterdir()] == ["program-new.json"]


def test_gradio_deletes_its_cached_copies(monkeypatch):
    from app.ui import build_demo

    monkeypatch.setenv("POLAR_FILE_SECONDS", "120")
    assert build_demo().delete_cache == (30, 120)


def test_gradio_copies_of_our_downloads_are_pruned(tmp_path):
    """Gradio's delete_cache tracks no copy made for a streaming event (every
    run): prune_gradio_cache deletes the aged copies named as ours, nothing else."""
    from app.ui import prune_gradio_cache

    old, new, other = tmp_path / "aaa", tmp_path / "bbb", tmp_path / "ccc"
    for folder, name in ((old, "run-1.json"), (new, "run-2.json"), (other, "someone-else.png")):
        folder.mkdir()
        (folder / name).write_text("{}")
    for path in (old / "run-1.json", other / "someone-else.png", old, other):
        os.utime(path, (0, 0))
    assert prune_gradio_cache(tmp_path, max_age_s=60) == 1
    assert not (old / "run-1.json").exists() and (new / "run-2.json").exists()
    assert (other / "someone-else.png").exists()
    os.utime(old, (0, 0))  # the emptied folder goes on a later pass, once it is old too
    prune_gradio_cache(tmp_path, max_age_s=60)
    assert not old.exists() and new.exists() and other.exists()


def test_a_prompt_pass_that_cannot_fit_is_refused_up_front(lm, monkeypatch):
    """The full program's timed prompt pass predicts the edited one's: a program
    of 4x the layer calls whose estimate passes the limit never runs."""
    from polar_core.engine import generate as engine

    session = Session()
    H.baseline_trace(lm, session, PROMPT)
    session.baseline.prefill_seconds = 1.0  # as if the full program's prompt pass took 1 s
    monkeypatch.setenv("POLAR_REQUEST_SECONDS", "3")
    ran = []
    monkeypatch.setattr(H, "generate", lambda *a, **k: ran.append(1) or engine.generate(*a, **k))
    with pytest.raises(InputError, match="would take about 4 s, more than the time limit of 3 s"):
        H.run(lm, session, PROMPT, "0-3x4")
    assert ran == []  # refused before any model work
