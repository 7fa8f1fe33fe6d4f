"""One token's worth of weight products: float32 weights vs their GGUF codes.

    .venv/bin/python bench/bench_packed.py --threads 2 --out bench/results/packed.md

Multiplies `rows` input rows by every packed weight of the default model once
(210 Q4_1 layer weights and the Q8_0 LM head: what decoding does for one
token, or a draft check for `rows` tokens), with the packed kernels
(`polar_core.engine.cpu.packed`) and with the float32 weights in the layouts chosen at
load, interleaved, fastest of 5 rounds. This is what
sets each format's `max_rows` (`polar_core.engine.cpu.packed.FORMATS`): the codes win while the product is bound by reading
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
    from polar_core.engine.cpu import packed
    from polar_core.engine.cpu.packed import PackedLinear, float32_products
    from polar_core.engine.models import load_model

    lm = load_model()
    modules = [m for m in lm.model.modules() if type(m) is PackedLinear]
    if not modules:
        print(f"nothing packed on this machine: {lm.packing}")
        return 1
    lines = [
        "# Weight products of one token: GGUF codes vs float32 weights",
        "",
        f"Command: `.venv/bin/python bench/bench_packed.py --threads {args.threads}`",
        "",
        f"- model: {lm.name}, {len(modules)} packed weights ({lm.packing}); CPU: "
        f"{platform.processor() or platform.machine()}, torch threads {args.threads} (the kernel uses one)",
        "- time to multiply `rows` rows by every packed weight once, fastest of 5 rounds, codes and float32 "
        "interleaved; the LM head alone in the last columns",
        "",
        "| rows | float32 (ms) | codes (ms) | codes / float32 | LM head float32 (ms) | LM head Q8_0 (ms) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    limits = {f.name: f.max_rows for f in packed.FORMATS}
    for m in modules:
        m.max_rows = 1 << 20  # measure the codes beyond the limits too
    head = [m for m in modules if m.code_format == "q8_0"]
    for rows in (1, 2, 4, 8, 16, 32):
        codes, head_codes = seconds_per_token(modules, rows), seconds_per_token(head, rows)
        with float32_products(lm.model):
            dense, head_dense = seconds_per_token(modules, rows), seconds_per_token(head, rows)
        codes, head_codes = min(codes, seconds_per_token(modules, rows)), min(head_codes, seconds_per_token(head, rows))
        note = "".join(f" (above {name}'s max_rows = {limit}: float32 is used)"
                       for name, limit in limits.items() if rows == 2 * limit)
        lines.append(f"| {rows} | {dense * 1e3:.1f} | {codes * 1e3:.1f} | {codes / dense:.2f}{note} "
                     f"| {head_dense * 1e3:.1f} | {head_codes * 1e3:.1f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
