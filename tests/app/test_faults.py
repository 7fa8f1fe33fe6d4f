"""Faults the app must survive: a broken or mismatched router checkpoint, a
model that fails to load, a request cancelled mid-generation.

Handler-level where the fault allows it (fast, tiny models); through the
running server (`app_url`) for what only a server has: the error a client
sees, and cancellation.
"""
from __future__ import annotations

import time

import pytest
from tiny import build_tiny, rigged_router, tiny_lm_with_chars

from app import handlers as H
from app.session import MODELS_ENV, InputError, Session, default_model, get_model
from polar_core.engine import decoder as decoder_module
from polar_core.engine import generate as generate_module
from polar_core.engine.models import DEFAULT_MODEL
from polar_core.study.router import RouterConfig, save_router

PROMPT = "Q: What is the capital of France?\nA:"


# ---------------------------------------------------------------- routers
def _mismatched_router(folder, lm):
    """A checkpoint made for a deeper model with the same hidden size."""
    config = RouterConfig(model_name="another-model", num_layers=lm.num_layers + 2, feature_size=lm.adapter.hidden_size)
    save_router(rigged_router(config), folder)
    return folder


def _garbage_weights(folder):
    (folder / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 10)


def _garbage_config(folder):
    (folder / "config.json").write_text("{not json", encoding="utf-8")


def _truncated_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _missing_weights(folder):
    (folder / "model.safetensors").unlink()


@pytest.fixture
def lm():
    return tiny_lm_with_chars()


def test_a_router_set_by_the_operator_is_used(lm, tmp_path, monkeypatch):
    """Control for the fault tests below: a good checkpoint in $POLAR_ROUTER_DIR predicts programs."""
    save_router(rigged_router(RouterConfig.for_model(lm)), tmp_path / "router")
    monkeypatch.setenv(H.ROUTER_ENV, str(tmp_path / "router"))
    pred = H.predict(lm, PROMPT)
    assert pred.programs and pred.programs[0].is_full  # the rigged router keeps every layer
    assert "Router top-" in pred.message


def test_router_for_another_model_is_reported_and_the_app_runs_without_it(lm, tmp_path, monkeypatch):
    monkeypatch.setenv(H.ROUTER_ENV, str(_mismatched_router(tmp_path / "router", lm)))
    router, why = H.load_router_for(lm)
    assert router is None
    assert f"{lm.num_layers + 2} layers" in why and f"{lm.num_layers} layers" in why
    pred = H.predict(lm, PROMPT)
    # No router program: whatever is shown is a training-free suggestion.
    assert all(src == H.SUGGESTED_SOURCE for src in pred.sources) and len(pred.rows) == len(pred.programs)
    assert pred.message.startswith("No router loaded") and "another-model" in pred.message


@pytest.mark.parametrize("damage, problem", [
    (_garbage_weights, "cannot read router weights"),
    (_truncated_weights, "cannot read router weights"),
    (_missing_weights, "cannot read router weights"),
    (_garbage_config, "cannot read router config"),
])
def test_corrupted_router_checkpoint_is_reported(lm, tmp_path, monkeypatch, damage, problem):
    folder = tmp_path / "router"
    save_router(rigged_router(RouterConfig.for_model(lm)), folder)
    damage(folder)
    monkeypatch.setenv(H.ROUTER_ENV, str(folder))
    pred = H.predict(lm, PROMPT)
    assert H.ROUTER_SOURCE not in pred.sources
    assert "No router loaded" in pred.message and problem in pred.message
    assert str(tmp_path) not in pred.message  # the page does not learn where the server keeps files


def test_without_a_router_the_default_is_none(monkeypatch):
    monkeypatch.delenv(H.ROUTER_ENV, raising=False)
    router, why = H.load_router_for(build_tiny("llama"))  # nothing ships for a tiny model
    assert router is None and why == "none ships for it"


# ----------------------------------------------------------------- models
def _broken_checkpoint(folder):
    """A model folder whose config.json is not JSON."""
    folder.mkdir()
    (folder / "config.json").write_text("{this is not json", encoding="utf-8")
    return folder


def _unsupported_checkpoint(folder):
    """A loadable model of a family we cannot run layer by layer (GPT-2), with a tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    config = GPT2Config(vocab_size=8, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("make, problem", [(_broken_checkpoint, "could not load model"),
                                           (_unsupported_checkpoint, "unsupported model family 'gpt2'")])
def test_a_model_that_fails_to_load_is_one_clear_message(tmp_path, monkeypatch, make, problem):
    spec = str(make(tmp_path / "model"))
    monkeypatch.setenv(MODELS_ENV, f"{DEFAULT_MODEL},{spec}")
    with pytest.raises(InputError, match=problem) as caught:
        get_model(spec)
    assert "Traceback" not in str(caught.value)


def test_the_model_dropdown_shows_a_load_failure_as_an_error(tmp_path, monkeypatch):
    import gradio as gr

    from app import ui

    spec = str(_broken_checkpoint(tmp_path / "model"))
    monkeypatch.setenv(MODELS_ENV, f"{DEFAULT_MODEL},{spec}")
    with pytest.raises(gr.Error, match="could not load model"):
        ui.on_model(spec)


def test_warm_up_survives_a_default_model_that_fails_to_load(tmp_path, monkeypatch, caplog):
    from app import ui

    monkeypatch.setenv(MODELS_ENV, str(_broken_checkpoint(tmp_path / "model")))
    ui.warm_up()  # must not raise: the server starts and the page shows the error
    assert "default model not loaded" in caplog.text and "could not load model" in caplog.text


class _Request:
    """What on_load reads of a gr.Request: the page's query parameters."""

    def __init__(self, **params):
        self.query_params = params


@pytest.mark.real_model
def test_a_link_to_a_model_that_fails_falls_back_to_the_default(real_lm, tmp_path, monkeypatch):
    from app import ui

    spec = str(_broken_checkpoint(tmp_path / "model"))
    monkeypatch.setenv(MODELS_ENV, f"{DEFAULT_MODEL},{spec}")
    with pytest.warns(UserWarning, match="could not load model"):
        model, prompt, _, status, _card, text, *_ = ui.on_load(Session(), _Request(model=spec, prompt=PROMPT))
    assert model == default_model() == DEFAULT_MODEL
    assert DEFAULT_MODEL in status and prompt == PROMPT and text == "0-29"


# ------------------------------------------------------------ time limit
@pytest.mark.real_model
def test_generation_stops_at_the_request_time_limit(real_lm, monkeypatch):
    """POLAR_REQUEST_SECONDS bounds a run; the summary says the answer was cut.

    The limit counts the prompt pass too (a run that cannot finish its
    prompt pass is refused: tests/app/test_hostile.py). Decoding is fast and
    a busy host's prompt pass is not, so the generation's clock is made to
    pass 5 s per decoded token: the limit (the prompt pass three times
    over, plus 2 s) then cuts the answer after a few tokens on any host."""
    offset = [0.0]

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return time.perf_counter() + offset[0]

    push = decoder_module.Decoder.push

    def slow_push(self, next_tokens):
        offset[0] += 5.0
        return push(self, next_tokens)

    prompt = "Describe the water cycle in a few sentences."
    timed = H.run(real_lm, Session(), prompt, "0-29x2").trace
    assert len(timed.token_ids) == H.MAX_NEW_TOKENS  # a long answer: there is decoding to cut
    monkeypatch.setattr(generate_module, "time", Clock)
    monkeypatch.setattr(decoder_module.Decoder, "push", slow_push)
    monkeypatch.setenv("POLAR_REQUEST_SECONDS", f"{3 * timed.prefill_seconds + 2.0:.3f}")
    view = H.run(real_lm, Session(), prompt, "0-29x2")
    assert 0 < view.edited.tokens < H.MAX_NEW_TOKENS
    assert "cut at the time limit" in view.summary


@pytest.mark.real_model
def test_new_tokens_follow_the_operator_limit(real_lm, monkeypatch):
    """POLAR_MAX_NEW_TOKENS below the app's 32 shortens every answer."""
    monkeypatch.setenv("POLAR_MAX_NEW_TOKENS", "3")
    view = H.run(real_lm, Session(), "Describe the water cycle in a few sentences.", "0-19")
    assert view.edited.tokens == 3 and view.full.tokens == 3


# --------------------------------------------------------- via the server
@pytest.fixture(scope="module")
def load_test():
    from bench import load_test

    return load_test


@pytest.mark.real_model
def test_server_without_a_usable_router_predicts_nothing_and_still_runs(app_url, tmp_path, monkeypatch, real_lm,
                                                                         load_test):
    from gradio_client import Client

    case = load_test.CASES[0]
    client = Client(app_url, verbose=False)
    expected = load_test.run_case(client, case)
    monkeypatch.setenv(H.ROUTER_ENV, str(_mismatched_router(tmp_path / "router", real_lm)))
    table, message, text, *_ = client.predict(case.prompt, DEFAULT_MODEL, api_name="/predict")
    assert message.startswith("No router loaded") and "32 layers" in message
    rows = (table.get("data") if isinstance(table, dict) else table) or []
    assert all(row[4] == H.SUGGESTED_SOURCE for row in rows)  # suggestions only, no router rows
    assert text == (rows[0][1] if rows else "0-29")
    assert load_test.run_case(client, case) == expected


@pytest.mark.real_model
def test_a_request_cancelled_mid_generation_leaves_the_server_healthy(app_url, load_test):
    """Cancel a long run while it generates; the next requests are still correct.

    Gradio cannot interrupt a handler thread, so the cancelled run finishes
    (bounded by POLAR_REQUEST_SECONDS) and its result is dropped; what matters
    is that it leaves no state behind that changes another answer.
    """
    from gradio_client import Client
    from gradio_client.utils import Status

    case = load_test.CASES[4]  # a short answer: the checks after the cancel stay quick
    reference = load_test.serial_results(app_url, [case])[case]
    client = Client(app_url, verbose=False)
    job = client.submit("Describe the water cycle in a few sentences.", "0-29x4", "", DEFAULT_MODEL, api_name="/run")
    deadline = time.monotonic() + 60
    # PROCESSING until the run's first streamed update, ITERATING after it: a
    # poll may miss the first when the machine is busy (it failed once so).
    running = (Status.PROCESSING, Status.ITERATING)
    while job.status().code not in running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.status().code in running
    time.sleep(0.5)  # inside the generation loop by now
    assert job.cancel()
    assert job.status().code == Status.CANCELLED
    assert load_test.run_case(client, case) == reference  # same client, same session
    assert load_test.run_case(Client(app_url, verbose=False), case) == reference
