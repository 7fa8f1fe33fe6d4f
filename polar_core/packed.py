"""Weights kept as their 4-bit codes, so decoding on a CPU reads 1/6 of the bytes.

The embedded default model ships as a Q4_1 GGUF: every Linear weight of its
layers is, exactly, a 4-bit code times a scale plus a minimum per block of 32
inputs. transformers dequantizes it to float32, and a one-token
matrix-vector product then streams 4 bytes per weight from memory: that, not
arithmetic, bounds decoding on a laptop CPU. This module finds those codes
again in the float32 weights (and checks that they give back every weight
bit for bit), and multiplies with them directly (`csrc/q4_linear.c`: 0.5 byte
per weight plus a scale and a minimum per 32).

The model stays the same function with the same weights: the float32
`weight` is kept (prompt passes of more than MAX_ROWS tokens and everything
that reads weights use it), and a packed product differs from the float32 one only
in the rounding of a different summation order, as between any two BLAS
kernels. The model's own `forward` and the executor share the modules, so the
identity program still equals the unmodified model.

The kernel is C compiled at the first load with the system compiler
(`$CC`, default `cc`) for this CPU (x86-64 with AVX2 and FMA) and cached; without
a compiler or on another CPU the weights simply stay float32.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

BLOCK = 32  # inputs per scale and minimum (Q4_1)
TILE = 32  # outputs per tile of the packed layout (see csrc/q4_linear.c)
# Products of at most this many rows use the codes; longer prompt passes are
# matrix-matrix products, where BLAS on float32 catches up (bench/bench_packed.py
# on a 2-core EPYC, all layer weights once: 1 row 9 vs 36 ms, 16 rows 53 vs
# 86 ms, 32 rows 101 vs 95 ms).
MAX_ROWS = 16
SOURCE = Path(__file__).parent / "csrc" / "q4_linear.c"


@dataclass(frozen=True)
class Q4Codes:
    """A weight (out, in) as W[n, k] = scales[n, k // 32] * codes[n, k] + mins[n, k // 32]."""
    codes: torch.Tensor  # (out, in) uint8, 0..15
    scales: torch.Tensor  # (out, in // 32) float32
    mins: torch.Tensor  # (out, in // 32) float32

    def weight(self) -> torch.Tensor:
        """The float32 weight the codes stand for."""
        expand = lambda t: t.repeat_interleave(BLOCK, dim=1)  # noqa: E731
        return expand(self.scales) * self.codes.float() + expand(self.mins)


@torch.no_grad()
def find_q4_codes(weight: torch.Tensor) -> Q4Codes | None:
    """The 4-bit codes that give back `weight` exactly, or None when there are none.

    Q4_1 stores per block of 32 a float16 scale d and minimum m with
    d = (max - min) / 15, so the block minimum is m and the codes are
    round((w - m) / d). The result is accepted only if d * q + m equals every
    weight exactly, without rounding (checked with the error term of the sum),
    so the packed kernel multiplies by the very same numbers.
    """
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % BLOCK or weight.shape[0] % TILE:
        return None
    out_features, in_features = weight.shape
    blocks = weight.contiguous().view(out_features, in_features // BLOCK, BLOCK)
    low, high = blocks.aminmax(dim=-1)
    scales = ((high - low) / 15).half().float()
    if not torch.equal(low.half().float(), low) or not torch.isfinite(scales).all():
        return None
    step = torch.where(scales > 0, scales, 1.0)[..., None]
    codes = ((blocks - low[..., None]) / step).round_().clamp_(0, 15)
    scaled = codes * scales[..., None]  # exact: a 4-bit code times an 11-bit scale
    total = scaled + low[..., None]
    if not torch.equal(total, blocks):
        return None
    # The error term of total = scaled + low (Knuth's two-sum) is zero only if the sum was exact.
    back = total - scaled
    if ((scaled - (total - back)) + (low[..., None] - back)).any():
        return None
    return Q4Codes(codes.to(torch.uint8).view(out_features, in_features), scales, low)


def packed_layout(q: Q4Codes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and minimums in the tiled order the kernel reads (see the C source)."""
    out_features, in_features = q.codes.shape
    tiles = out_features // TILE
    halves = q.codes.view(tiles, 2, TILE // 2, in_features).permute(0, 3, 1, 2)  # (tile, in, half, 16)
    codes = (halves[:, :, 0, :] | (halves[:, :, 1, :] << 4)).contiguous()  # (tile, in, 16)

    def per_tile(t: torch.Tensor) -> torch.Tensor:
        return t.view(tiles, TILE, in_features // BLOCK).transpose(1, 2).contiguous()  # (tile, block, 32)

    return codes, per_tile(q.scales), per_tile(q.mins)


# -- the compiled kernel ------------------------------------------------------------

_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]


def _library_path(cache_dir: Path) -> Path:
    key = "|".join([SOURCE.read_text(), *_FLAGS, os.environ.get("CC", "cc"), platform.machine(), _cpu_flags()])
    return cache_dir / f"q4_linear-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [os.environ.get("CC", "cc"), *_FLAGS, str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"{cmd[0]} failed")
        os.replace(tmp, target)  # atomic: a concurrent loader never sees half a library
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def load_kernel(cache_dir: Path) -> tuple[object | None, str]:
    """(the compiled `q4_linear` function or None, why not) for this CPU."""
    path = _library_path(cache_dir)
    try:
        if not path.is_file():
            _compile(path)
        function = ctypes.CDLL(str(path)).q4_linear
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"no packed kernel ({err}); float32 weights"
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    function.argtypes = [pointer, integer, integer, integer, pointer, pointer, pointer, pointer]
    function.restype = None
    return function, ""


# -- the module ---------------------------------------------------------------------


class PackedLinear(torch.nn.Linear):
    """A Linear that multiplies a few rows with its weight's 4-bit codes.

    Made by `pack_linears` from a plain Linear (its class is switched in
    place, so parameter names, the float32 weight and hooks stay); products
    of more rows, other dtypes or devices, and autograd use the weight.
    """

    kernel = None  # the compiled function (one per process), set by pack_linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (not 0 < rows <= MAX_ROWS or x.dtype != torch.float32 or x.device.type != "cpu"
                or (torch.is_grad_enabled() and x.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features).contiguous()
        y = torch.empty(rows, self.out_features)
        self.kernel(flat.data_ptr(), rows, self.in_features, self.out_features, self.q4_codes.data_ptr(),
                    self.q4_scales.data_ptr(), self.q4_mins.data_ptr(), y.data_ptr())
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)


@dataclass(frozen=True)
class PackingReport:
    packed: int  # Linear modules now multiplying with codes
    kept: int  # Linear modules left float32 (no exact codes: tied LM head, other formats)
    note: str  # why nothing was packed, when nothing was

    def __str__(self) -> str:
        if self.note:
            return self.note
        return f"{self.packed} of {self.packed + self.kept} Linear weights as exact 4-bit codes"


@torch.no_grad()
def pack_linears(model: torch.nn.Module, cache_dir: Path) -> PackingReport:
    """Give every CPU float32 Linear whose weight is exactly 4-bit codes the packed kernel."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    kernel, why_not = load_kernel(cache_dir)
    if kernel is None:
        return PackingReport(0, len(linears), why_not)
    PackedLinear.kernel = kernel  # a class attribute: deep copies of a model stay possible
    packed = 0
    for module in linears:
        weight = module.weight
        q = find_q4_codes(weight) if weight.device.type == "cpu" else None
        if q is None:
            continue
        for name, tensor in zip(("q4_codes", "q4_scales", "q4_mins"), packed_layout(q)):
            module.register_buffer(name, tensor, persistent=False)
        module.__class__ = PackedLinear
        packed += 1
    note = "" if packed else "no Linear weight is exact 4-bit codes; float32 weights"
    return PackingReport(packed, len(linears) - packed, note)


@contextlib.contextmanager
def float32_products(model: torch.nn.Module):
    """Multiply with the float32 weights inside the block (for side-by-side timings and tests)."""
    switched = [m for m in model.modules() if type(m) is PackedLinear]
    for m in switched:
        m.__class__ = torch.nn.Linear
    try:
        yield
    finally:
        for m in switched:
            m.__class__ = PackedLinear
