"""The executor's invariants on CUDA (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch
from tiny import tiny_config, wrap

from polar_core.engine.forward import forward_logits
from polar_core.engine.generate import Stopping, generate
from polar_core.engine.inputs import pad_left, resolve_programs
from polar_core.program import Program

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

ROWS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4, 5, 6, 7]]


def _cuda_tiny(family: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    torch.manual_seed(0)
    impl = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).to("cuda", dtype)
    return wrap(model)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "mistral"])
def test_identity_equals_model_on_cuda(family):
    lm = _cuda_tiny(family)
    batch = pad_left(ROWS, 0, "cuda")
    with torch.no_grad():
        ref = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        gen = lm.model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=16,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    ours = forward_logits(lm, batch, resolve_programs(lm, None, 2))
    real = batch.attention_mask.bool()
    assert ((ours[real] - ref[real]).abs().max() / ref[real].abs().max()).item() < 1e-4
    traces = generate(lm, batch, None, max_new_tokens=16, stopping=Stopping(at_eos=False))
    width = batch.input_ids.shape[1]
    assert [t.token_ids for t in traces] == [gen[i, width:].tolist() for i in range(2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loops_cached_equal_recomputed_on_cuda(dtype):
    lm = _cuda_tiny("llama", dtype)
    batch = pad_left(ROWS, 0, "cuda")
    program = Program.parse("0-3, 2-3x2", 4)
    cached = generate(lm, batch, program, max_new_tokens=12, stopping=Stopping(at_eos=False))
    recomputed = generate(lm, batch, program, max_new_tokens=12, use_cache=False, stopping=Stopping(at_eos=False))
    if dtype == torch.float32:
        assert [t.token_ids for t in cached] == [t.token_ids for t in recomputed]
    else:  # bf16 rounding differs between the two attention shapes; the first tokens must agree
        assert [t.token_ids[:4] for t in cached] == [t.token_ids[:4] for t in recomputed]
