"""Where a search's time goes: CPU seconds per phase of `find.search_task_items`.

Times, on the current code, the full program's answers, the teacher-forced
passes (bfloat16, then float32 rescoring), their layer calls and the checks by
decoding, for a slice of the items `bench_search.py --pipeline N` uses, and
counts the row-tokens the layer calls computed (padding included):

    OMP_NUM_THREADS=1 python bench/profile_search.py --pipeline 24 --start 16 --items 8 --budget 32
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polar_core.engine.models import load_model  # noqa: E402
from polar_core.study import find, scoring  # noqa: E402
from polar_core.study.scoring import CascadeStats, bfloat16_twin  # noqa: E402
from polar_core.study.tasks import FAMILIES, sample_items  # noqa: E402

seconds: collections.Counter = collections.Counter()
counts: collections.Counter = collections.Counter()


def timed(owner, name: str, key, tally=None) -> None:
    """Wrap owner.name so its CPU seconds add up under key(args)."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            label = key(*args)
            seconds[label] += time.process_time() - started
            counts[label] += 1
            if tally is not None:
                for what, n in tally(*args).items():
                    counts[f"{label} {what}"] += n

    setattr(owner, name, wrapper)


def dtype_of(tensor_or_lm) -> str:
    return str(tensor_or_lm.dtype).removeprefix("torch.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=int, default=24, help="the benchmark's item list: this many test items")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--budget", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lm = load_model("smollm2-135m-instruct")
    fast = bfloat16_twin(lm)
    per_family = -(-args.pipeline // len(FAMILIES))
    items = [it for f in FAMILIES for it in sample_items(f, per_family, "test")][: args.pipeline]
    items = items[args.start : args.start + args.items]
    timed(find, "full_program_answers", lambda *a: "full program's answers (decoding)")
    timed(find, "decode_many", lambda *a: "checks by decoding")
    timed(scoring, "teacher_forced_scores", lambda model, jobs: f"teacher forcing, {dtype_of(model)}",
          lambda model, jobs: {"programs": sum(len(ps) for _, ps in jobs)})
    adapter_class = type(lm.adapter)
    timed(adapter_class, "run_layer", lambda self, layer, hidden, *a: f"  layer calls, {dtype_of(hidden)}",
          lambda self, layer, hidden, *a: {"rows": hidden.shape[0], "row-tokens": hidden.shape[0] * hidden.shape[1]})
    cascade = CascadeStats()
    started_cpu, started = time.process_time(), time.perf_counter()
    records = find.search_task_items(lm, items, budget=args.budget, fast=fast, cascade=cascade)
    total = time.process_time() - started_cpu
    print(f"{len(items)} items (prompt + answer tokens "
          f"{[len(scoring.reference_target(lm, it).input_ids) for it in items]}), budget {args.budget}: "
          f"{sum(r.programs_scored for r in records)} programs, {total:.2f} s CPU "
          f"({time.perf_counter() - started:.2f} s wall); rescored in float32 {cascade.rescored}")
    for label in sorted(seconds):
        extra = ", ".join(f"{k.removeprefix(label + ' ')} {v}" for k, v in counts.items() if k.startswith(label + " "))
        print(f"{label:40s} {seconds[label]:7.2f} s  {counts[label]} calls  {extra}")
    print("(layer calls are inside teacher forcing, the checks and the full program's answers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
