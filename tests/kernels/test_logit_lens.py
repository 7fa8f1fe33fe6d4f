"""Fused logit lens: Triton vs chunked torch reference vs the materialized oracle."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import logit_lens as L

# Per-dtype tolerances against the oracle. All paths share the RMSNorm and the
# bf16 rounding of its output; bf16 sums over d in a different order on tensor cores.
TOL = {torch.float32: dict(atol=2e-4, rtol=1e-4), torch.bfloat16: dict(atol=1e-3, rtol=1e-3)}

# (N, V, d, dtype, k, softcap, with_target, norm_offset): rows and vocab off the block sizes.
CASES = [
    (7, 1037, 48, torch.float32, 5, None, False, 0.0),
    (7, 1037, 48, torch.float32, 5, 30.0, True, 1.0),
    (13, 1037, 40, torch.bfloat16, 3, None, True, 0.0),
    (5, 777, 72, torch.bfloat16, 7, 15.0, True, 1.0),
    (37, 300, 16, torch.float32, 1, None, True, 0.0),
    (3, 49152, 32, torch.float32, 5, None, True, 0.0),  # the SmolLM2 vocabulary, few rows
]


def make_inputs(n, v, d, dtype, device="cpu", seed=0, with_target=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g) * 4
    norm_weight = 1 + 0.2 * torch.randn(d, generator=g)
    w = torch.randn(v, d, generator=g) * (3 / d ** 0.5)  # logits of std ~3: peaked, like a real lm_head
    target = torch.randint(0, v, (n,), generator=g) if with_target else None
    def to(t):
        return None if t is None else t.to(device)
    return to(hidden), to(norm_weight), w.to(device=device, dtype=dtype), to(target)


def full_logprobs(hidden, norm_weight, w, eps, norm_offset, softcap):
    """(N, V) float32 log-probs, for checking that returned ids carry their log-probs."""
    x = L.rms_norm(hidden, norm_weight, eps, norm_offset).to(w.dtype)
    return torch.log_softmax(L._softcap(L._logits_f32(x, w), softcap), dim=-1)


def check_lens(got, want, logp, dtype, has_target, close):
    """Compare a LensResult with the oracle's; top-k ids with tie tolerance."""
    tol = TOL[dtype]
    close("logsumexp", got.logsumexp, want.logsumexp, **tol)
    close("entropy", got.entropy, want.entropy, **tol)
    close("top_logprobs", got.top_logprobs, want.top_logprobs, **tol)
    if has_target:
        close("target_logprob", got.target_logprob, want.target_logprob, **tol)
    else:
        assert got.target_logprob is None
    assert got.top_ids.dtype == torch.int64 and got.top_logprobs.dtype == torch.float32
    assert torch.all(got.top_logprobs[:, :-1] >= got.top_logprobs[:, 1:]), "top_logprobs not sorted descending"
    ids = got.top_ids.cpu()
    assert ids.min() >= 0 and ids.max() < logp.shape[1]
    assert all(len(set(row)) == len(row) for row in ids.tolist()), "repeated id in a row's top-k"
    # Tie tolerant: an id may differ from the oracle's only if its log-prob matches.
    close("logprob at returned top_ids", logp.cpu().gather(1, ids), got.top_logprobs, **tol)


@pytest.mark.parametrize("n,v,d,dtype,k,softcap,with_target,norm_offset", CASES)
def test_triton_and_torch_match_materialized(n, v, d, dtype, k, softcap, with_target, norm_offset,
                                             triton_device, close):
    hidden, nw, w, tgt = make_inputs(n, v, d, dtype, triton_device, with_target=with_target)
    kw = dict(eps=1e-6, k=k, target_ids=tgt, norm_offset=norm_offset, softcap=softcap)
    want = L.logit_lens_materialized(hidden, nw, w, **kw)
    logp = full_logprobs(hidden, nw, w, 1e-6, norm_offset, softcap)
    for backend in ("triton", "torch"):
        got = kernels.fused_logit_lens(hidden, nw, w, backend=backend, **kw)
        check_lens(got, want, logp, dtype, with_target, close)


def test_ties_are_tolerated(triton_device, close):
    """Duplicated vocabulary rows give exact ties; any tied id is a right answer."""
    hidden, nw, w, tgt = make_inputs(6, 600, 32, torch.float32, triton_device)
    w[300:600] = w[0:300]  # every logit appears twice
    want = L.logit_lens_materialized(hidden, nw, w, eps=1e-5, k=4, target_ids=tgt)
    logp = full_logprobs(hidden, nw, w, 1e-5, 0.0, None)
    got = kernels.fused_logit_lens(hidden, nw, w, eps=1e-5, k=4, target_ids=tgt, backend="triton")
    check_lens(got, want, logp, torch.float32, True, close)
    assert torch.allclose(got.top_logprobs[:, 0], got.top_logprobs[:, 1]), "the top logit should be tied"


def test_strided_hidden(triton_device, close):
    """A non-contiguous (N, d) view, as sliced from a (steps, tokens, d) trace."""
    hidden, nw, w, _ = make_inputs(10, 500, 24, torch.float32, triton_device)
    hidden = torch.cat([hidden, hidden], dim=1)[:, ::2]  # (10, 24), stride (48, 2)
    assert not hidden.is_contiguous()
    want = L.logit_lens_materialized(hidden, nw, w, eps=1e-6)
    got = kernels.fused_logit_lens(hidden, nw, w, eps=1e-6, backend="triton")
    check_lens(got, want, full_logprobs(hidden, nw, w, 1e-6, 0.0, None), torch.float32, False, close)


def test_torch_path_memory_is_bounded_by_its_chunks(monkeypatch, close):
    """The CPU path must never build more than one (row chunk x vocab chunk) of logits."""
    monkeypatch.setattr(L, "TORCH_ROW_CHUNK", 64)
    monkeypatch.setattr(L, "TORCH_VOCAB_CHUNK", 512)
    shapes = []
    real = L._logits_f32
    monkeypatch.setattr(L, "_logits_f32", lambda x, w: shapes.append((x.shape[0], w.shape[0])) or real(x, w))
    hidden, nw, w, tgt = make_inputs(150, 3000, 16, torch.float32)
    got = L.logit_lens_torch(hidden, nw, w, eps=1e-6, k=5, target_ids=tgt, softcap=20.0)
    assert max(r * c for r, c in shapes) <= 64 * 512 < 150 * 3000
    assert sum(r * c for r, c in shapes) == 150 * 3000, "every logit computed exactly once"
    shapes.clear()
    want = L.logit_lens_materialized(hidden, nw, w, eps=1e-6, k=5, target_ids=tgt, softcap=20.0)
    check_lens(got, want, full_logprobs(hidden, nw, w, 1e-6, 0.0, 20.0), torch.float32, True, close)


def test_default_chunk_bound():
    """The default chunks keep a logits chunk at 8 MiB, whatever N and V are."""
    assert L.TORCH_ROW_CHUNK * L.TORCH_VOCAB_CHUNK * 4 <= 8 * 2 ** 20


def test_empty_rows():
    hidden, nw, w, _ = make_inputs(0, 100, 8, torch.float32)
    for fn in (L.logit_lens_torch, L.logit_lens_materialized):
        r = fn(hidden, nw, w, eps=1e-6, k=3, target_ids=torch.zeros(0, dtype=torch.long))
        assert r.top_ids.shape == (0, 3) and r.logsumexp.shape == (0,) and r.target_logprob.shape == (0,)


@pytest.mark.parametrize("change,message", [
    (dict(hidden=torch.zeros(2, 3, 8)), "hidden must be"),
    (dict(norm_weight=torch.ones(7)), "norm_weight must be"),
    (dict(lm_head_weight=torch.ones(50, 9)), "lm_head_weight must be"),
    (dict(k=51), "k must be"),
    (dict(target_ids=torch.tensor([0, 50])), r"target_ids must lie"),
    (dict(target_ids=torch.tensor([0.0, 1.0])), "target_ids must be"),
    (dict(softcap=0.0), "softcap must be"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise_one_clear_error(change, message, backend, request):
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    args = dict(hidden=torch.randn(2, 8), norm_weight=torch.ones(8), lm_head_weight=torch.randn(50, 8),
                eps=1e-6, k=5, target_ids=None, softcap=None)
    args = {name: (t.to(device) if isinstance(t, torch.Tensor) else t) for name, t in {**args, **change}.items()}
    with pytest.raises(ValueError, match=message):
        kernels.fused_logit_lens(backend=backend, **args)


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("POLAR_KERNELS", raising=False)
    assert kernels.resolve_backend("auto", cpu) == "torch"
    assert kernels.resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("POLAR_KERNELS", "torch")
    assert kernels.resolve_backend("auto", cpu) == "torch"
    monkeypatch.setattr(kernels, "triton_interpreted", lambda: True)
    assert kernels.resolve_backend("triton", cpu) == "triton", "the keyword wins over the env var"
    monkeypatch.setenv("POLAR_KERNELS", "triton")
    assert kernels.resolve_backend("auto", cpu) == "triton"
    assert kernels.resolve_backend("torch", cpu) == "torch"
    monkeypatch.setattr(kernels, "triton_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        kernels.resolve_backend("triton", cpu)
    monkeypatch.setenv("POLAR_KERNELS", "cuda")
    with pytest.raises(ValueError, match="POLAR_KERNELS"):
        kernels.resolve_backend("auto", cpu)
    with pytest.raises(ValueError, match="backend must be"):
        kernels.resolve_backend("fast", cpu)


def test_dispatch_calls_the_chosen_implementation(monkeypatch):
    calls = []
    monkeypatch.setattr(L, "logit_lens_torch", lambda *a, **kw: calls.append("torch"))
    monkeypatch.setattr(L, "logit_lens_triton", lambda *a, **kw: calls.append("triton"))
    monkeypatch.setattr(kernels, "triton_interpreted", lambda: True)
    monkeypatch.delenv("POLAR_KERNELS", raising=False)
    args = (torch.randn(2, 8), torch.ones(8), torch.randn(50, 8))
    kernels.fused_logit_lens(*args, eps=1e-6)
    kernels.fused_logit_lens(*args, eps=1e-6, backend="triton")
    monkeypatch.setenv("POLAR_KERNELS", "triton")
    kernels.fused_logit_lens(*args, eps=1e-6)
    assert calls == ["torch", "triton", "triton"]


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
def test_kernels_in_fresh_interpreter_process():
    """Runs this folder under TRITON_INTERPRET=1 when this process imported `kernels` without it."""
    if torch.cuda.is_available() or kernels.triton_interpreted():
        pytest.skip("the Triton tests ran in this process")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).parent),
                           "-k", "not fresh_interpreter_process"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# ----------------------------------------------------------------------------
# GPU: the real shapes, compiled kernels
# ----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n,v,d,dtype,softcap,norm_offset", [
    (60 * 128, 49152, 576, torch.bfloat16, None, 0.0),  # SmolLM2-135M, 60 steps x 128 tokens
    (300, 5003, 256, torch.float32, 30.0, 1.0),
    (256, 128256, 3072, torch.bfloat16, 30.0, 1.0),  # Llama-3.2-3B vocabulary and width
])
def test_gpu_matches_oracle_and_stays_small(n, v, d, dtype, softcap, norm_offset, cuda, close):
    hidden, nw, w, tgt = make_inputs(n, v, d, dtype, cuda)
    kw = dict(eps=1e-6, k=5, target_ids=tgt, norm_offset=norm_offset, softcap=softcap)
    kernels.fused_logit_lens(hidden, nw, w, **kw)  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = kernels.fused_logit_lens(hidden, nw, w, **kw)  # auto -> triton on CUDA
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # O(N d) for the normalized rows (+ a row chunk of fp32 temporaries), nothing like N x V.
    budget = n * d * 4 * 2 + 1024 * d * 4 * 3 + n * v * 4 / 64
    assert extra < budget, f"fused lens used {extra / 2**20:.1f} MiB, logits would be {n * v * 4 / 2**20:.0f} MiB"
    want = L.logit_lens_materialized(hidden, nw, w, **kw)
    check_lens(got, want, full_logprobs(hidden, nw, w, 1e-6, norm_offset, softcap), dtype, True, close)
    check_lens(L.logit_lens_torch(hidden, nw, w, **kw), want, full_logprobs(hidden, nw, w, 1e-6, norm_offset, softcap),
               dtype, True, close)
