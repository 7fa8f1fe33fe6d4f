"""Step x step cosine similarity of hidden states, one Gram kernel per batch row.

Math, for x (B, S, d) and each batch b:

    u_i      = x[b, i].float() / max(||x[b, i]||_2, eps)    # fp32 row normalization
    out[b]   = U U^T                                        # (S, S), float32
    out[b, i, i] = 1 for every non-zero row; values clamped to [-1, 1]

Rounding can leave the Gram diagonal at 1 +- 1e-7 and entries just outside
[-1, 1]; both are fixed explicitly so that plots and thresholds can trust them.
A zero row has norm 0 < eps and gets similarity 0 with everything, itself too.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without triton still has the torch path
    triton = None


if triton is not None:

    @triton.jit
    def _cosine_kernel(
        x_ptr, out_ptr,  # (B, S, d) any float dtype, (B, S, S) fp32
        S, D, stride_xb, stride_xs, stride_xd, eps,
        LOW_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program = one (BLOCK_S x BLOCK_S) tile (ti, tj) of out[b], looping over d.

        The Gram tile <x_i, x_j> and the two row norms accumulate together in
        fp32 and are divided at the end, which equals normalizing first:
        (x_i / |x_i|) . (x_j / |x_j|) = <x_i, x_j> / (|x_i| |x_j|).
        The matrix is symmetric, so only tiles with tj >= ti work and each
        stores itself and its transpose: half the tiles, half the reads.
        """
        b = tl.program_id(0)
        ti = tl.program_id(1)
        tj = tl.program_id(2)
        if tj >= ti:
            ri = ti * BLOCK_S + tl.arange(0, BLOCK_S)  # (BS,) rows of the tile
            rj = tj * BLOCK_S + tl.arange(0, BLOCK_S)  # (BS,) columns of the tile
            x_b = x_ptr + b * stride_xb
            gram = tl.zeros((BLOCK_S, BLOCK_S), dtype=tl.float32)
            sq_i = tl.zeros((BLOCK_S,), dtype=tl.float32)
            sq_j = tl.zeros((BLOCK_S,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dk = d0 + tl.arange(0, BLOCK_D)
                a = tl.load(x_b + ri[:, None] * stride_xs + dk[None, :] * stride_xd,
                            mask=(ri[:, None] < S) & (dk[None, :] < D), other=0.0)  # (BS, BD)
                bt = tl.load(x_b + rj[None, :] * stride_xs + dk[:, None] * stride_xd,
                             mask=(rj[None, :] < S) & (dk[:, None] < D), other=0.0)  # (BD, BS)
                af = a.to(tl.float32)
                bf = bt.to(tl.float32)
                sq_i += tl.sum(af * af, axis=1)
                sq_j += tl.sum(bf * bf, axis=0)
                if LOW_PRECISION and not INTERPRETED:
                    gram = tl.dot(a, bt, gram)  # bf16/fp16 tensor cores, fp32 accumulate
                else:
                    # fp32 without tf32; also the interpreter's path, whose bf16
                    # dot multiplies raw bits (bf16 products are exact in fp32).
                    gram = tl.dot(af, bf, gram, input_precision="ieee")
            inv_i = 1.0 / tl.maximum(tl.sqrt(sq_i), eps)
            inv_j = 1.0 / tl.maximum(tl.sqrt(sq_j), eps)
            cos = gram * inv_i[:, None] * inv_j[None, :]
            cos = tl.minimum(tl.maximum(cos, -1.0), 1.0)
            diag = (ri[:, None] == rj[None, :]) & (sq_i[:, None] > 0)
            cos = tl.where(diag, 1.0, cos)
            ok = (ri[:, None] < S) & (rj[None, :] < S)
            out_b = out_ptr + b * S * S
            tl.store(out_b + ri[:, None] * S + rj[None, :], cos, mask=ok)
            tl.store(out_b + rj[None, :] * S + ri[:, None], cos, mask=ok)  # the mirror tile


def cosine_similarity_triton(x: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Triton launcher: (B, S, d) -> (B, S, S) float32."""
    _check_input(x)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        x = x.float()
    bsz, s, d = x.shape
    out = torch.empty((bsz, s, s), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    block_s = 64 if s > 32 else (32 if s > 16 else 16)  # tl.dot needs >= 16
    grid = (bsz, triton.cdiv(s, block_s), triton.cdiv(s, block_s))
    _cosine_kernel[grid](
        x, out, s, d, x.stride(0), x.stride(1), x.stride(2), float(eps),
        LOW_PRECISION=x.dtype != torch.float32, INTERPRETED=not x.is_cuda,
        BLOCK_S=block_s, BLOCK_D=64, num_warps=4,
    )
    return out


def cosine_similarity_torch(x: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Torch reference: (B, S, d) -> (B, S, S) float32."""
    _check_input(x)
    u = torch.nn.functional.normalize(x.float(), dim=-1, eps=eps)  # (B, S, d)
    out = (u @ u.transpose(1, 2)).clamp_(-1.0, 1.0)  # (B, S, S)
    nonzero = x.float().pow(2).sum(dim=-1) > 0  # (B, S), the kernel's test
    out.diagonal(dim1=1, dim2=2).masked_fill_(nonzero, 1.0)
    return out


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, S, d), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
