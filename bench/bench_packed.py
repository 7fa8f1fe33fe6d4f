"""One token's worth of layer products: float32 weights vs their 4-bit codes.

    .venv/bin/python bench/bench_packed.py --threads 2 --out bench/results/packed.md

Multiplies `rows` input rows by all 210 layer weights of the default model (as
decoding does for one token, or a draft check for `rows` tokens), once with
the packed kernel (`polar_core.packed`) and once with the float32 weights in
the layouts chosen at load, interleaved, fastest of 5 rounds. This is what
sets `packed.MAX_ROWS`: the codes win while the product is bound by reading
weights; a prompt pass of many rows is a matrix product, where BLAS wins.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def seconds_per_token(modules, rows: int, rounds: int = 5) -> float:
    inputs = {m.in_features: torch.randn(1, rows, m.in_features) for m in modules}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(rounds):
            started = time.perf_counter()
            for m in modules:
                m(inputs[m.in_features])
            best = min(best, time.perf_counter() - started)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from polar_core import packed
    from polar_core.models import load_model
    from polar_core.packed import PackedLinear, float32_products

    lm = load_model()
    modules = [m for m in lm.model.modules() if type(m) is PackedLinear]
    if not modules:
        print(f"nothing packed on this machine: {lm.packing}")
        return 1
    lines = [
        "# Layer products of one token: 4-bit codes vs float32 weights",
        "",
        f"Command: `.venv/bin/python bench/bench_packed.py --threads {args.threads}`",
        "",
        f"- model: {lm.name}, {len(modules)} packed layer weights ({lm.packing}); CPU: "
        f"{platform.processor() or platform.machine()}, torch threads {args.threads} (the kernel uses one)",
        "- time to multiply `rows` rows by every layer weight once, fastest of 5 rounds, codes and float32 interleaved",
        "",
        "| rows | float32 (ms) | codes (ms) | codes / float32 |",
        "|---:|---:|---:|---:|",
    ]
    limit, packed.MAX_ROWS = packed.MAX_ROWS, 1 << 20  # measure the codes beyond the limit too
    for rows in (1, 2, 4, 8, 16, 32):
        codes = seconds_per_token(modules, rows)
        with float32_products(lm.model):
            dense = seconds_per_token(modules, rows)
        codes = min(codes, seconds_per_token(modules, rows))
        note = "" if rows <= limit else f" (above MAX_ROWS = {limit}: float32 is used)"
        lines.append(f"| {rows} | {dense * 1e3:.1f} | {codes * 1e3:.1f} | {codes / dense:.2f}{note} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
