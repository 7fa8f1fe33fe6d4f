"""Triton kernels for trace analysis, each with a torch reference of the same signature.

``fused_logit_lens`` and ``cosine_similarity_matrix`` choose a backend once per
call, from their arguments alone:

1. the ``backend`` keyword when it is "torch" or "triton";
2. else the environment variable ``POLAR_KERNELS`` (torch | triton | auto);
3. else auto: Triton when every input is on CUDA and triton imports, torch otherwise.

Forcing "triton" on CPU tensors needs ``TRITON_INTERPRET=1`` set before this
package is imported (the tests do so): triton decides at decoration time
whether a kernel is compiled or interpreted. Kernels know nothing of models.
"""
from __future__ import annotations

import os

import torch

from . import cosine, logit_lens
from .logit_lens import LensResult, logit_lens_materialized

__all__ = [
    "BACKENDS", "HAS_TRITON", "LensResult", "cosine_similarity_matrix", "fused_logit_lens",
    "logit_lens_materialized", "resolve_backend", "triton_interpreted",
]

BACKENDS = ("auto", "torch", "triton")
HAS_TRITON = logit_lens.triton is not None


def triton_interpreted() -> bool:
    """True when the kernels were built for triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return all(isinstance(k, InterpretedFunction) for k in (logit_lens._lens_kernel, cosine._cosine_kernel))


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """'torch' or 'triton' for these inputs; see the module docstring for the rules."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("POLAR_KERNELS", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"POLAR_KERNELS must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if HAS_TRITON and on_cuda else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend 'triton' was asked for, but triton does not import")
        if not on_cuda and not triton_interpreted():
            raise RuntimeError("backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
                               "before `kernels` is first imported (CPU interpreter)")
    return backend


def fused_logit_lens(hidden, norm_weight, lm_head_weight, *, eps: float, k: int = 5, target_ids=None,
                     norm_offset: float = 0.0, softcap: float | None = None, backend: str = "auto") -> LensResult:
    """RMSNorm + lm_head + log-softmax stats per row, never holding (N, V) logits.

    Args:
        hidden: (N, d) hidden states, any float dtype.
        norm_weight: (d,) final RMSNorm weight; the scale is norm_offset + weight.
        lm_head_weight: (V, d) unembedding; the matmul runs in its dtype, fp32 accumulate.
        eps: RMSNorm epsilon. k: top-k size. target_ids: (N,) ids to score, or None.
        softcap: final logit softcap (Gemma-2), or None.
    Returns:
        LensResult with (N,) logsumexp/entropy/target_logprob and (N, k) top ids/log-probs.
    """
    tensors = [hidden, norm_weight, lm_head_weight] + ([target_ids] if target_ids is not None else [])
    impl = {"triton": logit_lens.logit_lens_triton, "torch": logit_lens.logit_lens_torch}
    return impl[resolve_backend(backend, *tensors)](
        hidden, norm_weight, lm_head_weight, eps=eps, k=k, target_ids=target_ids,
        norm_offset=norm_offset, softcap=softcap)


def cosine_similarity_matrix(x: torch.Tensor, *, eps: float = 1e-8, backend: str = "auto") -> torch.Tensor:
    """(B, S, d) -> (B, S, S) float32 cosine similarity between the S rows of each batch."""
    impl = {"triton": cosine.cosine_similarity_triton, "torch": cosine.cosine_similarity_torch}
    return impl[resolve_backend(backend, x)](x, eps=eps)
