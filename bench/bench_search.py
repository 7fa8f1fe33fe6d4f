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

``--pipeline N`` times the whole search of N test items instead (what
``python -m polar_core search`` runs: the full program's answers, MCTS with
teacher-forced scoring, the checks by decoding), today's code
(``bench/search_before.py``, frozen at commit a7d7db6) against the current
one, chunk by chunk, both ways back to back on each chunk; the searches must
ask the same programs and find the same valid ones, item by item:

    python bench/bench_search.py --pipeline 24 --budget 32 --chunk 8 --json bench/results/search_pipeline.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import search_before  # noqa: E402

from polar_core.engine.models import load_model  # noqa: E402
from polar_core.program import Program  # noqa: E402
from polar_core.study import find  # noqa: E402
from polar_core.study.scoring import (  # noqa: E402
    CascadeStats,
    bfloat16_twin,
    count_layer_calls,
    native_bfloat16,
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
    parser.add_argument("--pipeline", type=int, default=0, help="time the whole search of this many test items")
    parser.add_argument("--budget", type=int, default=32, help="MCTS simulations per item (--pipeline)")
    parser.add_argument("--chunk", type=int, default=8, help="items per interleaved chunk (--pipeline)")
    args = parser.parse_args(argv)

    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.pipeline:
        return pipeline(lm, args)
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


class _Clock:
    """Seconds spent inside one function of a module (the decoding checks)."""

    def __init__(self, module, name: str):
        self.module, self.name, self.seconds = module, name, 0.0
        self.original = getattr(module, name)

    def __enter__(self):
        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return self.original(*a, **k)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(self.module, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)


def _run_way(lm, fast, items, budget: int, today: bool) -> dict:
    """One way's whole search of some items: wall and CPU seconds, checks apart."""
    cascade = CascadeStats()
    module = search_before if today else find
    with _Clock(module, "decode_many") as checks:
        wall, cpu = time.perf_counter(), time.process_time()
        if today:
            records = search_before.search_task_items_before(lm, items, budget=budget)
        else:
            records = find.search_task_items(lm, items, budget=budget, fast=fast, cascade=cascade)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    decoded = sum(r.tf_invalid_checked + (len(r.valid) + r.tf_valid_rejected if r.tf_valid_decoded is None
                                          else r.tf_valid_decoded) for r in records)
    return {"seconds": wall, "cpu_seconds": cpu, "checks_seconds": checks.seconds,
            "programs": sum(r.programs_scored for r in records), "decoded": decoded,
            "programs_fast": cascade.programs, "rescored": cascade.rescored,
            "max_valid_shift": cascade.max_valid_shift,
            "valid": [[p.path for p in r.valid] for r in records],
            "tf_valid": [sorted(p.path for p in r.valid) + [None] * r.tf_valid_rejected for r in records]}


def pipeline(lm, args) -> int:
    """Today's search pipeline against the current one on the same items.

    The items are cut into chunks of `--chunk`; each chunk is searched by
    both ways back to back (which goes first alternates), so a slow spell on
    a shared machine hits both about equally. Figures are sums over chunks.
    """
    per_family = -(-args.pipeline // len(FAMILIES))
    items = [it for f in FAMILIES for it in sample_items(f, per_family, "test")][: args.pipeline]
    fast = bfloat16_twin(lm) if lm.dtype == torch.float32 and native_bfloat16(lm.device) else None
    names = {True: "today (a7d7db6)", False: "current"}
    totals = {name: [] for name in names.values()}
    chunks = [items[i : i + args.chunk] for i in range(0, len(items), args.chunk)]
    for c, chunk in enumerate(chunks):
        for today in ((True, False) if c % 2 == 0 else (False, True)):
            run = _run_way(lm, fast, chunk, args.budget, today)
            totals[names[today]].append(run)
            print(f"chunk {c + 1}/{len(chunks)} {names[today]}: {run['programs']} programs in {run['seconds']:.1f} s "
                  f"(checks {run['checks_seconds']:.1f} s, {run['decoded']} decoded)", flush=True)
        old, new = totals[names[True]][-1], totals[names[False]][-1]
        assert old["valid"] == new["valid"], f"valid programs differ in chunk {c + 1}"
        assert old["programs"] == new["programs"], f"the searches asked different programs in chunk {c + 1}"
    info = lm.describe()
    figures = {}
    for name, runs in totals.items():
        keys = ("seconds", "cpu_seconds", "checks_seconds", "programs", "decoded", "programs_fast", "rescored")
        figures[name] = {k: round(sum(r[k] for r in runs), 1) for k in keys}
        figures[name]["max_valid_shift"] = round(max(r["max_valid_shift"] for r in runs), 3)
        figures[name]["programs_per_s"] = round(figures[name]["programs"] / figures[name]["seconds"], 3)
        figures[name]["search_seconds"] = round(figures[name]["seconds"] - figures[name]["checks_seconds"], 1)
    old, new = figures[names[True]], figures[names[False]]
    ratios = {"whole search (wall)": old["seconds"] / new["seconds"],
              "whole search (CPU time)": old["cpu_seconds"] / new["cpu_seconds"],
              "scoring phase, checks excluded (wall)": old["search_seconds"] / new["search_seconds"],
              "checks by decoding (wall)": old["checks_seconds"] / max(new["checks_seconds"], 1e-9)}
    per_chunk = [o["seconds"] / n["seconds"] for o, n in zip(totals[names[True]], totals[names[False]])]
    per_chunk_cpu = [o["cpu_seconds"] / n["cpu_seconds"] for o, n in zip(totals[names[True]], totals[names[False]])]
    print(f"\nmodel {info['name']} on {info['device']} ({info['dtype']}); {len(items)} test items in {len(chunks)} "
          f"chunks, MCTS budget {args.budget}; fast pass: {'bfloat16' if fast is not None else 'none'}")
    for name, f in figures.items():
        print(f"{name}: {f['programs']:.0f} programs, {f['seconds']:.1f} s wall ({f['cpu_seconds']:.1f} s CPU), "
              f"scoring {f['search_seconds']:.1f} s, checks {f['checks_seconds']:.1f} s ({f['decoded']:.0f} decoded), "
              f"{f['programs_per_s']:.2f} programs/s")
    for name, r in ratios.items():
        print(f"speed-up, {name}: {r:.2f}x")
    print(f"per-chunk wall ratios: {[round(r, 2) for r in per_chunk]}; CPU time: {[round(r, 2) for r in per_chunk_cpu]}")
    print(f"valid programs identical ({sum(len(v) for r in totals[names[True]] for v in r['valid'])} over "
          f"{len(items)} items); rescored in float32: {new['rescored']:.0f} of {new['programs_fast']:.0f}; "
          f"largest margin shift of a valid program under bfloat16: {new['max_valid_shift']}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python bench/bench_search.py " + " ".join(sys.argv[1:]), "device": info["device"],
            "dtype": info["dtype"], "items": [it.id for it in items], "budget": args.budget, "chunk": args.chunk,
            "fast": "bfloat16" if fast is not None else None, "ways": figures,
            "speedups": {k: round(v, 2) for k, v in ratios.items()}, "per_chunk_wall_ratio": [round(r, 2) for r in per_chunk],
            "per_chunk_cpu_ratio": [round(r, 2) for r in per_chunk_cpu],
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
