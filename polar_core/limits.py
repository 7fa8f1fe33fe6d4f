"""Request limits, configurable by environment variables, enforced where input
enters (library calls from the app and the CLI) so a hosted demo stays usable.

    POLAR_MAX_PROMPT_TOKENS   prompt length after the chat template (default 512)
    POLAR_MAX_NEW_TOKENS      tokens generated per request (default 128)
    POLAR_MAX_STEPS_PER_LAYER program steps per model layer (default 4)
    POLAR_MAX_SEARCH_BUDGET   programs scored by one search (default 400)
    POLAR_REQUEST_SECONDS     wall time of one generation, prompt pass included (default 60)
    POLAR_JOB_SECONDS         wall time of one search or evaluation (default 300): it stops
                              there and shows what it has, marked partial
    POLAR_FILE_SECONDS        how long the app keeps download files, its own and Gradio's
                              copies (default 600)
    POLAR_MAX_UPLOAD_BYTES    size of an uploaded program JSON (default 65536)
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, fields


class LimitError(ValueError):
    """A request exceeds one of the configured limits."""


MAX_JSON_DEPTH = 32  # nesting of uploaded JSON; a program file is 2 deep, a supervision file 4
MAX_JSON_DIGITS = 18  # digits of one JSON integer: no layer index or count has more


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 512
    max_new_tokens: int = 128
    max_steps_per_layer: int = 4
    max_search_budget: int = 400
    request_seconds: float = 60.0
    max_upload_bytes: int = 65536
    job_seconds: float = 300.0
    file_seconds: float = 600.0

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise LimitError(f"limit {f.name} must be positive, got {getattr(self, f.name)}")

    @classmethod
    def from_env(cls, environ=None) -> "Limits":
        """Defaults overridden by POLAR_<NAME> variables; a malformed value is an error."""
        environ = os.environ if environ is None else environ
        names = {
            "max_prompt_tokens": "POLAR_MAX_PROMPT_TOKENS",
            "max_new_tokens": "POLAR_MAX_NEW_TOKENS",
            "max_steps_per_layer": "POLAR_MAX_STEPS_PER_LAYER",
            "max_search_budget": "POLAR_MAX_SEARCH_BUDGET",
            "request_seconds": "POLAR_REQUEST_SECONDS",
            "max_upload_bytes": "POLAR_MAX_UPLOAD_BYTES",
            "job_seconds": "POLAR_JOB_SECONDS",
            "file_seconds": "POLAR_FILE_SECONDS",
        }
        values = {}
        for f in fields(cls):
            raw = environ.get(names[f.name])
            if raw is None:
                continue
            try:
                values[f.name] = float(raw) if f.type in (float, "float") else int(raw)
            except ValueError:
                raise LimitError(f"{names[f.name]}={raw!r} is not a number") from None
            if values[f.name] != values[f.name] or values[f.name] in (float("inf"), float("-inf")):
                raise LimitError(f"{names[f.name]}={raw!r} is not a finite number")
        return cls(**values)

    def max_steps(self, num_layers: int) -> int:
        return self.max_steps_per_layer * num_layers

    def check_new_tokens(self, n: int) -> int:
        return _check_count(n, self.max_new_tokens, "new tokens")

    def check_search_budget(self, n: int) -> int:
        return _check_count(n, self.max_search_budget, "search budget")

    def check_upload(self, data: bytes | str) -> None:
        size = len(data.encode() if isinstance(data, str) else data)
        if size > self.max_upload_bytes:
            raise LimitError(f"the file has {size} bytes; uploads are at most {self.max_upload_bytes // 1024} KB "
                             f"({self.max_upload_bytes} bytes)")


def _check_count(n, limit: int, what: str) -> int:
    """A positive whole number no larger than `limit` (bools and floats are refused)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise LimitError(f"{what} must be a positive whole number, got {n!r}")
    if n > limit:
        raise LimitError(f"{what}: {n} requested; the limit is {limit}")
    return n


class Stopped(Exception):
    """Long work (a search, an evaluation) ended early: its `Deadline` passed or was cancelled."""


class Deadline:
    """A wall-clock limit and an optional cancel flag, polled by long work.

    Calling it says whether to stop; `reason` then says why ("time": the
    operator's limit; "cancelled": the client left or pressed Stop).
    """

    def __init__(self, seconds: float, cancelled: Callable[[], bool] | None = None):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.cancelled = cancelled
        self.reason: str | None = None

    def __call__(self) -> bool:
        if self.reason is None:
            if self.cancelled is not None and self.cancelled():
                self.reason = "cancelled"
            elif time.monotonic() > self.end:
                self.reason = "time"
        return self.reason is not None

    def describe(self) -> str:
        """Why the work stopped, for a message."""
        if self.reason == "time":
            return f"stopped at the time limit of {self.seconds:g} s"
        return "stopped: cancelled" if self.reason == "cancelled" else "not stopped"


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest, counted without parsing it.

    Python's parser recurses per level, so 30,000 levels raise RecursionError;
    this counts brackets outside strings in C-speed passes (numpy) instead.
    """
    import numpy as np  # numpy ships with torch and pandas; imported here to keep `limits` light

    brackets = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    step = (np.isin(brackets, (ord("["), ord("{"))).astype(np.int64)
            - np.isin(brackets, (ord("]"), ord("}"))).astype(np.int64))
    return int(np.cumsum(step).max(initial=0))


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_DIGITS:
        raise LimitError(f"a number has {len(text.lstrip('-'))} digits; at most {MAX_JSON_DIGITS} are accepted")
    return int(text)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def load_json(data: bytes | str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH):
    """Parse untrusted JSON with its size, nesting and integers bounded before any work.

    Raises:
        LimitError: too large, nested too deep, or an integer too long.
        ValueError: not UTF-8, or not JSON (json.JSONDecodeError).
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise LimitError(f"the JSON has {len(raw)} bytes; at most {max_bytes} are accepted")
    depth = json_depth(raw)
    if depth > max_depth:
        raise LimitError(f"the JSON nests {depth} levels deep; at most {max_depth} are accepted")
    return json.loads(raw.decode("utf-8"), parse_int=_bounded_int, parse_constant=_no_constant)


def read_capped(path, max_bytes: int) -> bytes:
    """A file's bytes, at most max_bytes: read with a cap, since a pipe or a
    device reports no size (a FIFO's st_size is 0) and never ends."""
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise LimitError(f"{path}: more than {max_bytes} bytes; the limit is {max_bytes}")
    return raw
