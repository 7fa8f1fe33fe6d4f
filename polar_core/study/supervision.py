"""Supervision files: questions with the programs known to answer them.

Reads and writes the reference implementation's (tianyi-lab/PoLar)
``merged_mcts_samples.json``. The file is one of

- an object with a ``"samples"`` list (what ``save_supervision`` writes);
- a plain list of samples;
- an object mapping sample ids to samples.

A sample holds ``question``, the answer in ``gt_ans`` (or ``ground_truth`` or
``answer``; the reference also looks inside ``sample_info``),
``final_valid_transitions`` (paths where a repeated index is a loop) and
optionally ``final_invalid_transitions`` and ``initial_score``.

Anything wrong raises ``SupervisionError`` naming the sample and the problem:
a file that half-loads would train or evaluate on the wrong data.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polar_core.limits import LimitError, load_json, read_capped
from polar_core.program import Program, ProgramError

_ANSWER_KEYS = ("gt_ans", "ground_truth", "answer")


class SupervisionError(ValueError):
    """A supervision file or object that cannot be read (message says where)."""


@dataclass(frozen=True)
class SupervisionSample:
    """One question, its reference answer and the programs found for it."""

    question: str
    answer: str
    valid_programs: tuple[Program, ...]
    invalid_programs: tuple[Program, ...] = ()
    initial_score: float | None = None  # full-depth baseline score, if recorded

    def __post_init__(self) -> None:
        # Lists passed by callers become tuples so samples stay hashable values.
        object.__setattr__(self, "valid_programs", tuple(self.valid_programs))
        object.__setattr__(self, "invalid_programs", tuple(self.invalid_programs))


# --------------------------------------------------------------------------
# reading


def _read_json(path: Path, max_bytes: int) -> Any:
    """Read a JSON file of at most max_bytes (read with a cap: a pipe reports no size)."""
    try:
        size = path.stat().st_size  # a regular file says its size: refused before reading
        if size > max_bytes:
            raise SupervisionError(f"{path}: file is {size} bytes; the limit is {max_bytes}")
        raw = read_capped(path, max_bytes)
    except LimitError as err:
        raise SupervisionError(str(err)) from err
    # ValueError: a path the OS cannot take at all (an embedded NUL byte).
    except (OSError, ValueError) as err:
        raise SupervisionError(f"cannot read supervision file {path}: {err}") from err
    try:
        return load_json(raw, max_bytes)
    except UnicodeDecodeError as err:
        raise SupervisionError(f"{path}: not UTF-8 text ({err})") from err
    except LimitError as err:
        raise SupervisionError(f"{path}: {err}") from err
    # ValueError covers JSONDecodeError; RecursionError cannot happen (depth is bounded first).
    except ValueError as err:
        raise SupervisionError(f"{path}: not valid JSON ({_cut(str(err))})") from err


def _cut(text: str, limit: int = 200) -> str:
    """Shorten text for an error message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _entries(data: Any, num_layers: int) -> list[tuple[str, Any]]:
    """Return (label, raw sample) pairs from any accepted top-level shape."""
    if isinstance(data, Mapping) and "samples" in data:
        stored = data.get("num_layers")
        if stored is not None and stored != num_layers:
            raise SupervisionError(
                f"file is for a model with {_cut(repr(stored), 40)} layers, "
                f"but this model has {num_layers}"
            )
        samples = data["samples"]
        if not isinstance(samples, (list, tuple)):
            raise SupervisionError(f"'samples' must be a list, got {type(samples).__name__}")
        return [(f"sample {i}", s) for i, s in enumerate(samples)]
    if isinstance(data, (list, tuple)):
        return [(f"sample {i}", s) for i, s in enumerate(data)]
    if isinstance(data, Mapping):
        return [(f"sample {_cut(repr(key), 60)}", s) for key, s in data.items()]
    raise SupervisionError(
        f"supervision must be an object or a list of samples, got {type(data).__name__}"
    )


def _field(sample: Mapping[str, Any], keys: Iterable[str]) -> Any:
    """First non-null value among keys, in the sample or its sample_info."""
    info = sample.get("sample_info")
    places = [sample] + ([info] if isinstance(info, Mapping) else [])
    for place in places:
        for key in keys:
            if place.get(key) is not None:
                return place[key]
    return None


def _text(value: Any, what: str) -> str:
    """Return a question/answer as text; numbers are accepted for answers."""
    if isinstance(value, str):
        return value
    # Answers such as 42 are sometimes stored as JSON numbers.
    if what == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise SupervisionError(f"missing {what}")
    raise SupervisionError(f"{what} must be a string, got {type(value).__name__}")


def _programs(value: Any, key: str, num_layers: int) -> tuple[Program, ...]:
    """Read a list of paths into Programs."""
    if not isinstance(value, (list, tuple)):
        raise SupervisionError(f"'{key}' must be a list of paths, got {type(value).__name__}")
    programs = []
    for i, path in enumerate(value):
        # A string would iterate as characters; only JSON arrays are paths.
        if not isinstance(path, (list, tuple)):
            raise SupervisionError(f"{key}[{i}] must be a list of layer indices, got {type(path).__name__}")
        try:
            programs.append(Program(tuple(path), num_layers))
        except ProgramError as err:
            raise SupervisionError(f"{key}[{i}]: {err}") from err
    return tuple(programs)


def _score(value: Any) -> float | None:
    """Read initial_score: a finite number or null."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SupervisionError(f"initial_score must be a number or null, got {type(value).__name__}")
    if not math.isfinite(value):
        raise SupervisionError(f"initial_score must be finite, got {value}")
    return float(value)


def _sample(raw: Any, num_layers: int) -> SupervisionSample:
    """Read one sample object."""
    if not isinstance(raw, Mapping):
        raise SupervisionError(f"a sample must be an object, got {type(raw).__name__}")
    if raw.get("final_valid_transitions") is None:
        raise SupervisionError("missing 'final_valid_transitions'")
    invalid = raw.get("final_invalid_transitions")
    return SupervisionSample(
        question=_text(_field(raw, ("question",)), "question"),
        answer=_text(_field(raw, _ANSWER_KEYS), "answer"),
        valid_programs=_programs(raw["final_valid_transitions"], "final_valid_transitions", num_layers),
        invalid_programs=() if invalid is None else _programs(invalid, "final_invalid_transitions", num_layers),
        initial_score=_score(raw.get("initial_score")),
    )


def load_supervision(
    source: str | os.PathLike | dict | list,
    num_layers: int,
    max_bytes: int = 50_000_000,
) -> list[SupervisionSample]:
    """Read supervision from a file path or an already-parsed JSON value.

    Samples whose valid list is empty are kept, with ``valid_programs=()``.

    Args:
        source: path to a ``merged_mcts_samples.json``, or its parsed content.
        num_layers: depth D of the model the paths were found on.
        max_bytes: larger files are refused before they are read.

    Raises:
        SupervisionError: naming the sample (index or id) and the problem.
    """
    try:
        depth = Program.full(num_layers).num_layers
    except ProgramError as err:
        raise SupervisionError(str(err)) from err
    if isinstance(source, (str, os.PathLike)):
        data = _read_json(Path(source), max_bytes)
    else:
        data = source
    samples = []
    for label, raw in _entries(data, depth):
        try:
            samples.append(_sample(raw, depth))
        except SupervisionError as err:
            raise SupervisionError(f"{label}: {err}") from err
    return samples


# --------------------------------------------------------------------------
# writing


def _sample_dict(sample: SupervisionSample) -> dict[str, Any]:
    """The reference implementation's record for one sample."""
    return {
        "question": sample.question,
        "gt_ans": sample.answer,
        "initial_score": sample.initial_score,
        "final_valid_transitions": [list(p.path) for p in sample.valid_programs],
        "final_invalid_transitions": [list(p.path) for p in sample.invalid_programs],
    }


def save_supervision(samples: Iterable[SupervisionSample], path: str | os.PathLike) -> Path:
    """Write samples as ``{"samples": [...]}`` so ``load_supervision`` reads them back.

    The model depth is stored as ``num_layers`` when any program gives it
    (the reference loader ignores the extra key). The file is replaced
    atomically, so a crash never leaves half a file.

    Returns:
        The path written.
    """
    samples = list(samples)
    depths = {
        p.num_layers for s in samples for p in (*s.valid_programs, *s.invalid_programs)
    }
    if len(depths) > 1:
        raise SupervisionError(f"samples mix programs for models of {sorted(depths)} layers")
    document: dict[str, Any] = {}
    if depths:
        document["num_layers"] = depths.pop()
    document["samples"] = [_sample_dict(s) for s in samples]
    target = Path(path)
    # A plain open (not mkstemp) so the file gets the usual umask permissions.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(document, f, ensure_ascii=False, allow_nan=False)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def merge_samples(*sources: Iterable[SupervisionSample]) -> list[SupervisionSample]:
    """Samples of several files (e.g. two searches of overlapping items) as one
    list, one sample per question: the union of its valid programs (shortest
    first), of its invalid ones (minus any another search found valid), and
    the highest initial score recorded. Questions keep their first order."""
    merged: dict[str, list] = {}
    for source in sources:
        for s in source:
            entry = merged.setdefault(s.question, [s.answer, {}, {}, None])
            if entry[0] != s.answer:
                raise SupervisionError(f"question {_cut(s.question)!r} has two answers: {entry[0]!r}, {s.answer!r}")
            entry[1].update(dict.fromkeys(s.valid_programs))
            entry[2].update(dict.fromkeys(s.invalid_programs))
            if s.initial_score is not None:
                entry[3] = s.initial_score if entry[3] is None else max(entry[3], s.initial_score)
    out = []
    for question, (answer, valid, invalid, score) in merged.items():
        shortest = sorted(valid, key=lambda p: (p.layer_calls, p.path))
        out.append(SupervisionSample(question, answer, tuple(shortest),
                                     tuple(p for p in invalid if p not in valid), score))
    return out
