"""Load test: concurrent gradio_client users against the running app, on loopback only.

    .venv/bin/python bench/load_test.py                   # 8 users, 2 minutes
    .venv/bin/python bench/load_test.py --users 8 --seconds 120 --out bench/results/load_test.md

Starts `app.py` in a subprocess on 127.0.0.1 (a free port), so its resident
memory can be read from /proc/<pid>/status. Then:

1. serial: each of the CASES (a prompt and a program, all different) once, one
   after another, through the `/run` API: the expected result of each;
2. warm-up: the users run concurrently for --warmup-seconds; then the server's
   RSS is sampled (the baseline: allocator arenas and caches have grown by then);
3. load: --users concurrent clients, each in its own thread and session, each
   starting at a different case and rotating through all of them, for
   --seconds. Every response must equal the serial result of its case: the
   executor is deterministic, so any difference is cross-talk between users.

Exits non-zero when a request failed, a response differed from the serial
result, or the server's RSS grew by 10% or more after warm-up.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HOST = "127.0.0.1"  # loopback only: the load never leaves this machine
MAX_RSS_GROWTH = 0.10
MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Case:
    """One request: a short zero-shot prompt (answers stop at a newline) and a program."""

    prompt: str
    program: str


# Different prompts and different programs (skips, in-place loops, a block
# loop, early exit), so that concurrent users never run the same thing.
CASES = (
    Case("Q: What is the capital of France?\nA:", "full"),
    Case("Q: What is the opposite of hot?\nA:", "0-19"),
    Case("Q: What is the plural of mouse?\nA:", "0-11, 12-15x2, 16-29"),
    Case("Q: What is 3 + 4?\nA:", "0-24, 27-29"),
    Case("Q: What number comes after 41?\nA:", "0-8, 13-29"),
    Case("Q: What is the capital of Japan?\nA:", "0-14, 10-14, 15-29"),
    Case("Q: What color is the sky?\nA:", "0-5x2, 6-29"),
    Case("Q: What is the opposite of up?\nA:", "0-2, 4-12, 14-29"),
)


# ------------------------------------------------------------------ requests
def run_case(client, case: Case) -> dict:
    """The parts of one /run response that must not depend on who else is running:
    its stamp, both answers (text and highlighted words), layer counts, verdicts.
    Timings are left out, and so are the per-step numbers (a user's earlier
    edits change how an answer is decoded, in passes of several tokens, and
    so the last float digits of the lens one token into an answer)."""
    outputs = client.predict(case.prompt, case.program, "", MODEL, api_name="/run")
    details = outputs[-1]  # the run's record (the page's "Raw numbers")
    result = {k: v for k, v in details.items() if not k.endswith("_seconds") and k != "data"}
    result["full_spans"], result["edited_spans"] = outputs[1], outputs[3]
    return result


def serial_results(url: str, cases=CASES) -> dict[Case, dict]:
    """Each case run once, alone: the expected result of every later request."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    return {case: run_case(client, case) for case in cases}


@dataclass
class UserLog:
    """What one simulated user saw."""

    latencies: list[float] = field(default_factory=list)  # seconds per request
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def _user(url: str, index: int, expected: dict[Case, dict], deadline: float, log: UserLog) -> None:
    """Send requests until the deadline, starting at case `index` and rotating."""
    from gradio_client import Client

    cases = list(expected)
    try:
        client = Client(url, verbose=False)  # its own session, as a separate browser would have
    except Exception as exc:  # a user that cannot connect is an error, not a crash of the test
        log.errors.append(f"user {index}: connect: {exc!r}"[:300])
        return
    step = 0
    while time.monotonic() < deadline:
        case = cases[(index + step) % len(cases)]
        step += 1
        started = time.perf_counter()
        try:
            got = run_case(client, case)
        except Exception as exc:  # any failure counts; keep going like a real user would
            log.errors.append(f"user {index}: {case.program}: {exc!r}"[:300])
            continue
        log.latencies.append(time.perf_counter() - started)
        if got != expected[case]:
            log.mismatches.append(f"user {index}: {case.program}: got {got!r:.200}, expected {expected[case]!r:.200}")


@dataclass
class Phase:
    """Merged logs of all users over one phase."""

    seconds: float
    latencies: list[float]
    errors: list[str]
    mismatches: list[str]

    @property
    def requests(self) -> int:
        return len(self.latencies) + len(self.errors)


def run_users(url: str, expected: dict[Case, dict], users: int, seconds: float) -> Phase:
    """`users` concurrent clients for `seconds`; requests running at the deadline finish and count."""
    logs = [UserLog() for _ in range(users)]
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    threads = [threading.Thread(target=_user, args=(url, i, expected, deadline, logs[i]), daemon=True)
               for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = Phase(time.perf_counter() - started, [], [], [])
    for log in logs:
        merged.latencies += log.latencies
        merged.errors += log.errors
        merged.mismatches += log.mismatches
    return merged


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN when there are no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))  # 1-based
    return ordered[min(rank, len(ordered)) - 1]


# -------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # the line reads "VmRSS:  123456 kB"
    raise RuntimeError(f"no VmRSS for process {pid}")


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with status {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"app.py did not answer on {url} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def app_server(timeout_s: float = 300):
    """`app.py` in a subprocess on a free loopback port; yields (url, pid); stopped on exit."""
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME=HOST, GRADIO_SERVER_PORT=str(port),
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="polar-load-") as tmp:
        log = Path(tmp) / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://{HOST}:{port}/"
        try:
            _wait_until_up(url, proc, log, timeout_s)
            yield url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class RssSampler:
    """Samples a process's RSS every `every` seconds in a background thread."""

    def __init__(self, pid: int, every: float = 10.0):
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._start = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append((time.monotonic() - self._start, rss_mib(self.pid)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# -------------------------------------------------------------------- report
def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores visible, CPU only (no GPU), {platform.system()} {platform.release()}"


def report(args, serial_s: float, warm: Phase, load: Phase, rss_warm: float, rss_end: float,
           samples: list[tuple[float, float]], load_avg: tuple[float, float, float]) -> str:
    from app.ui import CONCURRENCY

    growth = rss_end / rss_warm - 1
    half = [mib for t, mib in samples if t >= load.seconds / 2] or [rss_end]
    errors, mismatches = len(warm.errors) + len(load.errors), len(warm.mismatches) + len(load.mismatches)
    lines = [
        "# Load test: concurrent users against the running app (loopback)",
        "",
        f"Command: `{args.command}`",
        "",
        f"- machine: {_machine()}",
        f"- load average at the start (1/5/15 min): {load_avg[0]:.2f} / {load_avg[1]:.2f} / {load_avg[2]:.2f}",
        f"- server: `app.py` in a subprocess on {HOST} (model {MODEL}, float32, {CONCURRENCY} model calls at once: "
        "`CONCURRENCY` in app/ui.py); clients: gradio_client, one thread and one session per user",
        f"- {len(CASES)} cases, each a different short prompt and a different program; every request is `/run` "
        "(edited program + full program + analysis + 5 figures); user i starts at case i and rotates",
        f"- serial pass (expected results): {len(CASES)} requests in {serial_s:.1f} s",
        f"- warm-up: {args.users} users for {warm.seconds:.0f} s, {warm.requests} requests, "
        f"{len(warm.errors)} errors, {len(warm.mismatches)} mismatches",
        "",
        "| users | seconds | requests | req/s | errors | mismatches | p50 latency (s) | p95 latency (s) | max (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.users} | {load.seconds:.0f} | {load.requests} | {load.requests / load.seconds:.2f} | "
        f"{len(load.errors)} | {len(load.mismatches)} | {percentile(load.latencies, 50):.2f} | "
        f"{percentile(load.latencies, 95):.2f} | {percentile(load.latencies, 100):.2f} |",
        "",
        f"Server RSS: {rss_warm:.0f} MiB after warm-up, {rss_end:.0f} MiB at the end: growth {growth:+.1%} "
        f"(limit < {MAX_RSS_GROWTH:.0%}); over the second half of the run {half[0]:.0f} -> {rss_end:.0f} MiB "
        f"({rss_end / half[0] - 1:+.1%}). Samples every 10 s (MiB): "
        + ", ".join(f"{mib:.0f}" for _, mib in samples) + ".",
        "",
        f"Latency is the client's wall time per request, queueing included: {args.users} users share "
        f"{CONCURRENCY} model slots, so much of it is waiting in the queue.",
        "",
        f"Verdict: {'PASS' if errors == 0 and mismatches == 0 and growth < MAX_RSS_GROWTH else 'FAIL'} "
        f"(errors {errors}, mismatches {mismatches}, RSS growth {growth:+.1%}).",
    ]
    for what, items in (("errors", warm.errors + load.errors), ("mismatches", warm.mismatches + load.mismatches)):
        if items:
            lines += ["", f"First {what}:", *[f"- `{x}`" for x in items[:5]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--warmup-seconds", type=float, default=30)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args(argv)
    args.command = ".venv/bin/python bench/load_test.py " + " ".join(argv if argv is not None else sys.argv[1:])

    load_avg = os.getloadavg()
    with app_server() as (url, pid):
        print(f"app on {url} (pid {pid}); serial pass over {len(CASES)} cases", flush=True)
        started = time.perf_counter()
        expected = serial_results(url)
        serial_s = time.perf_counter() - started
        print(f"warm-up: {args.users} users for {args.warmup_seconds:.0f} s", flush=True)
        warm = run_users(url, expected, args.users, args.warmup_seconds)
        rss_warm = rss_mib(pid)
        print(f"load: {args.users} users for {args.seconds:.0f} s (RSS after warm-up {rss_warm:.0f} MiB)", flush=True)
        with RssSampler(pid) as sampler:
            load = run_users(url, expected, args.users, args.seconds)
        rss_end = rss_mib(pid)
    text = report(args, serial_s, warm, load, rss_warm, rss_end, sampler.samples, load_avg)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    failed = warm.errors + load.errors + warm.mismatches + load.mismatches
    return 1 if failed or rss_end / rss_warm - 1 >= MAX_RSS_GROWTH else 0


if __name__ == "__main__":
    sys.exit(main())
