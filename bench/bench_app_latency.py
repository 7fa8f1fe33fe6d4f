"""Server-side latency of one program edit in the app: new answer + every chart.

    .venv/bin/python bench/bench_app_latency.py            # 20 edits, 2 threads
    .venv/bin/python bench/bench_app_latency.py --edits 20 --threads 2 --out bench/results/app_latency.md

What one edit costs, timed per edit, exactly as the page does it: parse the
program text, sync the grid and piano roll (`editor_view`), run the edited
program for up to 32 new tokens with the full program's trace reused from the
session (`handlers.run`: generation + `polar_core.study.analysis.analyze` + all
figures), serialise every figure to JSON as Gradio does before sending, and
build the run's downloads (per-step CSV, the JSON record).
The prompt is a free-text chat prompt so answers run to the 32-token cap
rather than stopping at a newline. Target: median <= 1.5 s on 2 CPU cores.

Side by side in the same run, to show what each speed-up buys: each edit's
answer decoded plainly, one token per pass, beside the app's decoding that
checks the full program's and the previous edit's answers as drafts (the
answers must be equal), and beside plain decoding with the float32 weights
instead of their GGUF codes (`polar_core.engine.cpu.packed`; answers compared); and the
model's own `generate` as loaded (codes + layouts), with float32 weights in
the layouts chosen at load, and with float32 weights in PyTorch's default
row-major order (neither speed-up).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "Describe the water cycle in a few sentences."
TARGET_SECONDS = 1.5


def edits(num_layers: int, n: int, seed: int = 0) -> list[str]:
    """n program texts a person might try: skip a block, loop a block, early exit, drop layers."""
    from polar_core.program import Program

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a = rng.randrange(2, num_layers - 6)
        kind = i % 4
        if kind == 0:
            p = Program.skip(num_layers, a, a + rng.randrange(1, 5))
        elif kind == 1:
            p = Program.loop(num_layers, a, a + rng.randrange(0, 4), 2)
        elif kind == 2:
            p = Program.early_exit(num_layers, num_layers - 1 - rng.randrange(1, 5))
        else:
            p = Program.drop_layers(num_layers, rng.sample(range(num_layers), 3))
        out.append(p.format())
    return out


def time_edit(lm, session, text: str):
    """One edit end to end (server side): total seconds, of which generating, and the view."""
    from app import handlers as H

    started = time.perf_counter()
    view = H.editor_view(H.parse_program(text, lm.num_layers))
    run = H.run(lm, session, PROMPT, text, "")
    for fig in [view.roll, *run.figures.values()]:
        fig.to_json()  # Gradio sends figures as JSON
    H.step_table(run.analysis).to_csv(index=False)  # the downloads the page offers for every run
    json.dumps(H.run_record(run), ensure_ascii=False)
    return time.perf_counter() - started, run.edited.seconds, run


def time_plain_generation(lm, text: str, *, float32: bool = False) -> tuple[float, list[int]]:
    """The same edit's answer decoded one token per pass, as without drafts
    (with `float32`: multiplying by the float32 weights, not their codes)."""
    from app import handlers as H
    from polar_core.engine.cpu.packed import float32_products

    with float32_products(lm.model) if float32 else contextlib.nullcontext():
        trace = H._generate(lm, PROMPT, H.parse_program(text, lm.num_layers))
    return trace.total_seconds, trace.token_ids


def restore_row_major(lm) -> None:
    """Undo the load-time relayout (polar_core.engine.cpu.layout): every weight row-major again."""
    for module in lm.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.contiguous()


def time_model_generate(lm, tokens: int = 32, repeats: int = 5) -> float:
    """Median seconds of the model's own `generate` for `tokens` greedy tokens on
    PROMPT: this machine's yardstick, measured in the same run, so the edit
    latency can be read as a ratio that travels between machines."""
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.inference_mode():
            lm.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from app import handlers as H
    from app.session import Session, get_model
    from polar_core.engine.cpu.packed import float32_products

    lm = get_model(None)
    session = Session()
    H.run(lm, session, PROMPT, "full", "")  # the baseline: computed once per prompt, as in the app
    time_edit(lm, session, "0-29")  # warm-up (first-call allocations)
    times, gen, plain, dense, tokens, passes, kept = [], [], [], [], [], [], []
    mismatches = dense_mismatches = 0
    for text in edits(lm.num_layers, args.edits):
        seconds, generating, run = time_edit(lm, session, text)
        plain_seconds, plain_tokens = time_plain_generation(lm, text)
        dense_seconds, dense_tokens = time_plain_generation(lm, text, float32=True)
        trace = run.trace
        mismatches += plain_tokens != trace.token_ids
        dense_mismatches += dense_tokens != plain_tokens
        dense.append(dense_seconds)
        times.append(seconds)
        gen.append(generating)
        plain.append(plain_seconds)
        tokens.append(len(trace.token_ids))
        passes.append(trace.drafts.decode_passes if trace.drafts else 0)
        kept.append(trace.drafts.draft_tokens_kept if trace.drafts else 0)
        print(f"{seconds:6.3f} s  (generate {generating:5.3f} s, plain {plain_seconds:5.3f} s, "
              f"float32 {dense_seconds:5.3f} s)  {tokens[-1]:2d} tokens, "
              f"{kept[-1]:2d} from drafts  {text}", flush=True)
    overhead = [t - g for t, g in zip(times, gen)]
    yardstick = time_model_generate(lm)
    layouts = lm.layouts
    with float32_products(lm.model):
        float32_layouts = time_model_generate(lm)
        restore_row_major(lm)
        row_major = time_model_generate(lm)
    median = statistics.median(times)
    load = os.getloadavg()
    one_pass = sum(p == 1 for p in passes)
    report = "\n".join([
        "# App latency: one program edit -> new answer + all charts (server side)",
        "",
        f"Command: `.venv/bin/python bench/bench_app_latency.py --edits {args.edits} --threads {args.threads}`",
        "",
        f"- model: {lm.name} ({lm.num_layers} layers, {lm.device}, {str(lm.dtype).replace('torch.', '')}), "
        f"torch threads: {args.threads}, CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible",
        f"- load average during the run (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        "(other jobs on a shared machine inflate the times)",
        f"- prompt: {PROMPT!r} (chat template), up to 32 new tokens; tokens generated per edit: "
        f"median {statistics.median(tokens):.0f}, min {min(tokens)}, max {max(tokens)}",
        "- per edit: parse + grid/piano roll + generate the edited program + `analyze` + 5 analysis figures + JSON "
        "+ the per-step CSV and the run's JSON record; "
        "the full program's trace is reused from the session, as in the app",
        "- weight layouts chosen at load by timing (`polar_core.engine.cpu.layout`): "
        + "; ".join(f"{shape}: {choice}" for shape, choice in layouts.items()),
        f"- weights multiplied as their GGUF codes (`polar_core.engine.cpu.packed`): {lm.packing or 'no (not a CPU float32 load)'}",
        "",
        "| edits | median (s) | p90 (s) | min (s) | max (s) | target median |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {len(times)} | {median:.3f} | {percentile(times, 0.9):.3f} | {min(times):.3f} | {max(times):.3f} "
        f"| <= {TARGET_SECONDS} s ({'met' if median <= TARGET_SECONDS else 'NOT met'}) |",
        "",
        "Where the time goes (medians over the edits): generating the edited program's answer "
        f"{statistics.median(gen):.3f} s (prefill + decoding, `polar_core.engine.generate.generate` with the full and the "
        f"previous edit's answers as drafts); everything else (parse, analyze, figures, JSON, grid) {statistics.median(overhead):.3f} s.",
        "",
        "Side by side in this run:",
        "",
        "| what | median (s) | mean (s) | ratio |",
        "|---|---:|---:|---:|",
        f"| edited answer, decoded one token per pass | {statistics.median(plain):.3f} | {statistics.mean(plain):.3f} | 1.00 |",
        f"| same, checking the full and the previous edit's answers as drafts (the app) | {statistics.median(gen):.3f} | "
        f"{statistics.mean(gen):.3f} | {statistics.mean(gen) / statistics.mean(plain):.2f} (means) |",
        f"| edited answer, one token per pass, float32 weights instead of their codes | {statistics.median(dense):.3f} | "
        f"{statistics.mean(dense):.3f} | {statistics.mean(dense) / statistics.mean(plain):.2f} (means) |",
        f"| model's own `generate`, 32 tokens, float32 weights, default row-major | {row_major:.3f} | | 1.00 |",
        f"| same, float32 weights in the layouts chosen at load | {float32_layouts:.3f} | | {float32_layouts / row_major:.2f} |",
        f"| same, as loaded: GGUF codes where exact (4-bit layers, 8-bit LM head), layouts | {yardstick:.3f} | | {yardstick / row_major:.2f} |",
        "",
        f"Codes vs float32 weights: answers equal in {len(times) - dense_mismatches} of {len(times)} edits "
        "(same weights; the sums are rounded in a different order).",
        "",
        f"Draft: answers equal to plain decoding in {len(times) - mismatches} of {len(times)} edits; "
        f"{sum(kept)} of {sum(tokens)} generated tokens came from drafts, in {sum(passes)} decoding passes; "
        f"{one_pass} edits were decoded in one pass after the prompt.",
        "",
        f"Yardstick: one edit costs **{median / yardstick:.2f} x** the model's own `generate` of 32 tokens on the same "
        "prompt (median of 5, as loaded): the edit generates up to 32 tokens under the edited program and adds "
        "the analysis on top.",
        "",
    ])
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    return 0 if mismatches == 0 and dense_mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
