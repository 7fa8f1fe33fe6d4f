"""How far bfloat16 moves teacher-forced margins: the evidence behind CASCADE_MARGIN.

Runs an all-float32 MCTS search of some task items (train split by default:
what ``python -m polar_core search`` asks, no fast pass) and scores every program it asks
twice, in float32 and with the bfloat16 twin, in the same batches. Reports
how often the two verdicts differ, the largest |bfloat16 margin - float32
margin|, by direction, and what two rules would have got wrong: the
cascade's (``polar_core.study.scoring.cascade_scores``: bfloat16 rejects
alone at <= -margin, float32 rescores the rest), which errs when a
float32-valid program falls to <= -margin, and a two-sided variant that
would also accept alone at >= +margin (not used), which errs when a
float32-invalid program rises to >= +margin.

    OMP_NUM_THREADS=1 python bench/bench_cascade.py --per-family 4 --budget 32 --out bench/results/cascade_margins.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polar_core.engine.cpu.layout import cpuinfo_field  # noqa: E402
from polar_core.engine.models import load_model  # noqa: E402
from polar_core.study import find, scoring  # noqa: E402
from polar_core.study.scoring import CASCADE_MARGIN, bfloat16_twin  # noqa: E402
from polar_core.study.tasks import FAMILIES, sample_items  # noqa: E402


def collect(lm, fast, items, budget: int) -> list[tuple[float, float]]:
    """(float32 margin, bfloat16 margin) of every program an all-float32 search scores."""
    pairs = []
    exact_scores = scoring.teacher_forced_scores

    def both(model, jobs, **kwargs):
        exact = exact_scores(model, jobs, **kwargs)
        quick = exact_scores(fast, jobs, **kwargs)
        pairs.extend((e.margin, q.margin) for ej, qj in zip(exact, quick) for e, q in zip(ej, qj))
        return exact

    scoring.teacher_forced_scores = both  # what cascade_scores calls when there is no fast model
    try:
        find.search_task_items(lm, items, budget=budget)
    finally:
        scoring.teacher_forced_scores = exact_scores
    return pairs


def report(pairs, margin: float) -> dict:
    near = [(e, q) for e, q in pairs if abs(e) < 2 * margin]
    valid = [(e, q) for e, q in pairs if e > 0]
    invalid = [(e, q) for e, q in pairs if e <= 0]
    return {
        # What each side of the rule risks: a valid program pushed down, an invalid one pushed up.
        "max_drop_valid": max((e - q for e, q in valid), default=0.0),
        "max_rise_invalid": max((q - e for e, q in invalid), default=0.0),
        "max_rise_invalid_near": max((q - e for e, q in invalid if e > -2 * margin), default=0.0),
        "programs": len(pairs),
        "float32_valid": sum(e > 0 for e, _ in pairs),
        "verdicts_differ": sum((e > 0) != (q > 0) for e, q in pairs),
        "near_boundary": len(near),
        "max_shift_near": max((abs(e - q) for e, q in near), default=0.0),
        "max_shift_valid": max((abs(e - q) for e, q in pairs if e > 0), default=0.0),
        "max_shift_all": max((abs(e - q) for e, q in pairs), default=0.0),
        "accepted_but_invalid": sum(q >= margin and e <= 0 for e, q in pairs),
        "rejected_but_valid": sum(q <= -margin and e > 0 for e, q in pairs),
        "rescored_cascade": sum(q > -margin for _, q in pairs),
        "rescored_two_sided": sum(-margin < q < margin for _, q in pairs),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-family", type=int, default=3)
    parser.add_argument("--split", default="train", help="train: items the throughput benchmark (test) never sees")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--margin", type=float, default=CASCADE_MARGIN)
    parser.add_argument("--out", default=None, help="write a markdown section here")
    parser.add_argument("--pairs", default=None, help="write every (float32, bfloat16) margin pair here (JSON)")
    args = parser.parse_args(argv)
    lm = load_model("smollm2-135m-instruct")
    fast = bfloat16_twin(lm)
    items = [it for f in FAMILIES for it in sample_items(f, args.per_family, args.split)]
    started, load_before = time.perf_counter(), Path("/proc/loadavg").read_text().split()[:3]
    pairs = collect(lm, fast, items, args.budget)
    r = report(pairs, args.margin)
    if args.pairs:
        Path(args.pairs).write_text(json.dumps([[round(e, 4), round(q, 4)] for e, q in pairs]) + "\n")
    lines = [
        "# bfloat16 vs float32 teacher-forced margins (the cascade's evidence)",
        "",
        "Command:",
        "",
        "    OMP_NUM_THREADS=1 python bench/bench_cascade.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "",
        f"{len(items)} {args.split} items ({args.per_family} per family), all-float32 MCTS budget {args.budget}; every "
        f"program it asked scored in float32 and in bfloat16 in the same batches "
        f"({time.perf_counter() - started:.0f} s wall on {cpuinfo_field('model name')}, 1 torch thread; load "
        f"average {' '.join(load_before)} at the start, {' '.join(Path('/proc/loadavg').read_text().split()[:3])} "
        "at the end).",
        "",
        "| programs | float32-valid | verdicts differ | near the boundary (float32 margin within +-"
        f"{2 * args.margin:g}) | largest shift near it | largest shift, valid | largest shift, any |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['programs']} | {r['float32_valid']} | {r['verdicts_differ']} | {r['near_boundary']} | "
        f"{r['max_shift_near']:.3f} | {r['max_shift_valid']:.3f} | {r['max_shift_all']:.3f} |",
        "",
        f"At margin {args.margin:g}: rejected by bfloat16 (<= -{args.margin:g}) but float32-valid "
        f"**{r['rejected_but_valid']}** (the cascade's rule); accepted by bfloat16 (>= +{args.margin:g}) but "
        f"float32-invalid **{r['accepted_but_invalid']}** (a two-sided variant, not used). Programs rescored in "
        f"float32: {r['rescored_cascade']} under the cascade's rule, {r['rescored_two_sided']} under the "
        "two-sided one.",
        "",
        f"Direction of the shifts: a float32-valid program fell by at most {r['max_drop_valid']:.3f} under "
        f"bfloat16 (what the rejection at <= -{args.margin:g} risks); a float32-invalid one rose by at most "
        f"{r['max_rise_invalid']:.3f}, {r['max_rise_invalid_near']:.3f} among those within {2 * args.margin:g} "
        f"of the boundary (what an acceptance at >= +{args.margin:g} would risk).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if r["accepted_but_invalid"] == r["rejected_but_valid"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
