"""Weights kept as the codes of the embedded GGUF, so decoding on a CPU reads ~1/5 of the bytes.

The embedded default model ships as a GGUF file: every layer weight is Q4_1
(per block of 32 inputs, a 4-bit code times a float16 scale plus a float16
minimum) and the tied embedding / LM head is Q8_0 (an 8-bit code times a
float16 scale). transformers dequantizes them to float32, and a one-token
matrix-vector product then streams 4 bytes per weight from memory: that, not
arithmetic, bounds decoding on a laptop CPU. This module finds the codes
again in the float32 weights, accepts them only if they give back every
weight exactly, and multiplies with them directly (`csrc/packed_linear.c`:
0.625 byte per weight for Q4_1, 1.0625 for Q8_0, float16 scales as in the
file). `find_q4_codes` and `packed_layout` are the torch reference of the C
`q4_pack`.

Gemma 3 270M's file holds other formats (Q5_0, Q4_K, Q6_K layer weights, a
Q8_0 LM head). Their weights are found as exact grids of 8-bit codes with a
float32 scale (and minimum, for Q4_K) per 16 inputs: formats "i8x16" and
"i8x16m", `csrc/packed_int8x16.c`, 1.25 / 1.5 bytes per weight.

The model stays the same function with the same weights: the float32
`weight` is kept (prompt passes longer than a format's `max_rows`, the logit lens
and everything else that reads weights use it; the program search's many-row
products multiply it through oneDNN, see `onednn_products`), and a packed product differs
from the float32 one only in the rounding of a different summation order, as
between two BLAS kernels. The model's own `forward` and the executor share
the modules, so the identity program still equals the unmodified model.

The kernels are C compiled at the first load with the system compiler
(`$CC`, default `cc`) for this CPU (x86-64 with AVX2, FMA, F16C) and cached;
without a compiler or on another CPU the weights simply stay float32.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from polar_core.engine.cpu.layout import cpuinfo_field

BLOCK = 32  # inputs per scale (and minimum), both formats
TILE = 32  # outputs per tile of the Q4_1 layout (see csrc/packed_linear.c)
SOURCE = Path(__file__).parent / "csrc" / "packed_linear.c"


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
        return t.view(tiles, TILE, in_features // BLOCK).transpose(1, 2).half().contiguous()  # (tile, block, 32)

    return codes, per_tile(q.scales), per_tile(q.mins)


# -- the compiled kernel ------------------------------------------------------------

_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")


def compile_flags(avx512: bool | None = None) -> tuple[str, ...]:
    """Compiler flags for this CPU. The C code uses AVX-512 where the CPU has it;
    `avx512=False` (default: POLAR_AVX512=0) keeps it to AVX2."""
    if avx512 is None:
        avx512 = os.environ.get("POLAR_AVX512", "1") != "0"
    return _FLAGS if avx512 else (*_FLAGS, "-DPOLAR_NO_AVX512")


def _library_path(cache_dir: Path, source: Path = SOURCE, flags: tuple[str, ...] = _FLAGS) -> Path:
    """Where the library built from `source` for this CPU is cached; the name
    hashes every C file beside it (a source may include another)."""
    cpu = cpuinfo_field("flags") or platform.processor()
    sources = [p.read_text() for p in sorted(source.parent.glob("*.c"))]
    key = "|".join([source.name, *sources, *flags, os.environ.get("CC", "cc"), platform.machine(), cpu])
    return cache_dir / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def kernels_expected() -> bool:
    """Whether the kernels must build here: a Linux CPU listing AVX2, FMA and
    F16C, and a C compiler on the PATH. The tests use it so that a broken
    build fails them instead of hiding behind a skip."""
    flags = set((cpuinfo_field("flags") or "").split())
    return {"avx2", "fma", "f16c"} <= flags and shutil.which(os.environ.get("CC", "cc")) is not None


def _compile(target: Path, source: Path = SOURCE, flags: tuple[str, ...] = _FLAGS) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [os.environ.get("CC", "cc"), *flags, str(source), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"{cmd[0]} failed"]
            raise OSError(next((line for line in lines if "error" in line), lines[-1]))
        os.replace(tmp, target)  # atomic: a concurrent loader never sees half a library
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def build_library(cache_dir: Path, source: Path = SOURCE, flags: tuple[str, ...] = _FLAGS) -> ctypes.CDLL:
    """The C library built from `source` for this CPU (compiled once, cached); raises OSError."""
    path = _library_path(cache_dir, source, flags)
    try:
        if not path.is_file():
            _compile(path, source, flags)
        return ctypes.CDLL(str(path))
    except subprocess.SubprocessError as err:
        raise OSError(str(err)) from err


@dataclass(frozen=True)
class CodeFormat:
    """How one GGUF format's codes are laid out for its kernel (see the C source)."""
    name: str  # "q4_1", "q8_0" (the GGUF formats), "i8x16", "i8x16m" (grids holding Q5_0, Q4_K, Q6_K)
    c_prefix: str  # its C functions are <c_prefix>_linear and <c_prefix>_pack
    tile: int  # outputs per tile
    code_dtype: torch.dtype
    has_mins: bool
    # Products of at most this many rows use the codes. The kernels are bound
    # by arithmetic once a tile is in cache, so each row adds its cost, while
    # BLAS on float32 reads the weights once for all rows: longer prompt passes
    # are faster there (bench/results/packed.md).
    max_rows: int
    scale_block: int = BLOCK  # inputs per scale (and minimum)
    # float16, as in the GGUF file: a product reads 0.625 byte per Q4_1 weight, not 0.75.
    scale_dtype: torch.dtype = torch.float16

    def buffers(self, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tiles = out_features // self.tile
        codes = torch.empty(tiles, in_features, 16, dtype=self.code_dtype)  # 16 bytes per input per tile
        scales = torch.empty(tiles, in_features // self.scale_block, self.tile, dtype=self.scale_dtype)
        return codes, scales, torch.empty_like(scales) if self.has_mins else torch.empty(0, dtype=self.scale_dtype)


# Tried in this order: the cheaper format first. The last two hold the
# K-quants and Q5_0 (csrc/packed_int8x16.c): 8-bit codes, float32 scale
# (and minimum) per 16 inputs, 1.25 (1.5) bytes per weight.
FORMATS = (CodeFormat("q4_1", "q4", 32, torch.uint8, True, max_rows=16),
           CodeFormat("q8_0", "q8", 16, torch.int8, False, max_rows=8),
           CodeFormat("i8x16", "i8x16", 16, torch.int8, False, max_rows=8, scale_block=16, scale_dtype=torch.float32),
           CodeFormat("i8x16m", "i8x16m", 16, torch.int8, True, max_rows=8, scale_block=16,
                      scale_dtype=torch.float32))


@dataclass(frozen=True)
class Kernel:
    """The compiled functions per format name: (linear, pack)."""
    functions: dict


@functools.lru_cache(maxsize=None)
def load_kernel(cache_dir: Path, avx512: bool | None = None) -> tuple[Kernel | None, str]:
    """(the compiled kernels or None, why not) for this CPU (see compile_flags)."""
    try:
        library = build_library(cache_dir, SOURCE, compile_flags(avx512))
    except OSError as err:
        return None, f"no packed kernel ({err}); float32 weights"
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    functions = {}
    for fmt in FORMATS:
        linear, pack = getattr(library, f"{fmt.c_prefix}_linear"), getattr(library, f"{fmt.c_prefix}_pack")
        linear.argtypes = [pointer, integer, integer, integer, pointer, pointer, pointer, pointer]
        pack.argtypes = [pointer, integer, integer, pointer, pointer, pointer]
        linear.restype = pack.restype = integer
        functions[fmt.name] = (linear, pack)
    return Kernel(functions), ""


def pack_weight(kernel: Kernel, weight: torch.Tensor) -> tuple[str, tuple[torch.Tensor, ...]] | None:
    """(format name, (codes, scales, mins)) for `weight`, or None when it is no format's exact codes.

    One pass in C per format tried (~0.4 s for the default model's 211
    weights, against ~2.6 s for the 210 Q4_1 ones with `find_q4_codes` +
    `packed_layout` in torch, which give the same bytes).
    """
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % BLOCK:
        return None
    out_features, in_features = weight.shape
    w = weight.contiguous()
    for fmt in FORMATS:
        if out_features % fmt.tile:
            continue
        tensors = fmt.buffers(out_features, in_features)
        pack = kernel.functions[fmt.name][1]
        if pack(w.data_ptr(), out_features, in_features, *(t.data_ptr() for t in tensors)):
            return fmt.name, tensors
    return None


# -- the module ---------------------------------------------------------------------


# Products of more rows than a format's max_rows (prompt passes, teacher forcing)
# use the float32 weight. PyTorch's float32 linear calls MKL, which on the AMD
# EPYC hosts of this project runs at ~100 GFLOP/s on one core (about AVX2's
# peak); oneDNN's product of the same weight, packed once into its blocked
# layout, runs 1.7-2.4x faster (bench/bench_onednn.py). Opt-in per thread and
# per block (`onednn_products`): the search's scoring uses it; everything else
# keeps MKL's rounding, so outputs elsewhere do not move in their last bits.
_ONEDNN = contextvars.ContextVar("polar_onednn_products", default=False)
# module -> ((weight storage, version), the weight packed for oneDNN). Kept beside
# the modules, not on them: oneDNN's tensors cannot be deep-copied with a model.
_ONEDNN_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def onednn_available() -> bool:
    """Whether this torch has oneDNN's packed-weight linear (the x86 CPU wheels do)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight"))


@contextlib.contextmanager
def onednn_products():
    """Inside the block, in this thread, packed Linears multiply many rows with oneDNN (see _ONEDNN).

    Only this thread's products change (a context variable, not the shared
    modules), so a model serving other requests is not affected. The first
    product of each weight packs it for oneDNN (a float32 copy, kept)."""
    token = _ONEDNN.set(onednn_available())
    try:
        yield
    finally:
        _ONEDNN.reset(token)


class PackedLinear(torch.nn.Linear):
    """A Linear that multiplies a few rows with its weight's codes.

    Made by `pack_linears` from a plain Linear (its class is switched in
    place, so parameter names, the float32 weight and hooks stay); products
    of more rows, other dtypes or devices, and autograd use the weight
    (through oneDNN inside `onednn_products`).
    """

    linear_kernels: dict = {}  # format name -> compiled product; per process, set by pack_linears
    code_format: str  # per module: a FORMATS name
    max_rows: int  # per module: its format's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (x.dtype != torch.float32 or x.device.type != "cpu" or rows == 0
                or (torch.is_grad_enabled() and x.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        if rows > self.max_rows:
            return self._onednn_product(x) if _ONEDNN.get() else F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features).contiguous()
        y = torch.empty(rows, self.out_features)
        failed = self.linear_kernels[self.code_format](
            flat.data_ptr(), rows, self.in_features, self.out_features, self.codes.data_ptr(),
            self.scales.data_ptr(), self.mins.data_ptr(), y.data_ptr())
        if failed:
            raise MemoryError("packed product: out of memory")
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def _onednn_product(self, x: torch.Tensor) -> torch.Tensor:
        # The packed copy is remembered with the weight it was made from
        # (storage and version), so a changed weight is packed again.
        key = (self.weight.data_ptr(), self.weight._version)
        cached = _ONEDNN_WEIGHTS.get(self)
        if cached is None or cached[0] != key:
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None))
            _ONEDNN_WEIGHTS[self] = cached
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), cached[1], self.bias, "none", [], "")


@dataclass(frozen=True)
class PackingReport:
    packed: dict  # format name -> Linear modules now multiplying with its codes
    kept: int  # Linear modules left float32 (no exact codes)
    note: str = ""  # why nothing was packed, when nothing was

    def __str__(self) -> str:
        if self.note:
            return self.note
        total = sum(self.packed.values())
        formats = ", ".join(f"{n} {name.upper()}" for name, n in self.packed.items())
        return f"{total} of {total + self.kept} Linear weights as exact codes ({formats})"


@torch.no_grad()
def pack_linears(model: torch.nn.Module, cache_dir: Path) -> PackingReport:
    """Give every CPU float32 Linear whose weight is exactly the codes of a FORMATS entry the packed kernel."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    kernel, why_not = load_kernel(cache_dir)
    if kernel is None:
        return PackingReport({}, len(linears), why_not)
    # A class attribute, not a module's: deep copies of a model stay possible.
    PackedLinear.linear_kernels = {name: functions[0] for name, functions in kernel.functions.items()}
    def find(module: torch.nn.Linear):
        return pack_weight(kernel, module.weight) if module.weight.device.type == "cpu" else None

    # The C packing releases the GIL: one weight per core at a time.
    with concurrent.futures.ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        found_per_module = list(pool.map(find, linears))
    packed: dict[str, int] = {}
    for module, found in zip(linears, found_per_module):
        if found is None:
            continue
        name, tensors = found
        module.max_rows = next(f.max_rows for f in FORMATS if f.name == name)
        for buffer, tensor in zip(("codes", "scales", "mins"), tensors):
            module.register_buffer(buffer, tensor, persistent=False)
        module.code_format = name
        module.__class__ = PackedLinear
        packed[name] = packed.get(name, 0) + 1
    kept = len(linears) - sum(packed.values())
    return PackingReport(packed, kept, "" if packed else "no Linear weight is exact codes; float32 weights")


@contextlib.contextmanager
def float32_products(model: torch.nn.Module):
    """Multiply with the float32 weights inside the block (for side-by-side timings and tests).

    It switches the shared modules, so every thread using the model sees it:
    not for a model that is serving requests."""
    switched = [m for m in model.modules() if type(m) is PackedLinear]
    for m in switched:
        m.__class__ = torch.nn.Linear
    try:
        yield
    finally:
        for m in switched:
            m.__class__ = PackedLinear
