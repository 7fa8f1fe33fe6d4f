"""Programs of layers: which decoder layers a model runs, and in what order.

A program is the sequence of layer indices the executor calls, exactly as in
the reference implementation (tianyi-lab/PoLar): ``(0, 1, ..., D-1)`` is the
standard forward pass, leaving an index out skips that layer, repeating an
index or a contiguous block loops it, and any other order is allowed too.

Three views of one program live here:

- the path itself (``Program.path``), what the executor runs;
- a text form for people, ``"0-11, 12-15x2, 16-29"`` (``parse`` / ``format``);
- the paper's op view, the layers cut into contiguous segments that are
  skipped, kept or repeated (``op_view`` / ``from_ops``); not every program
  has one.

Every way in (constructor, text, segments, JSON) validates and raises the one
``ProgramError`` with a message that names the problem.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_STEPS_PER_LAYER = 4

OPS = ("skip", "keep", "repeat")

# Longer numbers than this cannot be a layer index or a sane repeat count; we
# refuse them before int() so absurd input costs nothing.
_MAX_DIGITS = 9

_FULL_KEYWORDS = ("full", "all")

# One text item: "a", "a-b", optionally followed by "xR" / "×R" / "*R".
_ITEM = re.compile(
    r"\s*(?P<a>[0-9]+)\s*(?:-\s*(?P<b>[0-9]+)\s*)?(?:[xX×*]\s*(?P<r>[0-9]+)\s*)?"
)


class ProgramError(ValueError):
    """The one error raised for any bad program (message names the problem)."""


# --------------------------------------------------------------------------
# validation helpers


def _short(value: Any, limit: int = 40) -> str:
    """Return a repr of value cut to `limit` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_int(value: Any, what: str) -> int:
    """Return value as a plain int; reject bools, floats and non-integers."""
    # bool is an int subclass, but True as a layer index is always a mistake.
    if isinstance(value, bool):
        raise ProgramError(f"{what} must be an integer, got a bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise ProgramError(
            f"{what} must be an integer, got {type(value).__name__} {_short(value)}"
        ) from None


def _check_num_layers(num_layers: Any) -> int:
    """Return num_layers as an int >= 1 or raise ProgramError."""
    count = _as_int(num_layers, "num_layers")
    if count < 1:
        raise ProgramError(f"num_layers must be at least 1, got {count}")
    return count


def _resolve_max_steps(max_steps: Any, num_layers: int) -> int:
    """Return the step limit: the given one, or the default for num_layers."""
    if max_steps is None:
        return DEFAULT_MAX_STEPS_PER_LAYER * num_layers
    limit = _as_int(max_steps, "max_steps")
    if limit < 1:
        raise ProgramError(f"max_steps must be at least 1, got {limit}")
    return limit


def _check_steps(num_steps: int, max_steps: int) -> None:
    """Raise ProgramError if a program of num_steps steps is over the limit."""
    if num_steps > max_steps:
        raise ProgramError(f"program has {num_steps} steps; the limit is {max_steps}")


def _range_error(layer: int, num_layers: int, where: str = "") -> ProgramError:
    """Build the error for a layer index outside 0..num_layers-1."""
    span = "0" if num_layers == 1 else f"0-{num_layers - 1}"
    noun = "layer" if num_layers == 1 else "layers"
    return ProgramError(
        f"layer {layer} is out of range: the model has {num_layers} {noun} ({span}){where}"
    )


def _check_layer(layer: Any, num_layers: int, what: str = "layer") -> int:
    """Return layer as an int in 0..num_layers-1 or raise ProgramError."""
    index = _as_int(layer, what)
    if not 0 <= index < num_layers:
        raise _range_error(index, num_layers)
    return index


def _check_block(start: Any, end: Any, num_layers: int) -> tuple[int, int]:
    """Return (start, end) as an in-range ascending block of layers."""
    first = _check_layer(start, num_layers, "start")
    last = _check_layer(end, num_layers, "end")
    if first > last:
        raise ProgramError(f"block {first}-{last} is backwards: start must be <= end")
    return first, last


def _coerce_path(path: Any, max_steps: int) -> tuple[int, ...]:
    """Return path as a tuple of plain ints, refusing what cannot be a path."""
    if isinstance(path, (str, bytes)):
        raise ProgramError(
            "a program path is a sequence of layer indices, not text; "
            "use Program.parse for the text form"
        )
    # Sets and mappings have no meaningful order, and order is the program.
    if isinstance(path, (Set, Mapping)):
        raise ProgramError(
            f"a program path must be an ordered sequence, got {type(path).__name__}"
        )
    try:
        steps = iter(path)
    except TypeError:
        raise ProgramError(
            f"a program path must be a sequence of layer indices, got {type(path).__name__}"
        ) from None
    if hasattr(path, "__len__"):
        _check_steps(len(path), max_steps)
    # islice bounds memory for iterators of unknown (even endless) length.
    items = tuple(itertools.islice(steps, max_steps + 1))
    if len(items) > max_steps:
        raise ProgramError(f"program has more than {max_steps} steps; the limit is {max_steps}")
    return tuple(_as_int(x, f"step {k}") for k, x in enumerate(items))


# --------------------------------------------------------------------------
# op view


@dataclass(frozen=True)
class Segment:
    """One entry of the op view: a contiguous block of layers and what runs it.

    For a skip the count is stored as 0 even if left at the default of 1, so
    ``Segment(3, 5, "skip")`` reads naturally.
    """

    start: int  # first layer, inclusive
    end: int  # last layer, inclusive
    op: str  # "skip" | "keep" | "repeat"
    repeats: int = 1  # times the block runs: 0 for skip, 1 for keep, >=2 for repeat

    def __post_init__(self) -> None:
        start = _as_int(self.start, "segment start")
        end = _as_int(self.end, "segment end")
        if start < 0 or start > end:
            raise ProgramError(f"segment {start}-{end} is not an ascending block of layers")
        if not isinstance(self.op, str) or self.op not in OPS:
            raise ProgramError(f"segment op must be one of {', '.join(OPS)}; got {_short(self.op)}")
        repeats = _as_int(self.repeats, "segment repeats")
        if self.op == "skip" and repeats in (0, 1):
            repeats = 0
        elif self.op == "skip" or (self.op == "keep" and repeats != 1):
            raise ProgramError(f"a {self.op} segment cannot run {repeats} times")
        elif self.op == "repeat" and repeats < 2:
            raise ProgramError(f"a repeat segment runs at least 2 times, got {repeats}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)
        object.__setattr__(self, "repeats", repeats)

    @property
    def length(self) -> int:
        """Number of layers in the block."""
        return self.end - self.start + 1

    @property
    def layer_calls(self) -> int:
        """Number of program steps this segment contributes."""
        return self.length * self.repeats


def _ascending_run(path: tuple[int, ...], i: int) -> int:
    """Length of the run path[i], path[i]+1, ... starting at position i."""
    j = i + 1
    while j < len(path) and path[j] == path[j - 1] + 1:
        j += 1
    return j - i


def _count_copies(path: tuple[int, ...], p: int, block: tuple[int, ...]) -> int:
    """How many back-to-back copies of block start at position p."""
    copies, size = 0, len(block)
    while path[p : p + size] == block:
        copies += 1
        p += size
    return copies


def _op_segments(path: tuple[int, ...], num_layers: int) -> tuple[Segment, ...] | None:
    """Cut path into skip/keep/repeat segments tiling the layers, or None.

    Scans left to right. Each maximal ascending run a..b either ends in a
    jump forward (keep a..b, skip the gap) or jumps back to some s in a..b;
    then s..b must be repeated whole (keep a..s-1, repeat s..b). Any other
    jump back means the program has no op view. The cut found this way is
    the only one possible, so None means "none exists".
    """
    segments: list[Segment] = []
    next_layer, i = 0, 0  # layers below next_layer are already in a segment
    while i < len(path):
        a = path[i]
        if a < next_layer:
            return None
        if a > next_layer:
            segments.append(Segment(next_layer, a - 1, "skip", 0))
        j = i + _ascending_run(path, i)
        b = path[j - 1]
        if j < len(path) and a <= path[j] <= b:
            s = path[j]
            copies = 1 + _count_copies(path, j, tuple(range(s, b + 1)))
            if copies < 2:
                return None
            if s > a:
                segments.append(Segment(a, s - 1, "keep", 1))
            segments.append(Segment(s, b, "repeat", copies))
            i = j + (copies - 1) * (b - s + 1)
        else:
            segments.append(Segment(a, b, "keep", 1))
            i = j
        next_layer = b + 1
    if next_layer < num_layers:
        segments.append(Segment(next_layer, num_layers - 1, "skip", 0))
    return tuple(segments)


# --------------------------------------------------------------------------
# text form


def _format_item(start: int, end: int, repeats: int) -> str:
    """Text for one item: "a", "a-b", with "xR" when it repeats."""
    text = str(start) if start == end else f"{start}-{end}"
    return text if repeats == 1 else f"{text}x{repeats}"


def _fewest_items(path: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Cover path with the fewest (start, end, repeats) text items.

    Dynamic programme over positions, right to left. An item is an
    ascending run, or such a run repeated R >= 2 times back to back. Ties go
    to the cover with more steps inside repeat items (a loop reads as a
    loop), then to the longer block, then to fewer repeats, so the answer is
    deterministic. Runs in O(sum of run lengths), not O(n^2), even for
    "5x9999"-like paths.
    """
    n = len(path)
    run = [1] * n  # run[i]: length of the ascending run starting at i
    for i in range(n - 2, -1, -1):
        if path[i + 1] == path[i] + 1:
            run[i] = run[i + 1] + 1
    cost = [(0, 0)] * (n + 1)  # cost[i]: (items, -steps in repeats) to cover path[i:]
    pick = [(0, 0)] * (n + 1)  # pick[i]: (block length, repeats) of the first item
    # chain[(p, size)]: over the ends e of back-to-back copies of the block at
    # p, the least (cost[e][0], cost[e][1] - e, e). Reusing it for p - size
    # makes choosing R for a repeat item O(1).
    chain: dict[tuple[int, int], tuple[int, int, int]] = {}
    for i in range(n - 1, -1, -1):
        best = None
        for size in range(run[i], 0, -1):
            end = i + size
            items, looped = cost[end]
            options = [((items + 1, looped), (size, 1))]
            here = (items, looped - end, end)
            if end < n and path[end] == path[i] and run[end] >= size:
                more = chain[(end, size)]  # best end with at least 2 copies
                options.append(((more[0] + 1, more[1] + i), (size, (more[2] - i) // size)))
                here = min(here, more)
            chain[(i, size)] = here
            for option, choice in options:
                if best is None or option < best:
                    best, pick[i] = option, choice
        cost[i] = best
    items, i = [], 0
    while i < n:
        size, repeats = pick[i]
        items.append((path[i], path[i] + size - 1, repeats))
        i += size * repeats
    return items


def _parse_item(raw: str, num_layers: int, text: str) -> tuple[int, int, int]:
    """Read one text item of `text` into (start, end, repeats), validated."""
    if not raw.strip():
        raise ProgramError(
            f"program text {_short(text.strip())} has an empty item "
            "(two commas in a row, or a comma at an end)"
        )
    match = _ITEM.fullmatch(raw)
    item = raw.strip()
    if match is None:
        raise ProgramError(
            f"cannot read program item {item!r}: expected 'a' or 'a-b', optionally followed by 'xR'"
        )
    digits = match.group("a", "b", "r")
    for text in digits:
        if text is not None and len(text.lstrip("0")) > _MAX_DIGITS:
            raise ProgramError(f"number in program item {_short(item)} is too large")
    start = int(digits[0])
    end = start if digits[1] is None else int(digits[1])
    repeats = 1 if digits[2] is None else int(digits[2])
    if start > end:
        raise ProgramError(f"range in program item {item!r} is backwards: write a-b with a <= b")
    if repeats < 1:
        raise ProgramError(f"repeat count in program item {item!r} must be at least 1")
    if end >= num_layers:
        raise _range_error(start if start >= num_layers else end, num_layers, f" (item {item!r})")
    return start, end, repeats


# --------------------------------------------------------------------------
# the program


@dataclass(frozen=True)
class Program:
    """An immutable, validated program of layers.

    Two programs are equal when they have the same path and the same number
    of layers; the step limit they were checked against does not matter.

    Args:
        path: layer indices in the order they run.
        num_layers: the model's depth D; every index is in 0..D-1.
        max_steps: most steps allowed; None means
            ``DEFAULT_MAX_STEPS_PER_LAYER * num_layers``. Stored resolved.
    """

    path: tuple[int, ...]
    num_layers: int
    max_steps: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        num_layers = _check_num_layers(self.num_layers)
        max_steps = _resolve_max_steps(self.max_steps, num_layers)
        path = _coerce_path(self.path, max_steps)
        if not path:
            raise ProgramError("program is empty")
        for layer in path:
            if not 0 <= layer < num_layers:
                raise _range_error(layer, num_layers)
        # Frozen dataclass: the coerced values replace what was passed in.
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "num_layers", num_layers)
        object.__setattr__(self, "max_steps", max_steps)

    # -- constructors -------------------------------------------------------

    @classmethod
    def full(cls, num_layers: int) -> Program:
        """The standard forward pass 0..D-1."""
        count = _check_num_layers(num_layers)
        return cls(tuple(range(count)), count)

    @classmethod
    def skip(cls, num_layers: int, start: int, end: int) -> Program:
        """Every layer except the block start..end (inclusive)."""
        count = _check_num_layers(num_layers)
        first, last = _check_block(start, end, count)
        return cls(tuple(i for i in range(count) if not first <= i <= last), count)

    @classmethod
    def loop(cls, num_layers: int, start: int, end: int, repeats: int) -> Program:
        """The full pass with the block start..end run `repeats` times in place."""
        count = _check_num_layers(num_layers)
        first, last = _check_block(start, end, count)
        times = _as_int(repeats, "repeats")
        if times < 1:
            raise ProgramError(f"repeats must be at least 1, got {times}")
        # Check the length before building, so a huge count fails fast.
        _check_steps(count + (last - first + 1) * (times - 1), _resolve_max_steps(None, count))
        block = tuple(range(first, last + 1))
        return cls(tuple(range(first)) + block * times + tuple(range(last + 1, count)), count)

    @classmethod
    def early_exit(cls, num_layers: int, last_layer: int) -> Program:
        """Layers 0..last_layer, then stop."""
        count = _check_num_layers(num_layers)
        last = _check_layer(last_layer, count, "last_layer")
        return cls(tuple(range(last + 1)), count)

    @classmethod
    def drop_layers(cls, num_layers: int, layers: Iterable[int]) -> Program:
        """The full pass without the given layers (in any order, repeats allowed)."""
        count = _check_num_layers(num_layers)
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise ProgramError(f"layers to drop must be a collection of indices, got {_short(layers)}")
        dropped = {_check_layer(layer, count) for layer in layers}
        return cls(tuple(i for i in range(count) if i not in dropped), count)

    @classmethod
    def parse(cls, text: str, num_layers: int, max_steps: int | None = None) -> Program:
        """Read the text form, e.g. ``"0-11, 12-15x2, 16-29"`` or ``"full"``.

        Items are separated by commas; an item is ``a`` or ``a-b`` (ascending,
        inclusive), optionally followed by ``xR``, ``×R`` or ``*R`` to run it R
        times back to back. Whitespace is free.
        """
        if not isinstance(text, str):
            raise ProgramError(f"program text must be a string, got {type(text).__name__}")
        count = _check_num_layers(num_layers)
        limit = _resolve_max_steps(max_steps, count)
        stripped = text.strip()
        if not stripped:
            raise ProgramError("program is empty")
        if stripped.lower() in _FULL_KEYWORDS:
            return cls(tuple(range(count)), count, limit)
        items = [_parse_item(raw, count, text) for raw in stripped.split(",")]
        # Count before expanding so "0-29x100000000" fails without allocating.
        _check_steps(sum((end - start + 1) * reps for start, end, reps in items), limit)
        path = tuple(
            layer for start, end, reps in items for _ in range(reps) for layer in range(start, end + 1)
        )
        return cls(path, count, limit)

    @classmethod
    def from_ops(cls, segments: Iterable[Segment], num_layers: int) -> Program:
        """Build a program from op-view segments that tile layers 0..D-1 in order."""
        count = _check_num_layers(num_layers)
        if not isinstance(segments, Iterable):
            raise ProgramError(f"segments must be a sequence of Segment, got {_short(segments)}")
        expected = 0  # the layer the next segment must start at
        pieces = []
        for seg in segments:
            if not isinstance(seg, Segment):
                raise ProgramError(f"expected a Segment, got {type(seg).__name__} {_short(seg)}")
            if seg.start != expected:
                raise ProgramError(
                    f"segments must tile the layers in order: expected one starting at layer "
                    f"{expected}, got {seg.start}-{seg.end}"
                )
            if seg.end >= count:
                raise _range_error(seg.end, count, f" (segment {seg.start}-{seg.end})")
            pieces.append(seg)
            expected = seg.end + 1
        if expected != count:
            raise ProgramError(
                f"segments cover layers 0-{expected - 1}; they must cover 0-{count - 1}"
            )
        _check_steps(sum(seg.layer_calls for seg in pieces), _resolve_max_steps(None, count))
        path = tuple(
            layer for seg in pieces for _ in range(seg.repeats) for layer in range(seg.start, seg.end + 1)
        )
        return cls(path, count)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], num_layers: int | None = None) -> Program:
        """Read the JSON form written by ``to_dict``.

        ``path`` wins over ``text``; ``text`` is read only when ``path`` is
        missing. When both the object and the caller give a layer count they
        must agree.
        """
        if not isinstance(d, Mapping):
            raise ProgramError(f"a program must be a JSON object, got {type(d).__name__}")
        count = cls._dict_num_layers(d.get("num_layers"), num_layers)
        path = d.get("path")
        if path is not None:
            # JSON arrays only: a string would otherwise iterate as characters.
            if not isinstance(path, (list, tuple)):
                raise ProgramError(f"'path' must be a list of layer indices, got {type(path).__name__}")
            return cls(tuple(path), count)
        text = d.get("text")
        if isinstance(text, str):
            return cls.parse(text, count)
        if text is not None:
            raise ProgramError(f"'text' must be a string, got {type(text).__name__}")
        raise ProgramError("a program object needs a 'path' list or a 'text' string")

    @staticmethod
    def _dict_num_layers(stored: Any, given: Any) -> int:
        """Reconcile the layer count in a program object with the caller's."""
        if stored is None and given is None:
            raise ProgramError("the program object does not say how many layers the model has ('num_layers')")
        if stored is not None and (isinstance(stored, bool) or not isinstance(stored, int)):
            raise ProgramError(f"'num_layers' must be an integer, got {_short(stored)}")
        if given is not None:
            given = _check_num_layers(given)
        if stored is not None and given is not None and stored != given:
            raise ProgramError(
                f"program is for a model with {stored} layers, but this model has {given}"
            )
        return _check_num_layers(stored if stored is not None else given)

    # -- views ----------------------------------------------------------------

    @property
    def layer_calls(self) -> int:
        """Layer calls per token: the program's steps (a looped layer counts each time it runs)."""
        return len(self.path)

    @property
    def is_full(self) -> bool:
        """Whether this is the standard forward pass 0..D-1."""
        return self.path == tuple(range(self.num_layers))

    @property
    def compute_fraction(self) -> float:
        """Layer calls per token relative to the full program (1.0 = the model's own compute)."""
        return self.layer_calls / self.num_layers

    def layer_counts(self) -> tuple[int, ...]:
        """How many times each layer 0..D-1 runs."""
        counts = [0] * self.num_layers
        for layer in self.path:
            counts[layer] += 1
        return tuple(counts)

    def skipped_layers(self) -> tuple[int, ...]:
        """Layers that never run, ascending."""
        return tuple(i for i, n in enumerate(self.layer_counts()) if n == 0)

    def op_view(self) -> tuple[Segment, ...] | None:
        """The paper's skip/keep/repeat segments, or None if the program has none."""
        return _op_segments(self.path, self.num_layers)

    def format(self) -> str:
        """Canonical text form; ``Program.parse(p.format(), D) == p``.

        A program with an op view is written segment by segment (a loop
        reads ``0-11, 12-15x2, 16-29``, not the shorter ``0-15, 12-29``);
        any other program with the fewest items.
        """
        segments = self.op_view()
        if segments is not None:
            items = [(s.start, s.end, s.repeats) for s in segments if s.op != "skip"]
        else:
            items = _fewest_items(self.path)
        return ", ".join(_format_item(*item) for item in items)

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the path, the model depth and the text form."""
        return {"path": list(self.path), "num_layers": self.num_layers, "text": self.format()}
