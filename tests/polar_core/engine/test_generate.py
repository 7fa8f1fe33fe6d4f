"""The executor's invariants (DESIGN.md): identity == the unmodified model, a KV
slot per step, per-row programs in one batch, reentrancy, clear errors."""
from __future__ import annotations

import math
import threading

import pytest
import torch
from tiny import FAMILIES, build_tiny

from polar_core.engine.adapter import UnsupportedModelError, get_adapter
from polar_core.engine.drafts import MAX_PROPOSAL, DraftStats
from polar_core.engine.forward import forward_logits, prefill
from polar_core.engine.generate import Sampling, Stopping, generate
from polar_core.engine.inputs import PromptError, pad_left, resolve_programs
from polar_core.program import Program, ProgramError

# Two left-padded rows; 9 + 16 tokens cross the tiny sliding window (5).
ROWS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4, 5, 6, 7]]
LOOPS = ["0-1, 2x3, 3", "0-3, 2-3", "0, 1-2x2, 3"]


def _batch(rows=ROWS):
    return pad_left(rows, pad_id=0, device="cpu")


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_program_equals_model_forward(family):
    lm = build_tiny(family)
    batch = _batch()
    with torch.no_grad():
        ref = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    ours = forward_logits(lm, batch, resolve_programs(lm, None, 2))
    real = batch.attention_mask.bool()  # padded positions are garbage in both
    assert _relative_error(ours[real], ref[real]) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_program_equals_model_generate(family):
    lm = build_tiny(family)
    batch = _batch()
    with torch.no_grad():
        ref = lm.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    traces = generate(lm, batch, None, max_new_tokens=32, stopping=Stopping(at_eos=False))
    width = batch.input_ids.shape[1]
    for row, trace in enumerate(traces):
        assert trace.token_ids == ref[row, width:].tolist()
        assert trace.finish_reason == "length"


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "mistral"])
@pytest.mark.parametrize("text", LOOPS)
def test_cached_generation_equals_recomputation_with_loops(family, text):
    """Guards the reference implementation's bug: a looped layer appending its
    keys twice into one cache slot makes cached decoding diverge."""
    lm = build_tiny(family)
    program = Program.parse(text, lm.num_layers)
    assert program.layer_calls > lm.num_layers or len(set(program.path)) < program.layer_calls
    cached = generate(lm, _batch(), program, max_new_tokens=16, stopping=Stopping(at_eos=False))
    recomputed = generate(lm, _batch(), program, max_new_tokens=16, use_cache=False, stopping=Stopping(at_eos=False))
    for a, b in zip(cached, recomputed):
        assert a.token_ids == b.token_ids


def test_loop_steps_get_their_own_cache_slots(tiny_llama):
    program = Program.parse("0-3, 2-3", tiny_llama.num_layers)
    batch = _batch()
    pre = prefill(tiny_llama, batch, [program, program], cache_capacity=batch.input_ids.shape[1] + 1)
    assert sorted(pre.cache._slots) == list(range(program.layer_calls))
    assert pre.cache.length == batch.input_ids.shape[1]
    # The two visits of layer 2 see different inputs, so their keys differ.
    k_first, k_second = pre.cache._slots[2][0], pre.cache._slots[4][0]
    assert not torch.allclose(k_first, k_second)


def test_batch_of_different_programs_equals_each_alone(tiny_llama):
    texts = ["0-3", "0-1, 3", "0-3, 2-3", "3, 2, 1, 0"]
    programs = [Program.parse(t, tiny_llama.num_layers) for t in texts]
    rows = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5], [9, 8, 7, 6, 5], [4, 4, 4, 4, 4, 4, 4, 4]]
    together = generate(tiny_llama, _batch(rows), programs, max_new_tokens=12, capture="last", stopping=Stopping(at_eos=False))
    for row, program in enumerate(programs):
        alone = generate(tiny_llama, _batch([rows[row]]), program, max_new_tokens=12, capture="last", stopping=Stopping(at_eos=False))[0]
        assert together[row].token_ids == alone.token_ids
        torch.testing.assert_close(together[row].final_logits, alone.final_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together[row].step_hidden, alone.step_hidden, rtol=1e-4, atol=1e-5)


def test_threads_with_different_programs_equal_serial_results(tiny_llama):
    programs = [Program.parse(t, tiny_llama.num_layers) for t in ["0-3", "0-1", "0-3x2", "1-3, 1-3"]]
    serial = [generate(tiny_llama, _batch(), p, max_new_tokens=10, stopping=Stopping(at_eos=False)) for p in programs]
    results: dict[int, list] = {}
    errors = []

    def worker(i: int):
        try:
            for _ in range(3):  # repeat so runs overlap
                results[i] = generate(tiny_llama, _batch(), programs[i], max_new_tokens=10, stopping=Stopping(at_eos=False))
        except Exception as exc:  # surfaced below; a thread would swallow it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(programs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, expected in enumerate(serial):
        assert [t.token_ids for t in results[i]] == [t.token_ids for t in expected]


def test_no_program_state_is_left_on_the_model(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    attrs_before = set(vars(tiny_llama.model))
    generate(tiny_llama, _batch(), Program.parse("0-3x2", 4), max_new_tokens=4)
    assert set(vars(tiny_llama.model)) == attrs_before
    for k, v in tiny_llama.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_captured_hidden_states_shapes_and_last_step(tiny_llama):
    program = Program.parse("0-1, 1, 3", 4)
    batch = _batch()
    last = generate(tiny_llama, batch, program, max_new_tokens=1, capture="last")
    full = generate(tiny_llama, batch, program, max_new_tokens=1, capture="all")
    for row, length in enumerate(batch.lengths):
        assert last[row].step_hidden.shape == (program.layer_calls + 1, 32)
        assert full[row].step_hidden.shape == (program.layer_calls + 1, length, 32)
        torch.testing.assert_close(full[row].step_hidden[:, -1], last[row].step_hidden)
        # The final logits are the norm + head of the last captured state.
        expected = tiny_llama.adapter.logits(last[row].step_hidden[-1]).float()
        torch.testing.assert_close(last[row].final_logits, expected, rtol=1e-4, atol=1e-5)


def test_skip_changes_the_result(tiny_llama):
    full = generate(tiny_llama, _batch(), None, max_new_tokens=1, capture="last")
    short = generate(tiny_llama, _batch(), Program.skip(4, 1, 2), max_new_tokens=1, capture="last")
    assert short[0].program.layer_calls == 2 and full[0].program.layer_calls == 4
    assert not torch.allclose(full[0].final_logits, short[0].final_logits)


def test_seeded_sampling_is_reproducible(tiny_llama):
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=123)
    a = generate(tiny_llama, _batch(), None, max_new_tokens=12, sampling=sampling, stopping=Stopping(at_eos=False))
    b = generate(tiny_llama, _batch(), None, max_new_tokens=12, sampling=sampling, stopping=Stopping(at_eos=False))
    other = generate(tiny_llama, _batch(), None, max_new_tokens=12, sampling=Sampling(1.0, seed=7), stopping=Stopping(at_eos=False))
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    assert [t.token_ids for t in a] != [t.token_ids for t in other]


def test_generation_stops_at_eos(tiny_llama):
    batch = _batch()
    greedy = generate(tiny_llama, batch, None, max_new_tokens=6, stopping=Stopping(at_eos=False))
    first = greedy[0].token_ids[0]
    # Declare the first greedy token an end-of-sequence token: generation stops before it.
    lm = tiny_llama
    original = lm.model.generation_config.eos_token_id
    lm.model.generation_config.eos_token_id = first
    try:
        stopped = generate(lm, batch, None, max_new_tokens=6)
    finally:
        lm.model.generation_config.eos_token_id = original
    assert stopped[0].token_ids == [] and stopped[0].finish_reason == "eos"


@pytest.mark.parametrize(
    "programs, message",
    [
        ([Program.full(3)], "3-layer model"),
        ([Program.full(4)] * 3, "3 programs for 2 prompts"),
        (["0-3"], "expected a Program"),
    ],
)
def test_wrong_programs_raise_one_clear_error(tiny_llama, programs, message):
    with pytest.raises(ProgramError, match=message):
        generate(tiny_llama, _batch(), programs if len(programs) != 1 else programs * 2, max_new_tokens=1)


def test_empty_prompt_rows_are_rejected():
    with pytest.raises(PromptError):
        pad_left([[1, 2], []], 0, "cpu")


def test_unsupported_family_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        get_adapter(model)


def test_time_limit_and_cancellation_end_generation_cleanly(tiny_llama):
    tokens = {"n": 0}
    cancelled = generate(tiny_llama, _batch(), None, max_new_tokens=50, stopping=Stopping(
        at_eos=False, should_stop=lambda: tokens["n"] >= 3), on_tokens=lambda rows: tokens.update(n=len(rows[0])))
    assert all(t.finish_reason == "cancelled" and len(t.token_ids) == 3 for t in cancelled)
    # The model is unharmed: the next request equals a fresh one.
    again = generate(tiny_llama, _batch(), None, max_new_tokens=5, stopping=Stopping(at_eos=False))
    assert [t.token_ids for t in again] == [t.token_ids[:5] for t in generate(tiny_llama, _batch(), None, max_new_tokens=5, stopping=Stopping(at_eos=False))]


def _counting_layers(lm, monkeypatch) -> list[int]:
    """Record every layer call of lm's adapter (undone when the test ends)."""
    calls, cls = [], type(lm.adapter)
    run_layer = cls.run_layer

    def counted(self, layer, *args, **kwargs):
        if self is lm.adapter:
            calls.append(layer)
        return run_layer(self, layer, *args, **kwargs)

    monkeypatch.setattr(cls, "run_layer", counted)
    return calls


@pytest.mark.parametrize("stopping, reason", [(Stopping(time_limit_s=0.0), "time"),
                                              (Stopping(should_stop=lambda: True), "cancelled")])
def test_the_prompt_pass_stops_at_the_time_limit_and_on_cancel(tiny_llama, monkeypatch, stopping, reason):
    """Regression: the time limit was checked between tokens only, so a long
    prompt under 0-29x4 took 27.5 s of prompt pass under a 0.5 s limit. The
    prompt pass now stops between program steps: here after its first step of 16."""
    from polar_core.engine.generate import PromptPassStopped

    calls = _counting_layers(tiny_llama, monkeypatch)
    looped = Program.parse("0-3x4", tiny_llama.num_layers)
    with pytest.raises(PromptPassStopped) as caught:
        generate(tiny_llama, _batch(), looped, max_new_tokens=5, stopping=stopping)
    assert caught.value.reason == reason and len(calls) == 1
    if reason == "time":
        assert "16 layer calls" in str(caught.value) and "time limit" in str(caught.value)


def test_a_generous_time_limit_changes_no_token(tiny_llama):
    """The deadline checks between steps change nothing the steps compute."""
    looped = Program.parse("0-3x2", tiny_llama.num_layers)
    plain = generate(tiny_llama, _batch(), looped, max_new_tokens=6, stopping=Stopping(at_eos=False))
    timed = generate(tiny_llama, _batch(), looped, max_new_tokens=6,
                     stopping=Stopping(at_eos=False, time_limit_s=600, should_stop=lambda: False))
    assert [t.token_ids for t in timed] == [t.token_ids for t in plain]
    assert all(torch.equal(a.final_logits, b.final_logits) for a, b in zip(timed, plain))


# ---------------------------------------------------------------- drafts


def _drafts(answer: list[int]) -> dict[str, list[int]]:
    """Drafts a run may be handed: its own answer, one that leaves it midway, one that never matches."""
    half = len(answer) // 2
    return {
        "own answer": answer,
        "leaves midway": answer[:half] + [(t + 1) % 50 for t in answer[half:]],
        "never matches": [(answer[0] + 1) % 50] * len(answer),
        "empty": [],
    }


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3"])
@pytest.mark.parametrize("text", ["0-3", "0-1, 2x3, 3", "0, 3"])
def test_decoding_with_a_draft_equals_plain_greedy(family, text):
    """The draft only proposes; every kept token is the program's own greedy choice.
    gemma3_text's 5-token sliding window is crossed inside multi-token passes."""
    lm = build_tiny(family)
    program = Program.parse(text, lm.num_layers)
    prompt = _batch(ROWS[:1])
    plain = generate(lm, prompt, program, max_new_tokens=16, stopping=Stopping(at_eos=False))[0]
    for name, draft in _drafts(plain.token_ids).items():
        drafted = generate(lm, prompt, program, max_new_tokens=16, drafts=[draft], stopping=Stopping(at_eos=False))[0]
        assert drafted.token_ids == plain.token_ids, name
        assert drafted.finish_reason == plain.finish_reason == "length"
    drafts = _drafts(plain.token_ids)
    own = generate(lm, prompt, program, max_new_tokens=16, drafts=[drafts["leaves midway"], plain.token_ids, drafts["never matches"]], stopping=Stopping(at_eos=False))[0]
    # Token 1 comes from the prompt pass, 2-16 from passes over the longest matching draft, each keeping
    # up to MAX_PROPOSAL draft tokens and adding its own next choice.
    passes = math.ceil(15 / (MAX_PROPOSAL + 1))
    assert own.token_ids == plain.token_ids and own.drafts == DraftStats(decode_passes=passes, draft_tokens_kept=15 - passes)


def test_drafts_stop_at_eos_and_max_tokens_like_plain_decoding(tiny_llama):
    prompt = _batch(ROWS[:1])
    greedy = generate(tiny_llama, prompt, None, max_new_tokens=12, stopping=Stopping(at_eos=False))[0].token_ids
    short = generate(tiny_llama, prompt, None, max_new_tokens=5, drafts=[greedy], stopping=Stopping(at_eos=False))[0]
    assert short.token_ids == greedy[:5] and short.finish_reason == "length"
    lm = tiny_llama
    original = lm.model.generation_config.eos_token_id
    lm.model.generation_config.eos_token_id = greedy[6]  # an EOS inside the draft's span
    try:
        plain = generate(lm, prompt, None, max_new_tokens=12)[0]
        drafted = generate(lm, prompt, None, max_new_tokens=12, drafts=[greedy])[0]
    finally:
        lm.model.generation_config.eos_token_id = original
    assert drafted.token_ids == plain.token_ids and drafted.finish_reason == plain.finish_reason == "eos"


@pytest.mark.parametrize("kwargs", [{"sampling": Sampling(1.0, seed=0)}, {"use_cache": False}])
def test_drafts_need_greedy_cached_decoding(tiny_llama, kwargs):
    with pytest.raises(ValueError, match="drafts need one prompt"):
        generate(tiny_llama, _batch(ROWS[:1]), None, max_new_tokens=4, drafts=[[1, 2]], **kwargs)


def test_drafts_need_one_prompt(tiny_llama):
    with pytest.raises(ValueError, match="drafts need one prompt"):
        generate(tiny_llama, _batch(), None, max_new_tokens=4, drafts=[[1, 2]])


def test_proposals_follow_the_longest_draft_the_answer_is_a_prefix_of():
    from polar_core.engine.drafts import propose_from_drafts

    assert propose_from_drafts([[5, 6, 7, 8]], [5, 6], limit=8) == [7, 8]
    assert propose_from_drafts([[5, 6, 7, 8]], [], limit=3) == [5, 6, 7]
    assert propose_from_drafts([[5, 6, 7, 8]], [5, 9], limit=8) == []
    assert propose_from_drafts([[5, 6]], [5, 6, 7], limit=8) == []
    assert propose_from_drafts([[5, 6, 7]], [5], limit=0) == []
    assert propose_from_drafts([[5, 9, 9], [5, 6, 7, 8], [5, 6, 1]], [5, 6], limit=8) == [7, 8]
    assert propose_from_drafts([], [5], limit=8) == []


@pytest.mark.parametrize("text", ["0-3", "0-1, 2x3, 3", "3, 1"])
@pytest.mark.parametrize("with_draft", [False, True])
def test_states_at_the_first_answer_token_equal_a_prompt_pass_over_it(tiny_llama, text, with_draft):
    """The lens follows answers that open with a bare space from these states:
    the same as running the prompt plus the first answer token."""
    program = Program.parse(text, tiny_llama.num_layers)
    prompt = ROWS[0]
    plain = generate(tiny_llama, _batch([prompt]), program, max_new_tokens=6, stopping=Stopping(at_eos=False))[0]
    drafts = [plain.token_ids] if with_draft else []
    trace = generate(tiny_llama, _batch([prompt]), program, max_new_tokens=6, capture="last", drafts=drafts, stopping=Stopping(at_eos=False))[0]
    extended = prefill(tiny_llama, _batch([prompt + trace.token_ids[:1]]), [program], capture="last")
    assert trace.answer_step_hidden.shape == (program.layer_calls + 1, tiny_llama.adapter.hidden_size)
    torch.testing.assert_close(trace.answer_step_hidden, extended.step_hidden[0], rtol=1e-4, atol=1e-5)


def test_states_at_the_first_answer_token_per_row(tiny_llama):
    programs = [Program.parse(t, tiny_llama.num_layers) for t in ["0-3", "0, 3", "0-2x2, 3"]]
    rows = [ROWS[0], ROWS[1], [7, 7, 8]]
    together = generate(tiny_llama, _batch(rows), programs, max_new_tokens=4, capture="last", stopping=Stopping(at_eos=False))
    for row, program in enumerate(programs):
        alone = generate(tiny_llama, _batch([rows[row]]), program, max_new_tokens=4, capture="last", stopping=Stopping(at_eos=False))[0]
        torch.testing.assert_close(together[row].answer_step_hidden, alone.answer_step_hidden, rtol=1e-4, atol=1e-5)
    one_token = generate(tiny_llama, _batch(rows[:1]), programs[0], max_new_tokens=1, capture="last", stopping=Stopping(at_eos=False))
    assert one_token[0].answer_step_hidden is None  # no second token is chosen


@pytest.mark.parametrize("drafts", [[], [[1, 2, 3]]])
def test_on_tokens_sees_the_answer_grow_to_the_final_one(tiny_llama, drafts):
    seen = []
    plain = generate(tiny_llama, _batch(ROWS[:1]), None, max_new_tokens=8, stopping=Stopping(at_eos=False))[0]
    own = [plain.token_ids] if drafts else []
    trace = generate(tiny_llama, _batch(ROWS[:1]), None, max_new_tokens=8, drafts=own, on_tokens=lambda rows: seen.append(list(rows[0])), stopping=Stopping(at_eos=False))[0]
    assert seen[-1] == trace.token_ids == plain.token_ids
    assert all(a == b[: len(a)] and len(a) < len(b) for a, b in zip(seen, seen[1:]))
    assert len(seen) == (2 if drafts else 8)  # the prompt pass's token, then one pass over the draft
