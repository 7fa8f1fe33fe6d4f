"""Load test: concurrent gradio_client users, and hostile clients, against the running app, on loopback only.

    .venv/bin/python bench/load_test.py                   # 8 users (+ 2 hostile), 2 minutes per condition
    .venv/bin/python bench/load_test.py --users 8 --hostile 2 --seconds 120 --out bench/results/load_test.md

Starts `app.py` in a subprocess on 127.0.0.1 (a free port), with its own
TMPDIR (so its download folder and Gradio's cache can be counted), and reads
its resident memory from /proc/<pid>/status. Then:

1. serial: each of the CASES (a prompt and a program, all different) once, one
   after another, through the `/run` API: the expected result of each;
2. warm-up: the users run concurrently for --warmup-seconds; then the server's
   RSS is sampled (the baseline: allocator arenas and caches have grown by then);
3. load, two conditions side by side: windows of --seconds / --windows
   seconds alternate between "quiet" (the --users well-behaved clients only)
   and "hostile" (the same users plus --hostile clients sending oversized,
   malformed and HTML input, max-budget searches and max-step programs on a
   long prompt). Each user, in its own thread and session, starts at a
   different case and rotates through all of them. Every response must equal
   the serial result of its case: the executor is deterministic, so any
   difference is cross-talk between users.

Exits non-zero when a well-behaved request failed or differed from its serial
result, a hostile request got anything but a refusal or a bounded answer, the
server's RSS grew by 10% or more after warm-up, or its temporary files grew
without bound. The p95 latency ratio (hostile / quiet, target <= 1.5) is
reported, not enforced: on a shared 2-core machine it is noisy.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import socket
import statistics
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
MAX_P95_RATIO = 1.5  # the target for well-behaved p95 latency with hostile clients vs without
TEMP_GROWTH = 1.25  # temporary files level off: the last sample at most this times the count at half time
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


_CLIENTS: dict[tuple[str, str], object] = {}  # (url, who) -> its gradio_client, kept across windows
_STEPS: dict[tuple[str, str], int] = {}  # (url, who) -> requests sent so far (the rotation goes on)


def _client(url: str, who: str):
    """The client of user or hostile client `who`: made once, so it keeps its session across windows
    (as a person keeps their page open)."""
    from gradio_client import Client

    if (url, who) not in _CLIENTS:
        _CLIENTS[url, who] = Client(url, verbose=False)
    return _CLIENTS[url, who]


def _user(url: str, index: int, expected: dict[Case, dict], deadline: float, log: UserLog) -> None:
    """Send requests until the deadline, starting at case `index` and rotating."""
    cases = list(expected)
    try:
        client = _client(url, f"user {index}")  # its own session, as a separate browser would have
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


# ------------------------------------------------------------------ hostile
TRACKER = '<a href="http://tracker.invalid/login">Session expired</a><img src="http://tracker.invalid/t.png">'
LONG_PROMPT = "Q: " + "Tell me about the layers of a language model, one by one, in detail. " * 28 + "\nA:"


def _upload(client, data: bytes):
    from gradio_client import handle_file

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        f.write(data)
    try:
        return client.predict(handle_file(f.name), MODEL, api_name="/upload_program")
    finally:
        os.unlink(f.name)


def _raw_call(client, api: str, data: list):
    """Call an endpoint over plain HTTP with JSON that escapes everything (gradio_client
    cannot send a lone surrogate: it fails to encode it before sending)."""
    import json
    import urllib.request

    base = client.src.rstrip("/") + "/gradio_api/call/" + api
    body = json.dumps({"data": data}, ensure_ascii=True).encode()
    request = urllib.request.Request(base, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        event = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{base}/{event}", timeout=120) as response:
        stream = response.read().decode("utf-8", "replace")
    if "event: error" in stream:
        raise RuntimeError(stream.split("event: error", 1)[1].strip()[:300])
    return stream


# What a hostile client sends, in turn: (kind, request). Each must be refused
# with a message or answered within the operator's limits; none may hurt the
# well-behaved users beyond its share of the machine.
HOSTILE_REQUESTS = (
    ("oversized upload", lambda c: _upload(c, b'{"path": [' + b"0, " * 100_000 + b'0], "num_layers": 30}')),
    ("deep JSON upload", lambda c: _upload(c, b'{"path": ' + b"[" * 30_000 + b"]" * 30_000 + b"}")),
    ("malformed program", lambda c: c.predict("0-29x99999999999, <b>", MODEL, api_name="/set_program_text")),
    ("model as a list", lambda c: c.predict("Hi", "full", "", ["x", "y"], False, api_name="/run")),
    ("HTML model", lambda c: c.predict(TRACKER, api_name="/model_status")),
    ("HTML prompt", lambda c: c.predict(TRACKER + " What is 2+2?", "full", TRACKER, MODEL, False, api_name="/run")),
    ("lone surrogate", lambda c: _raw_call(c, "run", ["\ud800 What is 2+2?", "full", "", MODEL, False, None])),
    ("max-budget search", lambda c: c.predict("Which planet is the largest in our solar system? Answer in one word.",
                                              "Jupiter", "greedy", 400, MODEL, False, api_name="/search")),
    ("max-step program", lambda c: c.predict(LONG_PROMPT, "0-29x4", "", MODEL, False, api_name="/run")),
)


@dataclass
class HostileLog:
    """Per kind of hostile request: (seconds, outcome) with outcome "answered" or "refused: <message>"."""

    outcomes: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # a client that could not connect


def _hostile(url: str, index: int, deadline: float, log: HostileLog) -> None:
    who = f"hostile {index}"
    try:
        client = _client(url, who)
    except Exception as exc:
        log.errors.append(f"{who}: connect: {exc!r}"[:300])
        return
    _STEPS.setdefault((url, who), index * len(HOSTILE_REQUESTS) // 2)  # the two clients start apart
    while time.monotonic() < deadline:
        kind, send = HOSTILE_REQUESTS[_STEPS[url, who] % len(HOSTILE_REQUESTS)]
        _STEPS[url, who] += 1
        started = time.perf_counter()
        try:
            send(client)
            outcome = "answered"
        except Exception as exc:  # a refusal reaches gradio_client as an exception carrying the message
            outcome = f"refused: {exc}"[:200]
        log.outcomes.setdefault(kind, []).append((time.perf_counter() - started, outcome))


@dataclass
class Phase:
    """Merged logs of all users over one phase (one condition, all its windows)."""

    seconds: float
    latencies: list[float]
    errors: list[str]
    mismatches: list[str]
    hostile: HostileLog = field(default_factory=HostileLog)

    @property
    def requests(self) -> int:
        return len(self.latencies) + len(self.errors)

    def add(self, other: Phase) -> None:
        self.seconds += other.seconds
        self.latencies += other.latencies
        self.errors += other.errors
        self.mismatches += other.mismatches
        for kind, items in other.hostile.outcomes.items():
            self.hostile.outcomes.setdefault(kind, []).extend(items)
        self.hostile.errors += other.hostile.errors


def run_users(url: str, expected: dict[Case, dict], users: int, seconds: float, hostile: int = 0) -> Phase:
    """`users` concurrent clients (and `hostile` hostile ones) for `seconds`;
    requests running at the deadline finish and count."""
    logs = [UserLog() for _ in range(users)]
    bad = HostileLog()
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    threads = [threading.Thread(target=_user, args=(url, i, expected, deadline, logs[i]), daemon=True)
               for i in range(users)]
    threads += [threading.Thread(target=_hostile, args=(url, i, deadline, bad), daemon=True) for i in range(hostile)]
    for t in threads:
        t.start()
    for t in threads[:users]:
        t.join()
    seconds_taken = time.perf_counter() - started  # the well-behaved users' window
    for t in threads[users:]:
        t.join()
    merged = Phase(seconds_taken, [], [], [], bad)
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


def count_files(folder: Path) -> int:
    """Files under a folder, recursively (the server's temporary files)."""
    return sum(len(files) for _, _, files in os.walk(folder))


@contextlib.contextmanager
def app_server(timeout_s: float = 300, env_extra: dict | None = None):
    """`app.py` in a subprocess on a free loopback port, its TMPDIR a fresh folder;
    yields (url, pid, that folder); stopped on exit."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="polar-load-") as tmp:
        temp = Path(tmp) / "tmp"
        temp.mkdir()
        env = dict(os.environ, GRADIO_SERVER_NAME=HOST, GRADIO_SERVER_PORT=str(port), TMPDIR=str(temp),
                   GRADIO_TEMP_DIR=str(temp / "gradio"), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", **(env_extra or {}))
        log = Path(tmp) / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://{HOST}:{port}/"
        try:
            _wait_until_up(url, proc, log, timeout_s)
            yield url, proc.pid, temp
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class RssSampler:
    """Samples a process's RSS (and the files under its TMPDIR) every `every` seconds in a background thread."""

    def __init__(self, pid: int, every: float = 10.0, temp: Path | None = None):
        self.pid, self.every, self.temp = pid, every, temp
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self.files: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._start = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append((time.monotonic() - self._start, rss_mib(self.pid)))
            if self.temp is not None:
                self.files.append(count_files(self.temp))

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


def _latency_row(name: str, users: str, phase: Phase) -> str:
    lat = phase.latencies
    return (f"| {name} | {users} | {phase.seconds:.0f} | {phase.requests} | {phase.requests / phase.seconds:.2f} | "
            f"{len(phase.errors)} | {len(phase.mismatches)} | {percentile(lat, 50):.2f} | {percentile(lat, 95):.2f} | "
            f"{percentile(lat, 100):.2f} |")


def _hostile_rows(log: HostileLog) -> list[str]:
    rows = ["| hostile request | sent | refused | answered | median (s) | max (s) | first refusal |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for kind, _ in HOSTILE_REQUESTS:
        items = log.outcomes.get(kind, [])
        refused = [o for _, o in items if o.startswith("refused")]
        first = refused[0][len("refused: "):].replace("|", "/").replace("\n", " ")[:90] if refused else ""
        rows.append(f"| {kind} | {len(items)} | {len(refused)} | {len(items) - len(refused)} | "
                    f"{percentile([t for t, _ in items], 50):.2f} | {percentile([t for t, _ in items], 100):.2f} | "
                    f"{first} |")
    return rows


# Kinds that must be refused with a message; the others may also be answered (within the limits).
MUST_REFUSE = {"oversized upload", "deep JSON upload", "malformed program", "model as a list", "HTML model",
               "lone surrogate"}
CRASH = "has not enabled verbose error reporting"  # gradio_client's words for an exception we did not turn into a message


def hostile_failures(log: HostileLog) -> list[str]:
    """Hostile requests that got what they must not: an answer where a refusal is due, or a crash."""
    bad = []
    for kind, items in log.outcomes.items():
        for _, outcome in items:
            if (kind in MUST_REFUSE and outcome == "answered") or CRASH in outcome:
                bad.append(f"{kind}: {outcome}")
    return bad


def rss_trend(samples: list[tuple[float, float]]) -> float:
    """RSS growth over the load: median of the last quarter of samples / median of the first quarter - 1."""
    values = [mib for _, mib in samples]
    if len(values) < 4:
        return values[-1] / values[0] - 1 if values else 0.0
    quarter = len(values) // 4
    return statistics.median(values[-quarter:]) / statistics.median(values[:quarter]) - 1


def files_level_off(samples: list[int]) -> bool:
    """Whether the temporary files stopped growing: the last sample is at most
    TEMP_GROWTH times the one at half time (old files are deleted as new ones come)."""
    return len(samples) < 2 or samples[-1] <= TEMP_GROWTH * samples[len(samples) // 2]


def verdict(quiet: Phase, hostile: Phase, warm: Phase, growth: float, files: list[int]) -> tuple[bool, str]:
    errors = (len(warm.errors) + len(quiet.errors) + len(hostile.errors) + len(hostile.hostile.errors)
              + len(hostile_failures(hostile.hostile)))
    mismatches = len(warm.mismatches) + len(quiet.mismatches) + len(hostile.mismatches)
    ratio = percentile(hostile.latencies, 95) / percentile(quiet.latencies, 95)
    level = files_level_off(files)
    ok = errors == 0 and mismatches == 0 and growth < MAX_RSS_GROWTH and level
    return ok, (f"{'PASS' if ok else 'FAIL'} (errors {errors}, mismatches {mismatches}, RSS growth {growth:+.1%}, "
                f"temporary files {'level off' if level else 'keep growing'}: at most {max(files, default=0)}); "
                f"p95 ratio hostile / quiet {ratio:.2f} "
                f"({'within' if ratio <= MAX_P95_RATIO else 'over'} the {MAX_P95_RATIO}x target)")


def report(args, serial_s: float, warm: Phase, quiet: Phase, hostile: Phase, rss_warm: float, rss_end: float,
           sampler: RssSampler, files: tuple[int, int], load_avg: tuple[float, float, float], env: dict) -> str:
    from app.ui import CONCURRENCY

    growth = rss_trend(sampler.samples)
    samples = sampler.samples
    max_files = max([files[1], *sampler.files])
    _, text = verdict(quiet, hostile, warm, growth, sampler.files)
    window = args.seconds / args.windows
    lines = [
        "# Load test: well-behaved and hostile clients against the running app (loopback)",
        "",
        f"Command: `{args.command}`",
        "",
        f"- machine: {_machine()}",
        f"- load average at the start (1/5/15 min): {load_avg[0]:.2f} / {load_avg[1]:.2f} / {load_avg[2]:.2f}; "
        f"at the end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine is shared: other jobs ran too)",
        f"- server: `app.py` in a subprocess on {HOST} (model {MODEL}, float32, {CONCURRENCY} runs at once: "
        "`CONCURRENCY` in app/ui.py; searches and evaluations one at a time, beside them); operator limits "
        + ", ".join(f"`{k}={v}`" for k, v in env.items()) + "; clients: gradio_client, one thread and one "
        "session per client",
        f"- {len(CASES)} cases, each a different short prompt and a different program; every well-behaved request "
        "is `/run` (edited program + full program + analysis + 5 figures); user i starts at case i and rotates",
        f"- serial pass (expected results): {len(CASES)} requests in {serial_s:.1f} s",
        f"- warm-up: {args.users} users and {args.hostile} hostile clients for {warm.seconds:.0f} s, "
        f"{warm.requests} well-behaved requests, {len(warm.errors)} errors, {len(warm.mismatches)} mismatches",
        f"- the two conditions side by side: {2 * args.windows} windows of {window:.0f} s, alternating quiet / "
        f"hostile, so both see the same machine load; {args.hostile} hostile clients in the hostile windows, "
        "each sending the requests below in turn, without pause",
        "",
        "Well-behaved users (latency: the client's wall time per request, queueing included):",
        "",
        "| condition | clients | seconds | requests | req/s | errors | mismatches | p50 (s) | p95 (s) | max (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        _latency_row("quiet", str(args.users), quiet),
        _latency_row("hostile", f"{args.users} + {args.hostile}", hostile),
        "",
        f"p95 latency with hostile clients / without: **{percentile(hostile.latencies, 95) / percentile(quiet.latencies, 95):.2f}x** "
        f"(target <= {MAX_P95_RATIO}x); p50 {percentile(hostile.latencies, 50) / percentile(quiet.latencies, 50):.2f}x.",
        "",
        "Hostile requests (a refusal is the message the client got):",
        "",
        *_hostile_rows(hostile.hostile),
        "",
        f"Server RSS: {rss_warm:.0f} MiB after warm-up, {rss_end:.0f} MiB at the end; growth {growth:+.1%} "
        f"(limit < {MAX_RSS_GROWTH:.0%}), measured as the median of the last quarter of the samples over the "
        "median of the first quarter (one sample swings by +-10% with what is running at that moment). "
        "Samples every 10 s (MiB): " + ", ".join(f"{mib:.0f}" for _, mib in samples) + ".",
        "",
        f"Temporary files under the server's TMPDIR (its download folder and Gradio's cache): {files[0]} after "
        f"warm-up, {files[1]} at the end, at most {max_files}; they must level off (the last sample at most "
        f"{TEMP_GROWTH}x the one at half time: files older than POLAR_FILE_SECONDS are deleted). Samples every "
        "10 s: " + ", ".join(map(str, sampler.files)) + ".",
        "",
        f"Verdict: {text}.",
    ]
    for what, items in (("errors", warm.errors + quiet.errors + hostile.errors + hostile.hostile.errors
                         + hostile_failures(hostile.hostile)),
                        ("mismatches", warm.mismatches + quiet.mismatches + hostile.mismatches)):
        if items:
            lines += ["", f"First {what}:", *[f"- `{x}`" for x in items[:5]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--hostile", type=int, default=2, help="hostile clients in the hostile windows")
    parser.add_argument("--seconds", type=float, default=120, help="per condition (quiet, hostile)")
    parser.add_argument("--windows", type=int, default=4, help="windows per condition, alternating")
    parser.add_argument("--warmup-seconds", type=float, default=30)
    parser.add_argument("--request-seconds", type=float, default=10, help="the server's POLAR_REQUEST_SECONDS")
    parser.add_argument("--job-seconds", type=float, default=20, help="the server's POLAR_JOB_SECONDS")
    parser.add_argument("--file-seconds", type=float, default=60, help="the server's POLAR_FILE_SECONDS")
    parser.add_argument("--malloc-arena-max", type=int, default=2,
                        help="the server's MALLOC_ARENA_MAX (glibc): fewer allocator arenas, less RSS creep from "
                             "freed tensors of many threads; 0 leaves glibc's default")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args(argv)
    args.command = ".venv/bin/python bench/load_test.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = {"POLAR_REQUEST_SECONDS": f"{args.request_seconds:g}", "POLAR_JOB_SECONDS": f"{args.job_seconds:g}",
           "POLAR_FILE_SECONDS": f"{args.file_seconds:g}"}
    if args.malloc_arena_max:
        env["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)

    load_avg = os.getloadavg()
    with app_server(env_extra=env) as (url, pid, temp):
        print(f"app on {url} (pid {pid}); serial pass over {len(CASES)} cases", flush=True)
        started = time.perf_counter()
        expected = serial_results(url)
        serial_s = time.perf_counter() - started
        # Hostile clients in the warm-up too: the RSS baseline then includes the
        # allocator's one-time growth for their largest requests; growth after it is a leak.
        print(f"warm-up: {args.users} users + {args.hostile} hostile for {args.warmup_seconds:.0f} s", flush=True)
        warm = run_users(url, expected, args.users, args.warmup_seconds, hostile=args.hostile)
        rss_warm, files_warm = rss_mib(pid), count_files(temp)
        quiet, hostile = Phase(0, [], [], []), Phase(0, [], [], [])
        with RssSampler(pid, temp=temp) as sampler:
            for w in range(2 * args.windows):
                noisy = w % 2 == 1
                print(f"window {w + 1}/{2 * args.windows}: {'hostile' if noisy else 'quiet'} "
                      f"(RSS {rss_mib(pid):.0f} MiB, {count_files(temp)} temporary files)", flush=True)
                phase = run_users(url, expected, args.users, args.seconds / args.windows,
                                  hostile=args.hostile if noisy else 0)
                (hostile if noisy else quiet).add(phase)
        rss_end, files_end = rss_mib(pid), count_files(temp)
    text = report(args, serial_s, warm, quiet, hostile, rss_warm, rss_end, sampler, (files_warm, files_end), load_avg,
                  env)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    ok, _ = verdict(quiet, hostile, warm, rss_trend(sampler.samples), sampler.files)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
