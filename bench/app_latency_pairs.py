"""Per-edit wall and CPU time of the page's work, for A/B runs of two checkouts on a busy host.

    cd <checkout> && /path/to/.venv/bin/python /path/to/bench/app_latency_pairs.py <label>

Runs `bench_app_latency.time_edit` of the checkout in the current directory
(its own `app/` and `polar_core/`) over the same 20 edits and prints one JSON
line: median wall seconds per edit, median CPU seconds (process time, less
sensitive to other jobs on the host), median seconds besides generating, and
the load average. Alternate two checkouts, several times, to compare them
when the host is too busy for bench_app_latency's absolute figures.
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

from app import handlers as H  # noqa: E402
from app.session import Session, get_model  # noqa: E402
from bench.bench_app_latency import PROMPT, edits, time_edit  # noqa: E402


def main(label: str) -> None:
    torch.set_num_threads(2)
    lm, session = get_model(None), Session()
    H.run(lm, session, PROMPT, "full", "")  # the baseline, once per prompt as in the app
    time_edit(lm, session, "0-29")  # warm-up
    wall, cpu, besides = [], [], []
    for text in edits(lm.num_layers, 20):
        w0, c0 = time.perf_counter(), time.process_time()
        seconds, generating, _ = time_edit(lm, session, text)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        besides.append(seconds - generating)
    med = statistics.median
    print(json.dumps({"tree": label, "wall": round(med(wall), 3), "cpu": round(med(cpu), 3),
                      "besides_generating": round(med(besides), 3), "load": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
