"""One new token's attention on the calling thread (polar_core.engine.cpu.attention) = SDPA's."""
from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from polar_core.engine.cpu import attention, packed

needs_kernel = pytest.mark.skipif(not packed.kernels_expected(), reason="no AVX2/FMA/F16C CPU or C compiler")


class _Module(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _cache_views(kv_heads: int, keys: int, dim: int, capacity: int = 40):
    """Keys and values as the KV cache hands them over: views of the first `keys` of `capacity` rows."""
    k, v = torch.randn(1, kv_heads, capacity, dim), torch.randn(1, kv_heads, capacity, dim)
    return k[:, :, :keys], v[:, :, :keys]


@needs_kernel
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 1, 256), (6, 2, 64), (3, 3, 32)])
@pytest.mark.parametrize("masked", [False, True])
def test_one_token_equals_sdpa(monkeypatch, tmp_path, heads, kv_heads, dim, masked):
    monkeypatch.setattr(attention, "_cache_dir", lambda: tmp_path)
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention", lambda *a, **k: calls.append(1) or sdpa_attention_forward(*a, **k))
    torch.manual_seed(heads * dim + masked)
    module = _Module(heads // kv_heads)
    keys = 29
    q = torch.randn(1, heads, 1, dim)
    k, v = _cache_views(kv_heads, keys, dim)
    mask = None
    if masked:  # a sliding window: the first keys out of reach
        mask = torch.zeros(1, 1, 1, keys)
        mask[..., :7] = torch.finfo(torch.float32).min
    with torch.inference_mode():
        ours, _ = attention.polar_sdpa(module, q, k, v, mask, scaling=0.125)
        want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)
    assert calls == []  # our call took the C path
    assert ours.shape == want.shape == (1, 1, heads, dim)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_everything_else_goes_to_sdpa(monkeypatch, tmp_path):
    monkeypatch.setattr(attention, "_cache_dir", lambda: tmp_path)
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention", lambda *a, **k: calls.append(1) or (None, None))
    module = _Module(2)
    k, v = _cache_views(2, 9, 32)
    with torch.inference_mode():
        attention.polar_sdpa(module, torch.randn(1, 4, 3, 32), k, v, None)  # a prompt pass: 3 new tokens
        attention.polar_sdpa(module, torch.randn(2, 4, 1, 32), torch.randn(2, 2, 9, 32), torch.randn(2, 2, 9, 32), None)
        attention.polar_sdpa(module, torch.randn(1, 4, 1, 32), k, v, torch.ones(1, 1, 1, 9, dtype=torch.bool))
        attention.polar_sdpa(module, torch.randn(1, 4, 1, 32).double(), k.double(), v.double(), None)
    attention.polar_sdpa(module, torch.randn(1, 4, 1, 32), k, v, None)  # autograd on
    assert len(calls) == 5
