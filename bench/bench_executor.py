"""Executor speed on the default model, measured side by side in one run.

(a) identity program vs the model's own `generate`: time ratio, token equality;
(b) a program of half the layers vs the identity program: time ratio;
(c) second load of the default model (weights cached as safetensors), in a
    fresh process, timing `load_model` alone.

Variants are interleaved and repeated; medians are reported, so background
load hits every variant alike. Usage:
    .venv/bin/python bench/bench_executor.py [--repeats 7] [--out bench/results/executor.md]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polar_core.executor import encode_prompts, generate  # noqa: E402
from polar_core.models import DEFAULT_MODEL, load_model  # noqa: E402
from polar_core.program import Program  # noqa: E402

# ~70 tokens with the chat template; the answer runs past 64 tokens (no early EOS).
PROMPT = (
    "You are a patient teacher. Explain to a curious twelve-year-old, in simple words and a few "
    "short paragraphs, why the sky looks blue during the day but red and orange at sunset."
)
NEW_TOKENS = 64


def _time(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _load_time_in_fresh_process() -> float:
    code = (
        "import time, torch; torch.set_num_threads(2);"
        "from polar_core.models import load_model;"
        f"t = time.perf_counter(); load_model({DEFAULT_MODEL!r}, device='cpu');"
        "print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench/results/executor.md"))
    args = parser.parse_args()

    torch.set_num_threads(2)
    lm = load_model(DEFAULT_MODEL, device="cpu")
    batch = encode_prompts(lm, [PROMPT])
    full = Program.full(lm.num_layers)
    half = Program.early_exit(lm.num_layers, lm.num_layers // 2 - 1)

    def hf():
        with torch.inference_mode():
            out = lm.model.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                max_new_tokens=NEW_TOKENS, do_sample=False,
            )
        return out[0, batch.input_ids.shape[1]:].tolist()

    def ours(program, stop_at_eos=True):
        return lambda: generate(lm, batch, program, max_new_tokens=NEW_TOKENS, stop_at_eos=stop_at_eos)[0].token_ids

    variants = {"hf_generate": hf, "identity": ours(full), "half": ours(half, stop_at_eos=False)}
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    tokens = {}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            seconds, tokens[name] = _time(fn)
            times[name].append(seconds)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    loads = [_load_time_in_fresh_process() for _ in range(3)]

    same = tokens["identity"] == tokens["hf_generate"]
    rows = [
        ("model `generate`, 64 tokens", f"{med['hf_generate']:.3f} s", ""),
        ("identity program, 64 tokens", f"{med['identity']:.3f} s", f"{med['identity'] / med['hf_generate']:.2f} × generate"),
        (f"half program `{half.format()}`", f"{med['half']:.3f} s", f"{med['half'] / med['identity']:.2f} × identity"),
        ("second model load (median of 3)", f"{statistics.median(loads):.2f} s", "target ≤ 5 s"),
    ]
    lines = [
        "# Executor benchmark",
        "",
        f"Command: `.venv/bin/python bench/bench_executor.py --repeats {args.repeats}`",
        f"Machine: {torch.get_num_threads()} CPU threads, torch {torch.__version__}, float32, "
        f"{lm.describe()['name']} ({lm.num_layers} layers); prompt {batch.input_ids.shape[1]} tokens; "
        f"greedy; medians of {args.repeats} interleaved repeats.",
        "",
        "| what | median time | ratio |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"Identity tokens equal `generate` tokens: **{same}** "
        f"({len(tokens['identity'])} vs {len(tokens['hf_generate'])} tokens).",
        f"All times (s): " + "; ".join(f"{k}: {', '.join(f'{t:.3f}' for t in v)}" for k, v in times.items()),
        f"Load times (s): {', '.join(f'{t:.2f}' for t in loads)}",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
