"""Float32 products of many rows: PyTorch's linear (MKL) vs oneDNN's, with the model's own weights.

What `polar_core.engine.cpu.packed.onednn_products` changes: a product of more
rows than the packed codes' max_rows (prompt passes, teacher forcing) goes
through oneDNN with the weight packed once, instead of `torch.nn.functional.linear`.
For each weight shape of the default model (one layer's, and the LM head)
and row count, both are timed interleaved, fastest of 5, one thread:

    OMP_NUM_THREADS=1 python bench/bench_onednn.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polar_core.engine.cpu.layout import cpuinfo_field  # noqa: E402
from polar_core.engine.cpu.packed import onednn_available  # noqa: E402
from polar_core.engine.models import load_model  # noqa: E402

ROWS = (32, 256, 2048)


def fastest(fn, rounds: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> int:
    if not onednn_available():
        print("this torch has no oneDNN linear")
        return 1
    torch.set_num_threads(1)
    lm = load_model("smollm2-135m-instruct")
    layer = lm.adapter.layers[0]
    weights = {name: module.weight.detach() for name, module in
               (("q_proj", layer.self_attn.q_proj), ("k_proj", layer.self_attn.k_proj),
                ("gate_proj", layer.mlp.gate_proj), ("down_proj", layer.mlp.down_proj))}
    print(f"{cpuinfo_field('model name')}, torch {torch.__version__}, 1 thread, load "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print("| weight (out x in) | rows | MKL ms | oneDNN ms | oneDNN / MKL | GFLOP/s MKL | GFLOP/s oneDNN |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name, w in weights.items():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            for rows in ROWS:
                x = torch.randn(rows, w.shape[1])
                torch.testing.assert_close(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                                           F.linear(x, w), rtol=1e-4, atol=1e-4)
                mkl = fastest(lambda: F.linear(x, w))
                dnn = fastest(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
                flops = 2 * rows * w.shape[0] * w.shape[1]
                print(f"| {name} ({w.shape[0]} x {w.shape[1]}) | {rows} | {mkl * 1e3:.2f} | {dnn * 1e3:.2f} | "
                      f"{dnn / mkl:.2f} | {flops / mkl / 1e9:.0f} | {flops / dnn / 1e9:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
