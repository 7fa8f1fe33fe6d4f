"""Cosine similarity matrix: Triton vs torch reference vs a float64 oracle."""
import pytest
import torch

import kernels
from kernels import cosine as C

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1e-5),
       torch.float16: dict(atol=1e-5, rtol=1e-5)}  # inputs are exact in fp32, so all dtypes compare tightly


def oracle(x: torch.Tensor) -> torch.Tensor:
    u = x.double()
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return (u @ u.transpose(1, 2)).float()


def make_x(b, s, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 1, d, generator=g)
    x = base + 0.5 * torch.randn(b, s, d, generator=g).cumsum(1) / s ** 0.5  # a residual stream drifting over steps
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("b,s,d,dtype", [
    (2, 7, 33, torch.float32),
    (1, 60, 576, torch.float32),  # 60 steps of SmolLM2 hidden states
    (3, 17, 100, torch.bfloat16),
    (2, 70, 48, torch.float16),  # S over one 64-row tile
])
def test_triton_and_torch_match_oracle(b, s, d, dtype, triton_device, close):
    x = make_x(b, s, d, dtype, triton_device)
    want = oracle(x)
    for backend in ("triton", "torch"):
        got = kernels.cosine_similarity_matrix(x, backend=backend)
        assert got.dtype == torch.float32 and got.shape == (b, s, s)
        close(f"cosine[{backend}]", got, want, **TOL[dtype])
        assert torch.all(got.diagonal(dim1=1, dim2=2) == 1.0), "diagonal must be exactly 1"
        assert got.abs().max() <= 1.0
        close(f"cosine[{backend}] symmetry", got, got.transpose(1, 2), atol=1e-6, rtol=0)


def test_zero_row_and_strided_input(triton_device, close):
    """A zero row has similarity 0 with everything (diagonal too); strides are honoured."""
    x = make_x(2, 9, 40, torch.float32, triton_device)
    x[1, 4] = 0
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # (2, 9, 40) with batch stride 40
    assert not x.is_contiguous()
    for backend in ("triton", "torch"):
        got = kernels.cosine_similarity_matrix(x, backend=backend)
        assert torch.all(got[1, 4] == 0) and torch.all(got[1, :, 4] == 0)
        assert got[0, 4, 4] == 1.0
        close(f"cosine[{backend}]", got, oracle(x), atol=1e-5, rtol=1e-5)


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"\(B, S, d\)"):
        kernels.cosine_similarity_matrix(torch.randn(4, 8))
    with pytest.raises(ValueError, match="floating"):
        kernels.cosine_similarity_matrix(torch.ones(1, 4, 8, dtype=torch.long))


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("POLAR_KERNELS", raising=False)
    calls = []
    monkeypatch.setattr(C, "cosine_similarity_torch", lambda x, eps: calls.append("torch"))
    kernels.cosine_similarity_matrix(torch.randn(1, 3, 4))
    assert calls == ["torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_3b_width(dtype, cuda, close):
    """128 tokens x 60 steps x d=3072, the paper's 3B models."""
    x = make_x(128, 60, 3072, dtype, cuda)
    got = kernels.cosine_similarity_matrix(x)  # auto -> triton on CUDA
    close("cosine[gpu]", got, oracle(x), atol=1e-5, rtol=1e-5)
    close("cosine[gpu] vs torch", got, C.cosine_similarity_torch(x), atol=1e-5, rtol=1e-5)
