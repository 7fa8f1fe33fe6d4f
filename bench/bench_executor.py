"""Executor speed on the default model, measured side by side in one run.

(a) identity program vs the model's own `generate`: time ratio, token equality;
(b) a program of half the layers vs the identity program: time ratio;
(c) second load of the default model (weights cached as safetensors), in a
    fresh process, timing `load_model` alone.

Variants are interleaved and repeated; medians are reported, so background
load hits every variant alike. Usage:
    .venv/bin/python bench/bench_executor.py [--repeats 7] [--threads 2] [--out bench/results/executor.md]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polar_core.engine.generate import Stopping, generate
from polar_core.engine.inputs import encode_prompts  # noqa: E402
from polar_core.engine.models import DEFAULT_MODEL, load_model  # noqa: E402
from polar_core.program import Program  # noqa: E402

# ~70 tokens with the chat template; the answer runs past 64 tokens (no early EOS).
PROMPT = (
    "You are a patient teacher. Explain to a curious twelve-year-old, in simple words and a few "
    "short paragraphs, why the sky looks blue during the day but red and orange at sunset."
)
NEW_TOKENS = 64


def _time(fn, sync) -> tuple[float, object]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def _random_default_shaped(device: str):
    """SmolLM2-135M's architecture with random weights, and a 70-token prompt."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from polar_core.engine.inputs import pad_left
    from polar_core.engine.models import from_model

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
        rope_theta=100000.0, max_position_embeddings=8192, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(3, 49152, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    return from_model(model, name="random SmolLM2-135M-shaped"), pad_left([prompt], 0, device)


def _load_time_in_fresh_process() -> float:
    code = (
        f"import time, torch; torch.set_num_threads({torch.get_num_threads()});"
        "from polar_core.engine.models import load_model;"
        f"t = time.perf_counter(); load_model({DEFAULT_MODEL!r}, device='cpu');"
        "print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _machine(lm) -> str:
    if lm.device.type == "cuda":
        return torch.cuda.get_device_name(lm.device)
    from polar_core.engine.cpu.layout import cpuinfo_field

    return f"{torch.get_num_threads()} CPU threads ({cpuinfo_field('model name') or 'CPU'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench/results/executor.md"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument(
        "--random-weights", action="store_true",
        help="a randomly initialised model of the default model's shape (for machines without the "
        "embedded weights, e.g. a GPU box); prompt = 70 random token ids, EOS never stops",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.random_weights:
        lm, batch = _random_default_shaped(args.device)
    else:
        lm = load_model(DEFAULT_MODEL, device=args.device)
        batch = encode_prompts(lm, [PROMPT])
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    start_load = os.getloadavg()[0]
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
        return lambda: generate(lm, batch, program, max_new_tokens=NEW_TOKENS, stopping=Stopping(at_eos=stop_at_eos))[0].token_ids

    variants = {"hf_generate": hf, "identity": ours(full), "half": ours(half, stop_at_eos=False)}
    if lm.lean is not None and lm.lean.ready:  # the same model, every pass through transformers' layers
        reference = dataclasses.replace(lm, lean=None)
        variants["identity_reference"] = lambda: generate(reference, batch, full, max_new_tokens=NEW_TOKENS)[0].token_ids
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    tokens = {}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            seconds, tokens[name] = _time(fn, sync)
            times[name].append(seconds)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    loads = [] if args.random_weights else [_load_time_in_fresh_process() for _ in range(3)]

    same = tokens["identity"] == tokens["hf_generate"]
    lm_name = lm.name
    rows = [
        ("model `generate`, 64 tokens", f"{med['hf_generate']:.3f} s", ""),
        ("identity program, 64 tokens", f"{med['identity']:.3f} s", f"{med['identity'] / med['hf_generate']:.2f} × generate"),
        (f"half program `{half.format()}`", f"{med['half']:.3f} s", f"{med['half'] / med['identity']:.2f} × identity"),
    ]
    if "identity_reference" in med:
        rows.insert(2, ("identity program, transformers' layers (lean step off)", f"{med['identity_reference']:.3f} s",
                        f"{med['identity_reference'] / med['identity']:.2f} × identity"))
    if loads:
        rows.append(("second model load (median of 3)", f"{statistics.median(loads):.2f} s", "target ≤ 5 s"))
    lines = [
        "# Executor benchmark",
        "",
        f"Command: `python bench/bench_executor.py {' '.join(sys.argv[1:])}`",
        f"Machine: {_machine(lm)}, torch {torch.__version__}, {str(lm.dtype).replace('torch.', '')}, "
        f"{lm_name} ({lm.num_layers} layers); prompt {batch.input_ids.shape[1]} tokens; "
        f"greedy; medians of {args.repeats} interleaved repeats; decoding: {lm.lean or 'transformers layers'}; "
        f"load average (1 min) {start_load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.",
        "",
        "| what | median time | ratio |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"Identity tokens equal `generate` tokens: **{same}** "
        f"({len(tokens['identity'])} vs {len(tokens['hf_generate'])} tokens).",
        "All times (s): " + "; ".join(f"{k}: {', '.join(f'{t:.3f}' for t in v)}" for k, v in times.items()),
        f"Load times (s): {', '.join(f'{t:.2f}' for t in loads) or 'not measured'}",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
