"""Fused logit lens vs the materializing torch version: time and peak memory.

    python bench/bench_logit_lens.py --device cpu     # each variant in a fresh process, peak RSS
    python bench/bench_logit_lens.py --device cuda    # one process, torch.cuda peak memory

Default shape: 60 steps x 128 tokens = 7680 rows, SmolLM2 vocabulary (49152)
and width (576), random weights. `--preset llama3b` uses d=3072, V=128256.
Prints a markdown table; ratios are materialized / variant from the same run.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from kernels import logit_lens as L  # noqa: E402

PRESETS = {"smollm2": dict(vocab=49152, hidden=576), "llama3b": dict(vocab=128256, hidden=3072)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_inputs(n, v, d, dtype, device):
    """Random inputs built in their final dtype, so no transient copy inflates the peak."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, generator=g, device=device)
    norm_weight = torch.ones(d, device=device)
    w = torch.randn(v, d, generator=g, device=device, dtype=dtype).mul_(3 / d ** 0.5)
    target = torch.randint(0, v, (n,), generator=g, device=device)
    return hidden, norm_weight, w, target


def variant_fn(name):
    fns = {
        "fused-triton": lambda *a, **kw: kernels.fused_logit_lens(*a, backend="triton", **kw),
        "fused-torch": lambda *a, **kw: kernels.fused_logit_lens(*a, backend="torch", **kw),
        "materialized": L.logit_lens_materialized,
    }
    return fns[name]


def worker_cpu(args) -> dict:
    """One variant in this (fresh) process: peak RSS increase of the first call, then timings."""
    torch.manual_seed(0)
    inputs = make_inputs(args.rows, args.vocab, args.hidden, DTYPES[args.dtype], "cpu")
    fn = variant_fn(args.worker)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    fn(*inputs[:3], eps=1e-6, k=5, target_ids=inputs[3])
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    times = [first]
    for _ in range(args.repeats - 1):
        t0 = time.perf_counter()
        fn(*inputs[:3], eps=1e-6, k=5, target_ids=inputs[3])
        times.append(time.perf_counter() - t0)
    return dict(variant=args.worker, time_s=statistics.median(times), peak_mib=peak / 1024, threads=torch.get_num_threads())


def run_cpu(args) -> list[dict]:
    rows = []
    for variant in ("fused-torch", "materialized"):
        cmd = [sys.executable, __file__, "--worker", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("rows", "vocab", "hidden", "dtype", "repeats")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def run_cuda(args) -> list[dict]:
    inputs = make_inputs(args.rows, args.vocab, args.hidden, DTYPES[args.dtype], "cuda")
    rows = []
    for variant in ("fused-triton", "fused-torch", "materialized"):
        fn = variant_fn(variant)
        call = lambda: fn(*inputs[:3], eps=1e-6, k=5, target_ids=inputs[3])  # noqa: E731
        call()  # compile / warm up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        rows.append(dict(variant=variant, time_s=statistics.median(times), peak_mib=peak / 2 ** 20))
    return rows


def table(rows, args, device) -> str:
    base = next(r for r in rows if r["variant"] == "materialized")
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak_label = "peak CUDA alloc over inputs" if device == "cuda" else "peak RSS increase (fresh process)"
    head = (f"N={args.rows} rows, V={args.vocab}, d={args.hidden}, lm_head {args.dtype}, k=5, with targets; "
            f"{where}; median of {args.repeats}\n\n"
            f"| variant | time (ms) | {peak_label} (MiB) | time ratio materialized/variant | memory ratio |\n"
            "|---|---:|---:|---:|---:|\n")
    lines = [f"| {r['variant']} | {r['time_s'] * 1e3:.1f} | {r['peak_mib']:.1f} | "
             f"{base['time_s'] / r['time_s']:.2f}x | {base['peak_mib'] / max(r['peak_mib'], 1e-3):.1f}x |" for r in rows]
    return head + "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=list(PRESETS), default="smollm2")
    p.add_argument("--rows", type=int, default=60 * 128, help="steps x tokens")
    p.add_argument("--vocab", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--dtype", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    for key, value in PRESETS[args.preset].items():
        setattr(args, key, getattr(args, key) or value)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.worker:
        print(json.dumps(worker_cpu(args)))
        return
    rows = run_cuda(args) if args.device == "cuda" else run_cpu(args)
    print(table(rows, args, args.device))


if __name__ == "__main__":
    main()
