"""Kernel tests run Triton on CUDA when there is one, else in triton's CPU interpreter.

triton decides at decoration time (when `kernels` is imported) whether a kernel
is compiled or interpreted, so TRITON_INTERPRET must be set before that import.
If something imported `kernels` earlier in this process without it, the
in-process Triton tests skip and `test_kernels_in_fresh_interpreter_process`
runs them in a subprocess instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kernels  # noqa: E402

NOT_INTERPRETED = ("kernels was imported before TRITON_INTERPRET=1 was set; "
                   "test_kernels_in_fresh_interpreter_process runs these tests in a subprocess")


def triton_runs_in_process() -> bool:
    return kernels.HAS_TRITON and (torch.cuda.is_available() or kernels.triton_interpreted())


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Where the Triton backend runs here: 'cuda', or 'cpu' under the interpreter."""
    if not kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    if not kernels.triton_interpreted():
        pytest.skip(NOT_INTERPRETED)
    return "cpu"


@pytest.fixture(scope="session")
def cuda() -> str:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    return "cuda"


@pytest.fixture(scope="session")
def close():
    """The `assert_close` below, for test modules (importlib mode cannot import conftest)."""
    return assert_close


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    """allclose that names the rows where values differ."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = ~torch.isclose(got, want, atol=atol, rtol=rtol)
    if bad.any():
        where = bad.nonzero()[:8].tolist()
        lines = [f"  at {tuple(i)}: got {got[tuple(i)].item():.6g} want {want[tuple(i)].item():.6g}" for i in where]
        diff = (got - want).abs().max().item()
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} values differ (max abs diff {diff:.3g}, "
                             f"atol={atol}, rtol={rtol})\n" + "\n".join(lines))
