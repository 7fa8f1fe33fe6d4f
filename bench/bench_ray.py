"""Program search spread over Ray workers vs one process: programs scored per second.

    .venv/bin/python bench/bench_ray.py --items 16 --budget 24 --repeats 2 --out bench/results/ray.md

Side by side in one run, on the embedded model: `search_task_items` in this
process (torch on all `--threads`), then on a local Ray with 1 and with 2
workers (one torch thread each, each holding its own copy of the model),
alternating, medians. Ray start-up and the workers' model loads happen before
the clock starts; the time is the search with its decoding checks. The
records must equal the single-process ones (the script exits 1 otherwise).
On a CPU-only host these are CPU workers sharing one machine's cores, so the
ratio measures how well the cores are used, not a cluster's scaling.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from polar_core.engine.cpu.layout import cpuinfo_field  # noqa: E402
from polar_core.engine.models import DEFAULT_MODEL, load_model  # noqa: E402
from polar_core.program import Program  # noqa: E402
from polar_core.study import distributed, tasks  # noqa: E402
from polar_core.study.find import search_task_items  # noqa: E402


def _items(n: int):
    families = tasks.FAMILIES
    per = -(-n // len(families))
    return [it for f in families for it in tasks.sample_items(f, per, "test")][:n]


def _programs(records) -> int:
    return sum(r.programs_scored for r in records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--budget", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(DEFAULT_MODEL, device="cpu")
    items = _items(args.items)
    search = dict(methods=("mcts",), budget=args.budget, seed=0)
    reference = search_task_items(lm, items, **search)  # warm-up and the records to match
    runs: dict[str, list[float]] = {"one process": [], "Ray, 1 worker": [], "Ray, 2 workers": []}
    distributed.init_ray(None, num_cpus=args.threads)
    pools = {name: distributed.WorkerPool(distributed.RaySettings(workers=n, model=DEFAULT_MODEL, device="cpu"))
             for name, n in (("Ray, 1 worker", 1), ("Ray, 2 workers", 2))}
    mismatches = 0
    for _ in range(args.repeats):
        started = time.perf_counter()
        search_task_items(lm, items, **search)
        runs["one process"].append(time.perf_counter() - started)
        for name, pool in pools.items():
            with pool:
                warm = (([tasks.build_prompt(items[0])], [Program.full(lm.num_layers)]), {})
                pool.map("answer_texts", [warm] * len(pool._actors))  # every worker has loaded its model
                started = time.perf_counter()
                records = pool.search_task_items(items, chunk=args.chunk, **search)
                runs[name].append(time.perf_counter() - started)
            mismatches += [(r.item_id, [p.path for p in r.valid]) for r in records] != [
                (r.item_id, [p.path for p in r.valid]) for r in reference]
    programs = _programs(reference)
    base = statistics.median(runs["one process"])
    lines = [
        "# Program search on Ray workers vs one process",
        "",
        f"Command: `python bench/{Path(__file__).name} {shlex.join(sys.argv[1:])}`",
        "",
        f"Host: {cpuinfo_field('model name') or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end; {torch.get_num_threads()} torch threads in the "
        f"single process, 1 per Ray worker; {len(items)} test-split items, MCTS budget {args.budget}, "
        f"{programs} programs scored per run (plus their decoding checks); medians of {args.repeats} "
        "alternating runs. CPU workers on one machine's cores: the ratio says how the cores are used, "
        "not how a cluster scales.",
        "",
        "| run | seconds | programs / s | vs one process |",
        "|---|---:|---:|---:|",
    ]
    for name, times in runs.items():
        t = statistics.median(times)
        lines.append(f"| {name} | {t:.1f} | {programs / t:.1f} | {base / t:.2f}x |")
    lines += ["", f"Records equal to the single-process run in {args.repeats * 2 - mismatches} of "
              f"{args.repeats * 2} Ray runs."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
