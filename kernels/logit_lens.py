"""Fused logit lens: RMSNorm -> lm_head -> log-softmax statistics, without N x V logits.

Math, per row n of ``hidden`` (N, d), with W = ``lm_head_weight`` (V, d):

    x      = hidden[n].float()
    x      = x * rsqrt(mean(x^2) + eps) * (norm_offset + norm_weight)   # fp32 RMSNorm
    z      = x.to(W.dtype) @ W^T            # (V,), products in W's dtype, fp32 sum
    z      = softcap * tanh(z / softcap)    # only when softcap is given (Gemma-2)
    lse    = log(sum_v exp(z_v))
    top-k  = the k largest z_v, reported as log-probs z_v - lse, sorted descending
    target = z[target_id] - lse
    H      = -sum_v p_v log p_v = lse - sum_v p_v z_v,  p = softmax(z)

Llama/SmolLM2/Qwen use norm_offset=0.0; Gemma stores weight-1 and uses
norm_offset=1.0. Everything is streamed over vocabulary blocks with an online
log-sum-exp: a running max m, a rescaled sum s = sum exp(z - m) and a rescaled
t = sum exp(z - m) * z, so that lse = m + log s and sum p z = t / s.

Three implementations share one signature and return a ``LensResult``:
- ``logit_lens_triton``: a torch RMSNorm pre-pass (O(N d)), one Triton kernel
  (design in its docstring), and a tiny torch merge of per-split results.
- ``logit_lens_torch``: the same streaming algorithm in torch, chunked over
  rows and vocabulary so memory stays bounded (the CPU path).
- ``logit_lens_materialized``: the naive full-logits version, the test oracle
  and the benchmark baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without triton still has the torch paths
    triton = None

# Torch path chunk sizes: one logits chunk holds at most ROW x VOCAB fp32 values
# (8 MiB); a few temporaries of that size are alive at once.
TORCH_ROW_CHUNK = 256
TORCH_VOCAB_CHUNK = 8192


@dataclass
class LensResult:
    """Log-softmax statistics of the lens logits; all float32 except top_ids."""

    logsumexp: torch.Tensor  # (N,)
    top_ids: torch.Tensor  # (N, k) int64
    top_logprobs: torch.Tensor  # (N, k), sorted descending
    target_logprob: torch.Tensor | None  # (N,) or None without target_ids
    entropy: torch.Tensor  # (N,) nats


# ----------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _lens_kernel(
        x_ptr, w_ptr, tgt_ptr,  # (N, d) normalized rows in W's dtype, (V, d), (N,)
        stats_ptr,  # (4, S, N) fp32: max, sum exp, sum exp * z, target logit
        cand_val_ptr, cand_idx_ptr,  # (S, N, K) fp32 / int32 top-k candidates
        N, V, D, S,
        stride_xn, stride_xd, stride_wv, stride_wd,
        softcap,
        V_PER_SPLIT,  # vocabulary columns per split, a multiple of BLOCK_V
        K: tl.constexpr, KP: tl.constexpr,  # k and next power of two
        HAS_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        LOW_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,  # W not fp32; CPU interpreter
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program = BLOCK_N rows x one vocabulary split (several BLOCK_V blocks).

        Grid (cdiv(N, BLOCK_N), S): the row-block index varies fastest, so the
        programs running together read the same W split and share it in L2.
        Per vocab block: a (BLOCK_N, BLOCK_V) logits tile from tl.dot over d,
        the online log-sum-exp update, the target logit if it falls in the
        block, and a running top-k kept unsorted in a (BLOCK_N, KP) tile: up to
        K times, the block's argmax replaces the running minimum when larger.
        The block is skipped for top-k when no row's block max beats its
        running k-th value (most blocks, once the running top-k is good).
        Each split writes its partial stats and K candidates; the launcher
        merges the S splits in torch (S * K candidates per row, tiny).
        The RMSNorm is an O(N d) pre-pass in the launcher: normalizing inside
        the d loop would redo it for every vocab block and keep the A operand
        of tl.dot out of the pipelined load path.
        """
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        row_ok = rows < N
        dcols = tl.arange(0, BLOCK_D)

        if HAS_TARGET:
            tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        t = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        kcols = tl.arange(0, KP)
        # Padding slots (>= K) hold +inf so they are never the minimum to replace.
        top_v = tl.where(kcols[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BLOCK_N, KP), tl.float32)
        top_i = tl.zeros((BLOCK_N, KP), dtype=tl.int32)
        vcols = tl.arange(0, BLOCK_V)

        v_lo = pid_s * V_PER_SPLIT
        v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = v0 + vcols  # (BV,)
            col_ok = cols < V
            z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dk = d0 + dcols
                xs = tl.load(x_ptr + rows[:, None] * stride_xn + dk[None, :] * stride_xd,
                             mask=row_ok[:, None] & (dk[None, :] < D), other=0.0)  # (BN, BD)
                wt = tl.load(w_ptr + cols[None, :] * stride_wv + dk[:, None] * stride_wd,
                             mask=col_ok[None, :] & (dk[:, None] < D), other=0.0)  # (BD, BV)
                if LOW_PRECISION and not INTERPRETED:
                    z = tl.dot(xs, wt, z)  # bf16/fp16 tensor cores, fp32 accumulate
                else:
                    # fp32 without a silent tf32; also the interpreter's path, whose
                    # bf16 dot multiplies raw uint16 bits (bf16 products are exact in fp32).
                    z = tl.dot(xs.to(tl.float32), wt.to(tl.float32), z, input_precision="ieee")
            if HAS_SOFTCAP:
                # tanh(y) = sign(y) (1 - e) / (1 + e), e = exp(-2|y|) <= 1: no overflow.
                e = tl.exp(-2.0 * tl.abs(z) / softcap)
                z = tl.where(z < 0, -softcap, softcap) * (1.0 - e) / (1.0 + e)
            z = tl.where(col_ok[None, :], z, float("-inf"))

            # Online log-sum-exp; each block has >= 1 valid column, so m_new is finite.
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(z - m_new[:, None])  # 0 on invalid columns
            s = s * alpha + tl.sum(p, axis=1)
            t = t * alpha + tl.sum(p * tl.where(col_ok[None, :], z, 0.0), axis=1)
            m = m_new
            if HAS_TARGET:
                zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)

            # Top-k: only when some valid row's block max beats its running k-th value.
            kth = tl.min(top_v, axis=1)
            improves = (tl.max(z, axis=1) > kth) & row_ok
            if tl.max(improves.to(tl.int32), axis=0) > 0:
                work = z
                for _ in tl.static_range(K):
                    cv, ci = tl.max(work, axis=1, return_indices=True)  # (BN,)
                    kth, kpos = tl.min(top_v, axis=1, return_indices=True)
                    swap = (kcols[None, :] == kpos[:, None]) & (cv > kth)[:, None]
                    top_v = tl.where(swap, cv[:, None], top_v)
                    top_i = tl.where(swap, (v0 + ci)[:, None], top_i)
                    work = tl.where(vcols[None, :] == ci[:, None], float("-inf"), work)

        stat = stats_ptr + pid_s * N + rows
        tl.store(stat, m, mask=row_ok)
        tl.store(stat + S * N, s, mask=row_ok)
        tl.store(stat + 2 * S * N, t, mask=row_ok)
        if HAS_TARGET:
            tl.store(stat + 3 * S * N, zt, mask=row_ok)
        cand = (pid_s * N + rows)[:, None] * K + kcols[None, :]
        cand_ok = row_ok[:, None] & (kcols[None, :] < K)
        tl.store(cand_val_ptr + cand, top_v, mask=cand_ok)
        tl.store(cand_idx_ptr + cand, top_i, mask=cand_ok)


def _lens_config(n: int, v: int, device: torch.device) -> dict:
    """Block sizes and the number of vocabulary splits S for a launch."""
    if device.type == "cuda":
        # Picked on an H100 (7680 rows; d=576 and d=3072): 128 x 128 x 64 tiles,
        # 8 warps and 4 stages beat 64-row tiles by 20-30%.
        block_n = 128 if n > 64 else (64 if n > 32 else (32 if n > 16 else 16))
        cfg = dict(BLOCK_N=block_n, BLOCK_V=128, BLOCK_D=64, num_warps=8 if block_n >= 64 else 4, num_stages=4)
        # Enough programs to fill every SM twice over, even for a handful of rows.
        target_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        min_blocks = 4  # >= 512 columns per split keeps the (S, N, k) candidates << N x V
    else:  # the interpreter: big tiles mean fewer Python-level steps
        cfg = dict(BLOCK_N=16 if n <= 16 else 32, BLOCK_V=256, BLOCK_D=64)
        target_programs, min_blocks = 4, 1  # > 1 split, so CPU tests exercise the split merge
    n_vblocks = triton.cdiv(v, cfg["BLOCK_V"])
    grid_n = triton.cdiv(n, cfg["BLOCK_N"])
    splits = min(max(1, n_vblocks // min_blocks), max(1, triton.cdiv(target_programs, grid_n)))
    blocks_per_split = triton.cdiv(n_vblocks, splits)
    cfg["V_PER_SPLIT"] = blocks_per_split * cfg["BLOCK_V"]
    cfg["S"] = triton.cdiv(n_vblocks, blocks_per_split)  # no empty split
    cfg["grid"] = (grid_n, cfg["S"])
    return cfg


def logit_lens_triton(hidden, norm_weight, lm_head_weight, *, eps: float, k: int = 5, target_ids=None,
                      norm_offset: float = 0.0, softcap: float | None = None) -> LensResult:
    """Triton launcher: RMSNorm pre-pass, per-split partial stats from ``_lens_kernel``, torch merge."""
    _check_inputs(hidden, norm_weight, lm_head_weight, k, target_ids, softcap)
    (n, d), v = hidden.shape, lm_head_weight.shape[0]
    if n == 0:
        return _empty_result(hidden, k, target_ids)
    cfg = _lens_config(n, v, hidden.device)
    S, dev, kp = cfg.pop("S"), hidden.device, triton.next_power_of_2(k)
    stats = torch.empty((4, S, n), dtype=torch.float32, device=dev)
    cand_val = torch.empty((S, n, k), dtype=torch.float32, device=dev)
    cand_idx = torch.empty((S, n, k), dtype=torch.int32, device=dev)
    tgt = target_ids.contiguous() if target_ids is not None else stats  # dummy pointer
    x = normalized_rows(hidden, norm_weight, eps, norm_offset, lm_head_weight.dtype)  # (N, d)
    _lens_kernel[cfg.pop("grid")](
        x, lm_head_weight, tgt, stats, cand_val, cand_idx,
        n, v, d, S, x.stride(0), x.stride(1), lm_head_weight.stride(0), lm_head_weight.stride(1),
        float(softcap or 1.0),
        K=k, KP=kp, HAS_TARGET=target_ids is not None, HAS_SOFTCAP=softcap is not None,
        LOW_PRECISION=lm_head_weight.dtype != torch.float32, INTERPRETED=not x.is_cuda, **cfg,
    )
    return _merge_splits(stats, cand_val, cand_idx, k, target_ids is not None)


def _merge_splits(stats, cand_val, cand_idx, k: int, has_target: bool) -> LensResult:
    """Combine S partial (max, sum, sum*z, target) and S*k candidates per row."""
    m, s, t, zt = stats  # each (S, N)
    m_all = m.max(dim=0).values  # (N,)
    scale = torch.exp(m - m_all)  # (S, N)
    lse = m_all + torch.log((s * scale).sum(0))
    mean_z = (t * scale).sum(0) / (s * scale).sum(0)  # sum_v p_v z_v
    n = m.shape[1]
    vals = cand_val.permute(1, 0, 2).reshape(n, -1)  # (N, S*k)
    idx = cand_idx.permute(1, 0, 2).reshape(n, -1)
    top_z, pos = vals.topk(k, dim=1)
    return LensResult(
        logsumexp=lse,
        top_ids=idx.gather(1, pos).long(),
        top_logprobs=top_z - lse[:, None],
        target_logprob=zt.sum(0) - lse if has_target else None,  # one split holds the target
        entropy=lse - mean_z,
    )


# ----------------------------------------------------------------------------
# Torch reference (chunked) and the materialized oracle
# ----------------------------------------------------------------------------
def rms_norm(hidden, norm_weight, eps: float, norm_offset: float = 0.0) -> torch.Tensor:
    """(N, d) -> (N, d) float32: x * rsqrt(mean(x^2) + eps) * (norm_offset + weight)."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * (norm_offset + norm_weight.float())


def normalized_rows(hidden, norm_weight, eps: float, norm_offset: float, dtype) -> torch.Tensor:
    """rms_norm(...).to(dtype), row chunk by row chunk: fp32 temporaries stay O(chunk x d)."""
    out = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)  # (N, d)
    for r0, r1 in _chunks(hidden.shape[0], 4 * TORCH_ROW_CHUNK):
        out[r0:r1] = rms_norm(hidden[r0:r1], norm_weight, eps, norm_offset)
    return out


def _logits_f32(x, w) -> torch.Tensor:
    """(R, d) @ (C, d)^T -> (R, C) float32; x already in w's dtype; fp32 accumulate and output."""
    if w.dtype == torch.float32:
        return x @ w.T
    if w.is_cuda:
        try:  # cuBLAS: low-precision inputs, fp32 output, no upcast copy of w
            return torch.mm(x, w.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # older torch without out_dtype
            pass
    # bf16/fp16 products are exact in fp32, so the upcast matches tensor-core math.
    return x.float() @ w.float().T


def _softcap(z, softcap):
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, total)) for i in range(0, total, size)]


def logit_lens_torch(hidden, norm_weight, lm_head_weight, *, eps: float, k: int = 5, target_ids=None,
                     norm_offset: float = 0.0, softcap: float | None = None) -> LensResult:
    """Torch reference: the kernel's streaming algorithm over (row, vocab) chunks."""
    _check_inputs(hidden, norm_weight, lm_head_weight, k, target_ids, softcap)
    if hidden.shape[0] == 0:
        return _empty_result(hidden, k, target_ids)
    x = normalized_rows(hidden, norm_weight, eps, norm_offset, lm_head_weight.dtype)  # (N, d)
    parts = []
    for r0, r1 in _chunks(x.shape[0], TORCH_ROW_CHUNK):
        tgt = None if target_ids is None else target_ids[r0:r1]
        parts.append(_stream_rows(x[r0:r1], lm_head_weight, k, tgt, softcap))
    cat = [torch.cat(col) if col[0] is not None else None for col in zip(*parts)]
    return LensResult(*cat)


def _stream_rows(x, w, k, target_ids, softcap) -> tuple:
    """Online log-sum-exp, target and top-k for a (R, d) row chunk over vocab chunks."""
    r = x.shape[0]
    m = torch.full((r,), float("-inf"), device=x.device)
    s = torch.zeros(r, device=x.device)
    t = torch.zeros(r, device=x.device)
    zt = torch.zeros(r, device=x.device)
    top_z = torch.empty(r, 0, device=x.device)
    top_i = torch.empty(r, 0, dtype=torch.long, device=x.device)
    for v0, v1 in _chunks(w.shape[0], TORCH_VOCAB_CHUNK):
        z = _softcap(_logits_f32(x, w[v0:v1]), softcap)  # (R, C) fp32
        m_new = torch.maximum(m, z.max(dim=1).values)
        alpha = torch.exp(m - m_new)
        p = torch.exp(z - m_new[:, None])
        s = s * alpha + p.sum(1)
        t = t * alpha + (p * z).sum(1)
        m = m_new
        if target_ids is not None:
            hit = (target_ids >= v0) & (target_ids < v1)
            zt[hit] = z[hit, target_ids[hit] - v0]
        cz, ci = z.topk(min(k, v1 - v0), dim=1)
        top_z, pos = torch.cat([top_z, cz], 1).topk(min(k, top_z.shape[1] + cz.shape[1]), dim=1)
        top_i = torch.cat([top_i, ci + v0], 1).gather(1, pos)
    lse = m + torch.log(s)
    target = zt - lse if target_ids is not None else None
    return lse, top_i, top_z - lse[:, None], target, lse - t / s


def logit_lens_materialized(hidden, norm_weight, lm_head_weight, *, eps: float, k: int = 5, target_ids=None,
                            norm_offset: float = 0.0, softcap: float | None = None) -> LensResult:
    """Naive version holding the full (N, V) logits: the oracle and the benchmark baseline."""
    _check_inputs(hidden, norm_weight, lm_head_weight, k, target_ids, softcap)
    logits = lens_logits(hidden, norm_weight, lm_head_weight, eps=eps, norm_offset=norm_offset, softcap=softcap)
    return lens_from_logits(logits, k=k, target_ids=target_ids)


def lens_logits(hidden, norm_weight, lm_head_weight, *, eps: float, norm_offset: float = 0.0,
                softcap: float | None = None) -> torch.Tensor:
    """The full (N, V) float32 lens logits, computed as the fused kernels compute them."""
    x = rms_norm(hidden, norm_weight, eps, norm_offset).to(lm_head_weight.dtype)
    return _softcap(_logits_f32(x, lm_head_weight), softcap)


def lens_from_logits(logits: torch.Tensor, *, k: int = 5, target_ids=None) -> LensResult:
    """The lens statistics of (N, V) float32 logits."""
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits - lse[:, None]  # (N, V)
    top_lp, top_ids = logp.topk(k, dim=-1)
    target = logp.gather(1, target_ids[:, None].long())[:, 0] if target_ids is not None else None
    entropy = -(logp.exp() * logp).sum(-1)
    return LensResult(lse, top_ids, top_lp, target, entropy)


# ----------------------------------------------------------------------------
# Validation shared by all three
# ----------------------------------------------------------------------------
def _check_inputs(hidden, norm_weight, lm_head_weight, k, target_ids, softcap) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, d), got shape {tuple(hidden.shape)}")
    n, d = hidden.shape
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != d:
        raise ValueError(f"lm_head_weight must be (V, {d}), got shape {tuple(lm_head_weight.shape)}")
    if tuple(norm_weight.shape) != (d,):
        raise ValueError(f"norm_weight must be ({d},), got shape {tuple(norm_weight.shape)}")
    v = lm_head_weight.shape[0]
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, {v}], got {k}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    devices = {hidden.device, norm_weight.device, lm_head_weight.device}
    if target_ids is not None:
        devices.add(target_ids.device)
        if tuple(target_ids.shape) != (n,) or target_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"target_ids must be ({n},) int32/int64, got {tuple(target_ids.shape)} {target_ids.dtype}")
        if n and (target_ids.min() < 0 or target_ids.max() >= v):
            raise ValueError(f"target_ids must lie in [0, {v})")
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def _empty_result(hidden, k, target_ids) -> LensResult:
    z = hidden.new_zeros((0,), dtype=torch.float32)
    return LensResult(z, hidden.new_zeros((0, k), dtype=torch.long), hidden.new_zeros((0, k), dtype=torch.float32),
                      z if target_ids is not None else None, z)
