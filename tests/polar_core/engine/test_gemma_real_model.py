"""The invariants on a second real model of another family: Gemma 3 270M
(gemma3_text: sliding and global attention layers, their own rotary bases,
(1 + w) norms, a 262k vocabulary), from the GGUF its PyPI packages assemble."""
from __future__ import annotations

import pytest
import torch

from polar_core.engine.forward import forward_logits
from polar_core.engine.generate import Stopping, generate
from polar_core.engine.inputs import encode_prompts, resolve_programs
from polar_core.program import Program
from polar_core.study.analysis import analyze
from polar_core.study.prompts import prompt_style

pytestmark = pytest.mark.real_model

PROMPTS = ["Question: What is the capital of France?\nAnswer:", "The three primary colours are"]


def test_it_is_the_gemma_3_base_model(real_gemma):
    info = real_gemma.describe()
    assert (info["family"], info["layers"], info["hidden_size"]) == ("gemma3_text", 18, 640)
    assert len(real_gemma.tokenizer) == 262144
    assert not prompt_style(real_gemma, "What is the capital of France?").chat  # a base model: no chat template


def test_identity_logits_equal_model_forward(real_gemma):
    batch = encode_prompts(real_gemma, PROMPTS, chat=False)  # left-padded
    with torch.no_grad():
        ref = real_gemma.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    ours = forward_logits(real_gemma, batch, resolve_programs(real_gemma, None, len(PROMPTS)))
    real = batch.attention_mask.bool()
    error = ((ours[real] - ref[real]).abs().max() / ref[real].abs().max()).item()
    assert error < 1e-4


def test_identity_generation_equals_model_generate(real_gemma):
    batch = encode_prompts(real_gemma, PROMPTS[1:], chat=False)
    with torch.no_grad():
        ref = real_gemma.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                        max_new_tokens=24, do_sample=False)
    trace = generate(real_gemma, batch, None, max_new_tokens=24, stopping=Stopping(at_eos=False))[0]
    assert trace.token_ids == ref[0, batch.input_ids.shape[1]:].tolist()


def test_it_knows_paris(real_gemma):
    style = prompt_style(real_gemma, "What is the capital of France?")
    trace = generate(real_gemma, [style.text("What is the capital of France?")], None, max_new_tokens=8, chat=False,
                     stopping=Stopping(strings=style.stop_strings))[0]
    assert "Paris" in trace.text


@pytest.mark.parametrize("text", ["0-8, 9-11x2, 12-17", "0-5, 6x3, 7-17"])
def test_loop_programs_cached_equal_recomputed(real_gemma, text):
    program = Program.parse(text, real_gemma.num_layers)
    run = dict(max_new_tokens=10, chat=False, stopping=Stopping(at_eos=False))
    cached = generate(real_gemma, PROMPTS[:1], program, **run)[0]
    recomputed = generate(real_gemma, PROMPTS[:1], program, use_cache=False, **run)[0]
    assert cached.token_ids == recomputed.token_ids


def test_the_lens_last_step_is_the_final_logits(real_gemma):
    trace = generate(real_gemma, PROMPTS[:1], None, max_new_tokens=2, chat=False, capture="last")[0]
    lens = analyze(real_gemma, trace, trace, k=5).lens
    want = trace.final_logits.float().softmax(-1).topk(5)
    assert lens.top_ids[-1].tolist() == want.indices.tolist()
    torch.testing.assert_close(lens.top_probs[-1], want.values, rtol=1e-4, atol=1e-5)
