"""The lean decode step (polar_core.engine.cpu.lean): the same answers as the
transformers layers, for every program, on tiny models stored like the
embedded GGUF (layer weights on the Q4_1 grid, LM head on Q8_0) and on the
real model; the executor's invariants still hold with it."""
from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import pytest
import torch
from tiny import TINY, q4_grid, q8_grid, wrap

from polar_core.engine.cpu import lean as lean_module
from polar_core.engine.cpu import packed
from polar_core.engine.cpu.lean import LeanDecoding, lean_decoding
from polar_core.engine.forward import forward_cached, prefill
from polar_core.engine.generate import Stopping, generate
from polar_core.engine.inputs import EncodedBatch, pad_left, resolve_programs
from polar_core.program import Program

needs_kernel = pytest.mark.skipif(not packed.kernels_expected(), reason="no AVX2/FMA/F16C CPU or C compiler")

LEAN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# identity, a loop, a skip, a re-order, a layer run three times (3 layers)
PROGRAMS = ["0-2", "0, 1x2, 2", "0, 2", "2, 0, 1", "1x3, 2"]
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13]  # crosses Mistral's sliding window (5)
NO_EOS = Stopping(at_eos=False)


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kernels")


def _config(family: str):
    import transformers as tf

    # Wider than tests/tiny.py: every product's outputs are whole tiles of 32 codes.
    shape = {**TINY, "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
             "head_dim": 16}
    return {
        "llama": lambda: tf.LlamaConfig(**shape, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5),
        "mistral": lambda: tf.MistralConfig(**shape, sliding_window=5),
        "qwen2": lambda: tf.Qwen2Config(**shape),  # q/k/v biases
        "qwen3": lambda: tf.Qwen3Config(**shape),  # per-head q/k norms
    }[family]()


def grid_model(family: str, kernel_dir: Path, seed: int = 0):
    """A tiny model of `family` stored like the embedded GGUF, packed, with the lean step decided as at load."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family), attn_implementation="sdpa")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_((q4_grid if ".layers." in name else q8_grid)(module.weight))
                if module.bias is not None:
                    module.bias.normal_(0, 0.05)
            elif type(module).__name__.endswith("RMSNorm"):  # not all ones: a step that skipped a norm would show
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
    lm = wrap(model, name=f"tiny-{family}-q4")
    packed.pack_linears(lm.model, kernel_dir)
    return dataclasses.replace(lm, lean=lean_decoding(lm.model, lm.adapter, kernel_dir))


def reference(lm):
    """The same model without the lean step: every pass through the transformers layers."""
    return dataclasses.replace(lm, lean=None)


@pytest.fixture(scope="module", params=LEAN_FAMILIES)
def lean_lm(request, kernel_dir):
    if not packed.kernels_expected():
        pytest.skip("no AVX2/FMA/F16C CPU or C compiler")
    lm = grid_model(request.param, kernel_dir)
    assert lm.lean.ready, lm.lean.note
    return lm


@pytest.fixture
def lean_calls(monkeypatch):
    """Counts the passes that took the lean step (so a test can tell it ran)."""
    calls = []
    original = LeanDecoding.forward

    def counted(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(LeanDecoding, "forward", counted)
    return calls


def _batch(rows=(PROMPT,)):
    return pad_left([list(r) for r in rows], pad_id=0, device="cpu")


@needs_kernel
@pytest.mark.parametrize("text", PROGRAMS)
def test_lean_greedy_tokens_equal_the_reference_path(lean_lm, lean_calls, text):
    program = Program.parse(text, lean_lm.num_layers)
    fast = generate(lean_lm, _batch(), program, max_new_tokens=20, stopping=NO_EOS)[0]
    assert sum(lean_calls) == 19  # every decoding pass after the prompt pass
    slow = generate(reference(lean_lm), _batch(), program, max_new_tokens=20, stopping=NO_EOS)[0]
    assert sum(lean_calls) == 19
    assert fast.token_ids == slow.token_ids


@needs_kernel
@pytest.mark.parametrize("text", ["0-2", "0, 1x2, 2", "2, 0, 1"])
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("avx512", [None, False])  # as loaded (AVX-512 where the CPU has it), and AVX2
def test_a_lean_pass_computes_what_the_transformers_layers_compute(lean_lm, kernel_dir, text, rows, avx512):
    """Hidden states, logits and the KV slots after one cached pass of 1 or 4
    tokens (a draft check), from the same cache."""
    if avx512 is False:
        lean_lm = dataclasses.replace(lean_lm, lean=lean_decoding(lean_lm.model, lean_lm.adapter, kernel_dir,
                                                                  avx512=False))
        assert "AVX2" in lean_lm.lean.note
    program = Program.parse(text, lean_lm.num_layers)
    batch = _batch()
    width = batch.input_ids.shape[1]
    pre = prefill(lean_lm, batch, [program], cache_capacity=width + rows)
    lean_cache, reference_cache = pre.cache, _copy(pre.cache)
    tokens = torch.tensor([[20, 21, 22, 23][:rows]])
    mask = torch.ones(1, width + rows, dtype=torch.long)
    with torch.inference_mode():
        assert lean_lm.lean.applies(tokens, [program])
        ours, ours_steps = forward_cached(lean_lm, tokens, mask, [program], lean_cache, capture="all")
        theirs, their_steps = forward_cached(reference(lean_lm), tokens, mask, [program], reference_cache, capture="all")
        logits = lean_lm.lean.logits(ours[0])
        their_logits = lean_lm.adapter.logits(theirs[0]).float()
    assert len(ours_steps) == len(their_steps) == program.layer_calls + 1
    for a, b in zip(ours_steps, their_steps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, their_logits, rtol=1e-4, atol=1e-4)
    assert lean_cache.length == reference_cache.length == width + rows
    assert sorted(lean_cache._slots) == sorted(reference_cache._slots) == list(range(program.layer_calls))
    for step, (keys, values) in lean_cache._slots.items():
        torch.testing.assert_close(keys, reference_cache._slots[step][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(values, reference_cache._slots[step][1], rtol=1e-4, atol=1e-4)


def _copy(cache):
    copy = type(cache)(cache.capacity)
    copy.length = cache.length
    copy._slots = {k: (a.clone(), b.clone()) for k, (a, b) in cache._slots.items()}
    return copy


# The executor's invariants, on the lean step and on the reference path
# (the same model with the lean step off, as POLAR_LEAN=0 loads it).
PATHS = ("lean", "reference")


def on_path(lm, path: str):
    return lm if path == "lean" else reference(lm)


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("text", ["0-1, 2x3", "0-2, 1-2", "0, 1-2x2"])
def test_cached_decoding_equals_recomputation_with_loops(lean_lm, lean_calls, text, path):
    lm = on_path(lean_lm, path)
    program = Program.parse(text, lm.num_layers)
    cached = generate(lm, _batch(), program, max_new_tokens=16, stopping=NO_EOS)[0]
    recomputed = generate(lm, _batch(), program, max_new_tokens=16, use_cache=False, stopping=NO_EOS)[0]
    assert sum(lean_calls) == (15 if path == "lean" else 0)
    assert cached.token_ids == recomputed.token_ids


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
def test_per_row_programs_in_a_batch_equal_each_alone(lean_lm, lean_calls, path):
    """A batch takes the transformers layers; each row alone the lean step on
    the lean path: the same tokens either way."""
    lm = on_path(lean_lm, path)
    texts = ["0-2", "0, 2", "0-2, 1-2"]
    rows = [PROMPT, [3, 4, 5], [9, 8, 7, 6, 5]]
    programs = [Program.parse(t, lm.num_layers) for t in texts]
    together = generate(lm, _batch(rows), programs, max_new_tokens=12, stopping=NO_EOS)
    assert not lean_calls
    for row, program in enumerate(programs):
        alone = generate(lm, _batch([rows[row]]), program, max_new_tokens=12, stopping=NO_EOS)[0]
        assert together[row].token_ids == alone.token_ids
    assert sum(lean_calls) == (3 * 11 if path == "lean" else 0)


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
def test_threads_equal_serial_results(lean_lm, lean_calls, path):
    lm = on_path(lean_lm, path)
    programs = [Program.parse(t, lm.num_layers) for t in ["0-2", "0-1", "0-2x2", "1-2, 1-2"]]
    serial = [generate(lm, _batch(), p, max_new_tokens=10, stopping=NO_EOS)[0].token_ids for p in programs]
    results: dict[int, list] = {}
    errors = []

    def worker(i: int):
        try:
            for _ in range(4):  # repeat so runs overlap
                results[i] = generate(lm, _batch(), programs[i], max_new_tokens=10, stopping=NO_EOS)[0].token_ids
        except Exception as exc:  # surfaced below; a thread would swallow it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(programs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(len(programs))] == serial
    assert any(lean_calls) == (path == "lean")


@needs_kernel
def test_the_thread_count_does_not_change_a_single_bit(lean_lm):
    """Each output is one thread's sum in a fixed order, whatever the split."""
    program = Program.parse("0, 1x2, 2", lean_lm.num_layers)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            pre = prefill(lean_lm, _batch(), [program], cache_capacity=len(PROMPT) + 3)
            with torch.inference_mode():
                hidden, _ = forward_cached(lean_lm, torch.tensor([[20, 21, 22]]),
                                           torch.ones(1, len(PROMPT) + 3, dtype=torch.long), [program], pre.cache)
                outs.append((hidden.clone(), lean_lm.lean.logits(hidden[0])))
    finally:
        torch.set_num_threads(before)
    for hidden, logits in outs[1:]:
        assert torch.equal(hidden, outs[0][0]) and torch.equal(logits, outs[0][1])


@needs_kernel
def test_drafts_and_captures_on_the_lean_step_equal_the_reference(lean_lm, lean_calls):
    program = Program.parse("0, 1x2, 2", lean_lm.num_layers)
    plain = generate(reference(lean_lm), _batch(), program, max_new_tokens=16, stopping=NO_EOS, capture="last")[0]
    draft = plain.token_ids[:6] + [1, 1] + plain.token_ids[8:]  # right, then wrong, then right again
    fast = generate(lean_lm, _batch(), program, max_new_tokens=16, stopping=NO_EOS, capture="last",
                    drafts=[draft])[0]
    assert any(lean_calls)
    assert fast.token_ids == plain.token_ids and fast.drafts.draft_tokens_kept >= 5
    torch.testing.assert_close(fast.answer_step_hidden, plain.answer_step_hidden, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_a_left_padded_single_row_takes_the_lean_step(lean_lm, lean_calls):
    batch = EncodedBatch(torch.tensor([[0, 0, 0, *PROMPT]]), torch.tensor([[0, 0, 0] + [1] * len(PROMPT)]),
                         [len(PROMPT)])
    program = Program.parse("0-2, 1", lean_lm.num_layers)
    padded = generate(lean_lm, batch, program, max_new_tokens=12, stopping=NO_EOS)[0]
    assert all(lean_calls) and len(lean_calls) == 11
    assert padded.token_ids == generate(reference(lean_lm), batch, program, max_new_tokens=12, stopping=NO_EOS)[0].token_ids


@needs_kernel
def test_float32_products_take_the_reference_path(lean_lm, lean_calls):
    with packed.float32_products(lean_lm.model):
        assert not lean_lm.lean.applies(torch.tensor([[5]]), resolve_programs(lean_lm, None, 1))
        generate(lean_lm, _batch(), None, max_new_tokens=4, stopping=NO_EOS)
    assert not lean_calls


@needs_kernel
def test_models_that_are_not_plain_pre_norm_blocks_on_codes_keep_the_reference_path(kernel_dir):
    from tiny import build_tiny

    gemma = build_tiny.__wrapped__("gemma2")
    assert not lean_decoding(gemma.model, gemma.adapter, kernel_dir).ready
    assert "gemma2" in lean_decoding(gemma.model, gemma.adapter, kernel_dir).note
    float_llama = build_tiny.__wrapped__("llama")  # float weights, no codes
    note = lean_decoding(float_llama.model, float_llama.adapter, kernel_dir).note
    assert "not multiplied as exact codes" in note


def test_the_switch_and_a_missing_compiler_give_the_reason(tmp_path, monkeypatch):
    from tiny import build_tiny

    lm = build_tiny.__wrapped__("llama")
    monkeypatch.setenv("POLAR_LEAN", "0")
    off = lean_decoding(lm.model, lm.adapter, tmp_path)
    assert not off.ready and "POLAR_LEAN=0" in str(off)
    monkeypatch.delenv("POLAR_LEAN")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    library, why_not = lean_module.load_library(tmp_path / "fresh")
    assert library is None and "no lean step" in why_not


@needs_kernel
def test_a_lean_step_that_disagrees_with_the_layer_is_refused_at_load(kernel_dir, monkeypatch):
    """The check at load compares layer 0 with transformers: break the C
    model's view of the weights (a wrong epsilon) and the lean step is off."""
    original = lean_module._describe

    def wrong_eps(*args):
        description, has_head = original(*args)
        description.eps = 10.0
        return description, has_head

    monkeypatch.setattr(lean_module, "_describe", wrong_eps)
    lm = grid_model("llama", kernel_dir)
    assert not lm.lean.ready and "differs from the transformers layer" in lm.lean.note


@pytest.mark.real_model
def test_lean_step_on_the_real_model_gives_the_reference_tokens(real_lm, lean_calls):
    if not packed.kernels_expected() or real_lm.lean is None or os.environ.get("POLAR_LEAN") == "0":
        pytest.skip(f"no AVX2/FMA/F16C or C compiler, not a CPU float32 load, or switched off: {real_lm.lean}")
    assert real_lm.lean.ready, real_lm.lean.note
    n = real_lm.num_layers
    programs = [None, Program.parse("0-9, 10-13x2, 14-29", n), Program.parse("0-14", n),
                Program.parse("0-9, 20-29, 10-19", n), Program.parse("0-3, 5, 7-29", n)]
    prompt = ["What is the capital of France?"]
    for program in programs:
        lean_calls.clear()
        fast = generate(real_lm, prompt, program, max_new_tokens=24, stopping=NO_EOS)[0]
        assert sum(lean_calls) == 23
        slow = generate(reference(real_lm), prompt, program, max_new_tokens=24, stopping=NO_EOS)[0]
        assert fast.token_ids == slow.token_ids, program
    loop = programs[1]
    cached = generate(real_lm, prompt, loop, max_new_tokens=12, stopping=NO_EOS)[0]
    assert cached.token_ids == generate(real_lm, prompt, loop, max_new_tokens=12, use_cache=False,
                                        stopping=NO_EOS)[0].token_ids


def test_the_thread_count_follows_the_faster_one_and_keeps_trying_the_other(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    choice = lean_module.ThreadChoice()
    assert choice.pick() == 2 and choice.best() == 2  # untimed: torch's count first
    choice.record(2, 3e-4)
    assert choice.pick() == 1  # then the other, once
    choice.record(1, 1e-4)  # one thread faster (a busy machine)
    picks = [choice.pick() for _ in range(4 * choice.EXPLORE)]
    assert choice.best() == 1 and picks.count(2) == 4 and picks.count(1) == 4 * choice.EXPLORE - 4
    for _ in range(20):
        choice.record(2, 5e-5)  # the machine got quiet: two threads win again
    assert choice.best() == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert choice.pick() == 1
