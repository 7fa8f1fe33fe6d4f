"""The executor's invariants on the real default model: the identity program
is the model, cached == recomputed, per-row programs and threads equal each
alone. They hold on whichever path the model was loaded with: the lean step
where it builds (as loaded), transformers' layers with POLAR_LEAN=0."""
from __future__ import annotations

import threading

import pytest
import torch

from polar_core.engine.forward import forward_logits
from polar_core.engine.generate import Stopping, generate
from polar_core.engine.inputs import encode_prompts, resolve_programs
from polar_core.program import Program

pytestmark = pytest.mark.real_model

PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow, please."]


def test_identity_logits_equal_model_forward(real_lm):
    batch = encode_prompts(real_lm, PROMPTS)  # left-padded, chat template
    with torch.no_grad():
        ref = real_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    ours = forward_logits(real_lm, batch, resolve_programs(real_lm, None, len(PROMPTS)))
    real = batch.attention_mask.bool()
    error = ((ours[real] - ref[real]).abs().max() / ref[real].abs().max()).item()
    assert error < 1e-4


def test_identity_generation_equals_model_generate(real_lm):
    # A prompt whose answer is longer than 32 tokens, so no EOS cuts the comparison short.
    batch = encode_prompts(real_lm, ["Write a short story about a cat who learns to swim."])
    with torch.no_grad():
        ref = real_lm.model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=32, do_sample=False
        )
    trace = generate(real_lm, batch, None, max_new_tokens=32)[0]
    assert trace.token_ids == ref[0, batch.input_ids.shape[1] :].tolist()
    assert len(trace.token_ids) == 32


def test_loop_program_cached_equals_recomputed_on_real_model(real_lm):
    program = Program.parse("0-9, 10-13x2, 14-29", real_lm.num_layers)
    cached = generate(real_lm, PROMPTS[:1], program, max_new_tokens=12, stopping=Stopping(at_eos=False))[0]
    recomputed = generate(real_lm, PROMPTS[:1], program, max_new_tokens=12, use_cache=False, stopping=Stopping(at_eos=False))[0]
    assert cached.token_ids == recomputed.token_ids


def test_per_row_programs_and_threads_on_real_model_equal_each_alone(real_lm):
    """A batch of rows under their own programs (the transformers layers) and
    concurrent one-row runs (the lean step, as loaded) give each row's tokens alone."""
    n, no_eos = real_lm.num_layers, Stopping(at_eos=False)
    programs = [Program.full(n), Program.parse("0-9, 10-13x2, 14-29", n), Program.parse("0-14", n)]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    alone = [generate(real_lm, [p], prog, max_new_tokens=10, stopping=no_eos)[0].token_ids
             for p, prog in zip(prompts, programs)]
    together = generate(real_lm, prompts, programs, max_new_tokens=10, stopping=no_eos)
    assert [t.token_ids for t in together] == alone
    results: dict[int, list] = {}

    def worker(i: int):
        results[i] = generate(real_lm, [prompts[i]], programs[i], max_new_tokens=10, stopping=no_eos)[0].token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(programs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results.get(i) for i in range(len(programs))] == alone


def test_default_model_answers_and_a_short_program_changes_it(real_lm):
    full = generate(real_lm, PROMPTS[:1], None, max_new_tokens=12)[0]
    assert "Paris" in full.text
    broken = generate(real_lm, PROMPTS[:1], Program.early_exit(real_lm.num_layers, 14), max_new_tokens=12)[0]
    assert broken.program.layer_calls == 15
    assert broken.token_ids != full.token_ids


def test_the_gguf_codes_are_the_same_weights(real_lm):
    """Where the packed kernels build (CI, the Space), every weight of the
    embedded model is multiplied as its exact GGUF codes, and answers equal the
    float32 ones (polar_core.engine.cpu.packed)."""
    from polar_core.engine.cpu.packed import float32_products, kernels_expected

    if not kernels_expected() or real_lm.packing is None:
        pytest.skip(f"no AVX2/FMA/F16C or C compiler, or not a CPU float32 load: {real_lm.packing}")
    assert real_lm.packing.packed == {"q4_1": 210, "q8_0": 1} and real_lm.packing.kept == 0
    programs = [None, Program.parse("0-9, 10-13x2, 14-29", real_lm.num_layers), Program.parse("0-19", real_lm.num_layers)]
    for program in programs:
        fast = generate(real_lm, PROMPTS[:1], program, max_new_tokens=16, stopping=Stopping(at_eos=False))[0]
        with float32_products(real_lm.model):
            slow = generate(real_lm, PROMPTS[:1], program, max_new_tokens=16, stopping=Stopping(at_eos=False))[0]
        assert fast.token_ids == slow.token_ids
