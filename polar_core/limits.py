"""Request limits, configurable by environment variables, enforced where input
enters (library calls from the app and the CLI) so a hosted demo stays usable.

    POLAR_MAX_PROMPT_TOKENS   prompt length after the chat template (default 512)
    POLAR_MAX_NEW_TOKENS      tokens generated per request (default 128)
    POLAR_MAX_STEPS_PER_LAYER program steps per model layer (default 4)
    POLAR_MAX_SEARCH_BUDGET   programs scored by one search (default 400)
    POLAR_REQUEST_SECONDS     wall time of one generation (default 60)
    POLAR_MAX_UPLOAD_BYTES    size of an uploaded program JSON (default 65536)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields


class LimitError(ValueError):
    """A request exceeds one of the configured limits."""


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 512
    max_new_tokens: int = 128
    max_steps_per_layer: int = 4
    max_search_budget: int = 400
    request_seconds: float = 60.0
    max_upload_bytes: int = 65536

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
