"""Weight layouts that make decoding on a CPU faster, chosen by measurement.

Decoding multiplies one token's activations by every weight matrix: a
matrix-vector product, bound by how fast the weights stream from memory. How
fast that is depends on the BLAS and the CPU, and on how the matrix is laid
out: on the 2-core AMD EPYC hosts of this project, MKL streams a row-major
(out, in) float32 weight at ~7.5 GB/s but the same values stored input-major
at 11-16 GB/s (the tied 49152 x 576 LM head: 14.8 ms -> 6.8 ms per token).
On another CPU the order may flip, so the layout of each weight shape is
picked by timing both on the model's own weights at load time.

A relayout keeps every value; only the memory order changes (the weight
becomes a transposed view of an input-major copy), so the model computes the
same function. Results may differ in the last bits, as between any two BLAS
kernels; the identity invariant holds because the model's own `forward` and
the executor share the same modules.

Decisions are remembered per CPU, torch version, thread count, shape and
dtype in a small JSON file, so later loads skip the timing.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

SAMPLE = 8  # matrices timed per shape: distinct ones, so caches do not flatter either layout
ROUNDS = 3  # the fastest round counts
MARGIN = 0.9  # relayout only when clearly faster: near-ties are noise


def input_major(weight: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The same (out, in) matrix, stored input-major (strides (1, out)).

    Copied in blocks of rows: ~2x faster than one strided copy (the 113 MB LM
    head: 0.08 s instead of 0.15 s), which is most of what tuning adds to a load.
    """
    out_features, in_features = weight.shape
    stored = weight.new_empty((in_features, out_features))
    for start in range(0, out_features, block):
        stored[:, start : start + block].copy_(weight[start : start + block].t())
    return stored.t()


def is_input_major(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.stride() == (1, weight.shape[0])


def _seconds_per_product(weights: list[torch.Tensor]) -> float:
    x = torch.randn(1, weights[0].shape[1], dtype=weights[0].dtype)
    best = float("inf")
    with torch.inference_mode():
        F.linear(x, weights[0])  # first-call setup
        for _ in range(ROUNDS):
            started = time.perf_counter()
            for w in weights:
                F.linear(x, w)
            best = min(best, (time.perf_counter() - started) / len(weights))
    return best


def _linear_groups(model: torch.nn.Module) -> dict[tuple, list[torch.nn.Parameter]]:
    """Distinct plain Linear weights (tied ones once) grouped by (out, in, dtype).

    A weight multiplied as its GGUF codes (a cpu.packed.PackedLinear, a
    subclass) is left out: its one-token products never read the float32
    copy, so its layout buys nothing, and relaying Gemma's 671 MB tied LM
    head cost ~10 s per load."""
    groups: dict[tuple, list[torch.nn.Parameter]] = defaultdict(list)
    seen: set[int] = set()
    for module in model.modules():
        if type(module) is torch.nn.Linear and id(module.weight) not in seen:
            seen.add(id(module.weight))
            w = module.weight
            groups[(w.shape[0], w.shape[1], w.dtype)].append(w)
    return groups


def cpuinfo_field(name: str) -> str | None:
    """The first `name` field of /proc/cpuinfo (Linux), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def _decision_key(out_features: int, in_features: int, dtype: torch.dtype) -> str:
    return (f"{_cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"{out_features} x {in_features} {str(dtype).replace('torch.', '')}")


def _read_decisions(path: Path | None) -> dict[str, bool]:
    try:
        data = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: measure again
    return {k: v for k, v in data.items() if isinstance(v, bool)} if isinstance(data, dict) else {}


def _write_decisions(path: Path, decisions: dict[str, bool]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(decisions, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the timing at the next load


def _measure(weights: list[torch.nn.Parameter]) -> tuple[bool, str, list[torch.Tensor]]:
    """Time both layouts on a sample: (input-major faster?, label, the relaid sample)."""
    sample = weights[:SAMPLE]
    row_major = _seconds_per_product([w.data for w in sample])
    relaid = [input_major(w.data) for w in sample]
    col_major = _seconds_per_product(relaid)
    return col_major < MARGIN * row_major, f"{row_major * 1e6:.0f} -> {col_major * 1e6:.0f} us per token", relaid


@torch.no_grad()
def tune_cpu_layouts(model: torch.nn.Module, decisions_file: Path | None = None) -> dict[str, str]:
    """Store each Linear weight shape input-major where that multiplies one
    token faster on this CPU, timed now or read from `decisions_file`.
    Returns {"out x in": "input-major (...)" or "row-major (...)"} for the
    record; CPU weights only."""
    decisions = _read_decisions(decisions_file)
    known = dict(decisions)
    choices: dict[str, str] = {}
    for (out_features, in_features, dtype), weights in _linear_groups(model).items():
        if weights[0].device.type != "cpu" or any(is_input_major(w) for w in weights):
            continue
        key = _decision_key(out_features, in_features, dtype)
        relaid: list[torch.Tensor] = []
        if key in decisions:
            faster, label = decisions[key], "decided at an earlier load"
        else:
            faster, label, relaid = _measure(weights)
            decisions[key] = faster
        choices[f"{out_features} x {in_features}"] = ("input-major" if faster else "row-major") + f" ({label})"
        if faster:
            for i, w in enumerate(weights):
                w.data = relaid[i] if i < len(relaid) else input_major(w.data)
    if decisions_file is not None and decisions != known:
        _write_decisions(decisions_file, decisions)
    return choices
