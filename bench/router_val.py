"""Choose the router's features on the val split (never on test).

Trains one router per configuration on a supervision file and reports, on
the val split of the task suite, the top-1 accuracy (with its Wilson 95%
interval), the layer calls per token and the number of distinct top-1
programs, beside the full program, and how often the top-1 gives the full
program's own answer (right or wrong: a finer signal than accuracy, since it
counts every item). One Runner serves every configuration, so a program runs
once per item.

    python bench/router_val.py --supervision polar_core/assets/supervision/smollm2_train.json \
        --configs 0 15 15p 0w1.0 --out bench/results/router_val.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polar_core.engine.models import load_model  # noqa: E402
from polar_core.program import Program  # noqa: E402
from polar_core.study.evaluate import Runner, input_dependence, predict_items  # noqa: E402
from polar_core.study.router import RouterConfig, train_router  # noqa: E402
from polar_core.study.supervision import load_supervision, merge_samples  # noqa: E402
from polar_core.study.tables import wilson_interval  # noqa: E402
from polar_core.study.tasks import FAMILIES, sample_items  # noqa: E402


def parse_config(text: str) -> dict:
    """"15p" = features after 15 layers, pooled; "0" = token embeddings; a
    suffix "w1.0" sets the full program's target weight (``full_path_weight``)."""
    text, _, weight = text.partition("w")
    pooled = text.endswith("p")
    config = {"feature_layer": int(text.rstrip("p")), "pooled": pooled}
    return {**config, "full_path_weight": float(weight)} if weight else config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supervision", required=True, nargs="+", help="files, merged by question")
    parser.add_argument("--configs", nargs="+", default=["0", "15", "15p"])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--per-family", type=int, default=0, help="val items per family (0 = all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    lm = load_model()
    samples = merge_samples(*(load_supervision(p, lm.num_layers) for p in args.supervision))
    items = [it for f in FAMILIES for it in sample_items(f, args.per_family or None, "val")]
    runner = Runner(lm)
    depth = lm.num_layers
    full = Program.full(depth)
    full_ok = runner.correct(items, [full] * len(items), desc="val full")
    results = {"command": "python bench/router_val.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "items": len(items), "full": _figures(full_ok, [Program.full(depth)] * len(items), depth), "configs": {}}
    print(f"val: {len(items)} items; full program {sum(full_ok)} right")
    for text in args.configs:
        started = time.perf_counter()
        config = dataclasses.replace(RouterConfig.for_model(lm), **parse_config(text))
        router = train_router(lm, samples, config, epochs=args.epochs, progress=False)
        top1 = [p[0][0] for p in predict_items(lm, router, runner, items, 1)]
        ok = runner.correct(items, top1, desc=f"val top-1 ({text})")
        fig = _figures(ok, top1, depth)
        fig["distinct_top1"] = input_dependence(items, top1)["distinct_top1"]
        fig["same_answer_as_full"] = sum(runner.results[(it.id, p.path)][0] == runner.results[(it.id, full.path)][0]
                                         for it, p in zip(items, top1))
        fig["seconds"] = round(time.perf_counter() - started, 1)
        results["configs"][text] = {**parse_config(text), **fig}
        print(f"{text}: {fig}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _figures(ok, programs, depth) -> dict:
    lo, hi = wilson_interval(sum(ok), len(ok))
    return {"correct": sum(ok), "n": len(ok), "accuracy": round(sum(ok) / len(ok), 4), "ci": [round(lo, 4), round(hi, 4)],
            "compute_fraction": round(sum(p.layer_calls for p in programs) / len(programs) / depth, 4)}


if __name__ == "__main__":
    sys.exit(main())
