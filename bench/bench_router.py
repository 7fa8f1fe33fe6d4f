"""Router overhead: features + network + beam search, against a 32-token generation.

    python bench/bench_router.py [--out bench/results/router_overhead.md]

The generation is the full program, greedy, 32 new tokens (no early stop), on
a few-shot task prompt; the router's time covers everything ``predict_programs``
does (tokenizing, frozen features, the network, beam search for k=5). Each
feature depth is timed with a router of the shipped config (weights do not
change the cost). Medians over repeats, on whatever device the model loads on.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polar_core.engine.generate import Stopping, generate
from polar_core.engine.inputs import encode_prompts  # noqa: E402
from polar_core.engine.models import load_model  # noqa: E402
from polar_core.program import Program  # noqa: E402
from polar_core.study.router import Router, RouterConfig, beam_search, load_default_router, predict_programs
from polar_core.study.router.features import encode, router_features
from polar_core.study.tasks import build_prompt, load_suite  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _sync(lm):
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def bench(lm, router, prompt: str, repeats: int) -> dict:
    """Median milliseconds of each router stage and of the whole call."""
    config = router.config
    batch = encode(lm, [prompt], config.chat)
    feats, mask = router_features(lm, config, batch)
    with torch.inference_mode():
        logits = router(feats, mask)
    for _ in range(3):  # warm-up
        predict_programs(lm, router, prompt, k=5)

    def network():
        with torch.inference_mode():
            router(feats, mask)

    return {
        "tokenize": _median_ms(lambda: encode(lm, [prompt], config.chat), repeats),
        "features": _median_ms(lambda: (router_features(lm, config, batch), _sync(lm)), repeats),
        "network": _median_ms(network, repeats),
        "beam": _median_ms(lambda: beam_search(logits[0][0], logits[1][0], k=5, width=config.beam_width), repeats),
        "total": _median_ms(lambda: (predict_programs(lm, router, prompt, k=5), _sync(lm)), repeats),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--gen-repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    lm = load_model(device=args.device)
    shipped = load_default_router(lm)
    base = shipped.config if shipped is not None else RouterConfig.for_model(lm)
    item = load_suite("capitals", "test")[0]
    prompt = build_prompt(item)
    tokens = len(encode_prompts(lm, [prompt], chat=False).input_ids[0])

    full = Program.full(lm.num_layers)
    generate(lm, [prompt], full, max_new_tokens=32, chat=False, stopping=Stopping(at_eos=False))  # warm-up
    gen_ms = _median_ms(
        lambda: generate(lm, [prompt], full, max_new_tokens=32, chat=False, stopping=Stopping(at_eos=False)), args.gen_repeats
    )
    rows = []
    for layer in sorted({0, 1, 2, base.feature_layer}):
        config = dataclasses.replace(base, feature_layer=layer)
        router = shipped if shipped is not None and layer == shipped.config.feature_layer else Router(config).eval()
        rows.append((layer, bench(lm, router, prompt, args.repeats)))

    lines = [
        "# Router overhead",
        "",
        f"Command: `python bench/bench_router.py{' --out ' + args.out if args.out else ''}`",
        "",
        f"Model {lm.name} on {lm.device} ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}; prompt: few-shot `{item.id}` ({tokens} tokens). Medians of {args.repeats} router "
        f"calls and {args.gen_repeats} generations.",
        "",
        f"Reference: full-program greedy generation of 32 new tokens: **{gen_ms:.1f} ms**.",
        "",
        "| Features | Tokenize ms | Features ms | Network ms | Beam (k=5) ms | Router total ms | % of generation | Shipped |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for layer, t in rows:
        what = "token embeddings" if layer == 0 else f"after layer {layer - 1}"
        mark = "yes" if layer == base.feature_layer else ""
        lines.append(
            f"| {what} | {t['tokenize']:.2f} | {t['features']:.2f} | {t['network']:.2f} | {t['beam']:.2f} | "
            f"{t['total']:.2f} | {100 * t['total'] / gen_ms:.2f}% | {mark} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
