"""Programs scored per second: prefix-shared batches vs one program at a time.

The program set is what a greedy search asks in its first round: the full
program and every single skip of a block of k <= 4 consecutive layers (115
programs on a 30-layer model). The same programs are scored (teacher forcing,
``polar_core.study.scoring``) three ways, side by side in one run:

- one at a time: ``forward_logits`` per program (no batching, no sharing);
- shared: one prompt, all programs in one trie, each level batched per layer;
- shared, many prompts: several questions' tries in one batch (what the
  search CLI does each round).

Verdicts must agree between the ways; the script fails otherwise.

    python bench/bench_search.py [--device cuda] [--dtype float32] [--prompts 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polar_core.engine.models import load_model  # noqa: E402
from polar_core.program import Program  # noqa: E402
from polar_core.study.scoring import (
    count_layer_calls,
    reference_target,
    teacher_forced_scores,
    teacher_forced_scores_unshared,
)
from polar_core.study.search import skip_edits  # noqa: E402
from polar_core.study.tasks import FAMILIES, sample_items  # noqa: E402


def _sync(lm):
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def _timed(lm, fn):
    _sync(lm)
    start = time.perf_counter()
    out = fn()
    _sync(lm)
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--prompts", type=int, default=8, help="questions in the many-prompt batch")
    parser.add_argument("--unshared-prompts", type=int, default=1, help="questions timed one program at a time")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args(argv)

    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    D = lm.num_layers
    programs = [Program.full(D)] + [Program(p, D) for p in skip_edits(tuple(range(D)))]
    families = [FAMILIES[i % len(FAMILIES)] for i in range(args.prompts)]
    items = [sample_items(f, 1 + i // len(FAMILIES), "test")[i // len(FAMILIES)] for i, f in enumerate(families)]
    targets = [reference_target(lm, it) for it in items]
    n = len(programs)

    # Warm-up (kernels, allocator) so no way pays for first-call costs.
    teacher_forced_scores(lm, [(targets[0], programs[:4])])
    teacher_forced_scores_unshared(lm, targets[0], programs[:2])

    rows = {}
    unshared, t = [], 0.0
    for target in targets[: args.unshared_prompts]:
        scores, dt = _timed(lm, lambda: teacher_forced_scores_unshared(lm, target, programs))
        unshared.append([s.valid for s in scores])
        t += dt
    rows["one at a time"] = (n * len(unshared), t)
    shared, t1 = _timed(lm, lambda: teacher_forced_scores(lm, [(targets[0], programs)]))
    rows["shared, one prompt"] = (n, t1)
    many, tm = _timed(lm, lambda: teacher_forced_scores(lm, [(t, programs) for t in targets]))
    rows[f"shared, {len(targets)} prompts per batch"] = (n * len(targets), tm)

    for i, verdicts in enumerate(unshared):
        assert verdicts == [s.valid for s in many[i]], f"verdicts differ on prompt {i}"
    assert [s.valid for s in shared[0]] == unshared[0], "verdicts differ (one prompt)"

    info = lm.describe()
    base = rows["one at a time"][0] / rows["one at a time"][1]
    print(f"model {info['name']} on {info['device']} ({info['dtype']}); {n} programs per prompt; "
          f"layer calls per prompt: {count_layer_calls(programs, False)} unshared, {count_layer_calls(programs)} shared; "
          f"prompt tokens {[len(t.input_ids) for t in targets]}")
    print(f"{'way':32s} {'programs':>9s} {'seconds':>9s} {'programs/s':>11s} {'speed-up':>9s}")
    figures = {}
    for name, (count, secs) in rows.items():
        rate = count / secs
        figures[name] = {"programs": count, "seconds": round(secs, 3), "programs_per_s": round(rate, 1), "speedup": round(rate / base, 2)}
        print(f"{name:32s} {count:9d} {secs:9.3f} {rate:11.1f} {rate / base:8.1f}x")
    valid = sum(s.valid for s in many[0])
    print(f"verdicts agree across the ways; {valid}/{n} programs valid on the first prompt")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": info["device"], "dtype": info["dtype"], "rows": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
