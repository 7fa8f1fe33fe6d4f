"""A decoding step's attention on one CPU thread (`csrc/attention_one.c`).

Profiled on Gemma 3 270M decoding with its weights as GGUF codes, 2 torch
threads, a busy 2-core host (load ~6): the layer products took ~11 ms of a
~63 ms step, the attention ~36 ms. Each of its 18 calls is a few microseconds
of arithmetic, but PyTorch's CPU kernels split it over the intra-op threads,
and the caller spins until the second thread has been scheduled. With one
torch thread the same step took 15 ms. This attention runs one new token
(one row, every head) on the calling thread; everything else, and every
other device, dtype or shape, goes to transformers' SDPA function.

It is registered with transformers as the attention implementation
"polar_sdpa" (`AttentionInterface`, with SDPA's masks), which
polar_core.engine.models selects wherever it would select "sdpa", so the
model's own `forward` and the executor share it and the identity program
stays the unmodified model. Same function: only the rounding of the sums
differs from SDPA's (tests/polar_core/engine/cpu/test_attention.py).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from polar_core.engine.adapter import register_attention, sdpa_attention
from polar_core.engine.cpu import packed

NAME = "polar_sdpa"
SOURCE = Path(__file__).parent / "csrc" / "attention_one.c"


@functools.lru_cache(maxsize=None)
def _library(cache_dir: Path) -> ctypes.CDLL | None:
    if not packed.kernels_expected():
        return None
    try:
        library = packed.build_library(cache_dir, SOURCE, packed.compile_flags())
    except OSError:
        return None  # SDPA then, as without this module
    pointer, integer, long, single = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    library.attend_one.argtypes = [pointer, integer, integer, integer, integer, pointer, long, long, pointer, long,
                                   long, pointer, single, pointer]
    library.attend_one.restype = integer
    return library


def _cache_dir() -> Path:
    from polar_core.engine.models import cache_root  # at call time: models imports this module

    return cache_root() / "kernels"


def _one_row_mask(mask: torch.Tensor | None, keys: int) -> torch.Tensor | None | bool:
    """The additive float mask as `keys` contiguous floats, None for no mask, False when not one row's."""
    if mask is None:
        return None
    if mask.dtype != torch.float32 or mask.dim() != 4 or mask.shape[:3] != (1, 1, 1) or mask.shape[3] < keys:
        return False
    return mask[0, 0, 0, :keys].contiguous()


def polar_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               **kwargs):
    """transformers' attention-function signature: one new token of one row
    on a CPU in float32 takes the C path, the rest transformers' SDPA function."""
    batch, heads, q_len, dim = query.shape
    simple = (batch == 1 and q_len == 1 and query.device.type == "cpu" and query.dtype == torch.float32
              and key.dtype == value.dtype == torch.float32 and not dropout and kwargs.get("softcap") is None
              and not kwargs.get("output_attentions") and dim % 8 == 0 and key.shape[2] > 0
              and key.stride(-1) == 1 and value.stride(-1) == 1 and not torch.is_grad_enabled()
              and heads % key.shape[1] == 0)
    mask = _one_row_mask(attention_mask, key.shape[2]) if simple else False
    library = _library(_cache_dir()) if mask is not False else None
    if library is None:
        return sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q = query.reshape(heads, dim).contiguous()
    out = torch.empty(1, 1, heads, dim)  # (batch, q_len, heads, dim), as sdpa_attention_forward returns it
    scale = scaling if scaling is not None else dim ** -0.5
    failed = library.attend_one(q.data_ptr(), heads, key.shape[1], dim, key.shape[2], key.data_ptr(), key.stride(1),
                                key.stride(2), value.data_ptr(), value.stride(1), value.stride(2),
                                mask.data_ptr() if mask is not None else None, scale, out.data_ptr())
    if failed:
        raise MemoryError("one-token attention: out of memory") if failed == -1 else ValueError("attend_one: bad arguments")
    return out, None


def register() -> str:
    """Make "polar_sdpa" an attention implementation transformers knows (idempotent); returns the name."""
    return register_attention(NAME, polar_sdpa)
