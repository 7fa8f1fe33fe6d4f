"""Load and decode costs of the embedded real models, each measured in fresh processes.

    .venv/bin/python bench/bench_models.py --models gemma3-270m smollm2-135m-instruct --repeats 3 \
        --out bench/results/models.md

Per model: the first load (an empty cache: assembling, parsing and
dequantizing the GGUF, writing the safetensors cache), then cached loads,
then a 32-token greedy answer under the full program with the model's CPU
speed-ups on (as loaded) and off (`POLAR_PACKED=0 POLAR_LEAN=0`: float32
weights), alternating, medians. Each figure comes from its own process, so
no run warms the next one's caches (other than the OS file cache).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polar_core.engine.cpu.layout import cpuinfo_field  # noqa: E402

PROMPT = "Q: What is the capital of Argentina?\nA: Buenos Aires\n\nQ: What is the capital of Greece?\nA:"
CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
started = time.perf_counter()
from polar_core.engine.models import load_model
from polar_core.engine.generate import Stopping, generate
lm = load_model(sys.argv[1], device="cpu")
loaded = time.perf_counter() - started
out = {"load_s": loaded, "packing": str(lm.packing), "lean": str(getattr(lm, "lean", None))}
if sys.argv[2] == "decode":
    generate(lm, [sys.argv[4]], None, max_new_tokens=4, chat=False)  # warm-up
    started = time.perf_counter()
    trace = generate(lm, [sys.argv[4]], None, max_new_tokens=32, chat=False, stopping=Stopping(at_eos=False))[0]
    out.update(answer_s=time.perf_counter() - started, tokens=len(trace.token_ids),
               prefill_s=trace.prefill_seconds, decode_s=trace.decode_seconds, text=trace.text[:40])
print("RESULT " + json.dumps(out))
"""


def child(model: str, what: str, threads: int, cache: str, fast: bool = True) -> dict:
    env = dict(os.environ, POLAR_CACHE_DIR=cache, HF_HUB_OFFLINE="1")
    if not fast:
        env.update(POLAR_PACKED="0", POLAR_LEAN="0")
    run = subprocess.run([sys.executable, "-c", CHILD, model, what, str(threads), PROMPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m-instruct"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = ["# Loading and decoding the embedded real models", "",
             f"Command: `python bench/{Path(__file__).name} {shlex.join(sys.argv[1:])}`", "",
             f"Host: {cpuinfo_field('model name')}, {os.cpu_count()} cores, {args.threads} torch threads, "
             f"load average {os.getloadavg()[0]:.1f} at the start. Medians of {args.repeats} fresh processes each; "
             "a 32-token greedy answer (full program, few-shot prompt, after a 4-token warm-up) with the CPU "
             "speed-ups as loaded and with float32 weights (`POLAR_PACKED=0 POLAR_LEAN=0`), alternating.", "",
             "| model | first load (empty cache) | cached load | 32-token answer, as loaded | 32 tokens, float32 | "
             "ratio | how it multiplies |", "|---|---:|---:|---:|---:|---:|---|"]
    for model in args.models:
        with tempfile.TemporaryDirectory(prefix="polar-bench-cache-") as cache:
            first = child(model, "load", args.threads, cache)["load_s"]
            cached, fast, slow, how = [], [], [], ""
            for _ in range(args.repeats):
                cached.append(child(model, "load", args.threads, cache)["load_s"])
                quick = child(model, "decode", args.threads, cache)
                fast.append(quick["answer_s"])
                slow.append(child(model, "decode", args.threads, cache, fast=False)["answer_s"])
                how = f"{quick['packing']}; lean step: {quick['lean']}"
        f, s = statistics.median(fast), statistics.median(slow)
        lines.append(f"| {model} | {first:.1f} s | {statistics.median(cached):.1f} s | {f:.2f} s | {s:.2f} s | "
                     f"{f / s:.2f}x | {how} |")
        print(lines[-1], flush=True)
    lines.append(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
