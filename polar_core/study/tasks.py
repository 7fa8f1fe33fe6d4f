"""The offline task suite: short-answer questions with a strict answer checker.

Program search needs items whose answers are short and checkable, with a spread
of difficulty for the default model (some it gets right, some a different
program may correct). Nothing is downloaded: word families are hand-written
JSON lists in ``polar_core/assets/tasks/``; number families are generated from a seed.

Rules that keep results comparable across runs:
- An item's id is derived from its content (``capitals/france``,
  ``add_2digit/34+57``), and its split from a hash of that id, so adding or
  dropping items never moves another item between train, val and test.
- Generation uses one seeded ``random.Random`` per family, never the global RNG.
- Few-shot examples come from the TRAIN split of the same family, never the
  item itself nor an item with the same answer (copying a shot cannot pass).

Run ``python -m polar_core baseline`` for the full program's accuracy per family.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from polar_core.assets import asset_path
from polar_core.study.text import fold, normalize_text

TASK_DIR = asset_path("tasks")


def baseline_path(model_name: str) -> Path:
    """Where the full program's measured accuracy per family is kept for a model (`python -m polar_core baseline`)."""
    return asset_path("baselines", f"{model_name}.json")


SPLITS = ("train", "val", "test")
# Cumulative upper bounds of the hash fraction: 70% train, 15% val, 15% test.
_SPLIT_BOUNDS = ((0.70, "train"), (0.85, "val"), (1.0, "test"))

STOP_TEXT = "\n"  # the answer is the generated text up to the first newline
SUITE_VERSION = 1


@dataclass(frozen=True)
class TaskItem:
    """One question with a short reference answer (and accepted aliases)."""

    id: str
    family: str
    question: str
    answer: str
    aliases: tuple[str, ...] = ()
    split: str = "train"

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not self.question or not self.answer:
            raise ValueError(f"item {self.id!r} needs a question and an answer")


# ---------------------------------------------------------------------------
# Splits and seeds: stable hashes, never Python's salted hash().


def _stable_fraction(text: str) -> float:
    """A number in [0, 1) fixed by `text` (sha256), the same on every machine."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(item_id: str) -> str:
    """The fixed split of an item id: train 70%, val 15%, test 15%."""
    x = _stable_fraction(f"polar-split/{item_id}")
    return next(name for bound, name in _SPLIT_BOUNDS if x < bound)


def _rng(*parts: object) -> random.Random:
    """A private RNG seeded from `parts`, so no code shares or touches global state."""
    seed = int(_stable_fraction("/".join(map(str, parts))) * 2**63)
    return random.Random(seed)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", fold(text).lower()).strip("-")


# ---------------------------------------------------------------------------
# Families. A builder returns (id suffix, question, answer, aliases) rows.

Row = tuple[str, str, str, tuple[str, ...]]


def _list_family(name: str) -> tuple[str, Callable[[], list[Row]]]:
    """A family read from ``polar_core/assets/tasks/{name}.json`` (description, template, items)."""

    def build() -> list[Row]:
        data = _read_json(name)
        rows = []
        for subject, answer, *aliases in data["items"]:
            question = data["question"].format(subject=subject)
            rows.append((_slug(subject), question, answer, tuple(aliases)))
        return rows

    return _read_json(name)["description"], build


@functools.lru_cache(maxsize=None)
def _read_json(name: str) -> dict:
    with open(TASK_DIR / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def _add_1digit() -> list[Row]:
    """Every ordered pair of one-digit numbers: 100 items."""
    return [(f"{a}+{b}", f"What is {a} + {b}?", str(a + b), ()) for a in range(10) for b in range(10)]


def _add_2digit(n: int = 300) -> list[Row]:
    """A seeded sample of two-digit sums, with and without carries."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    chosen = sorted(_rng("add_2digit").sample(pairs, n))
    return [(f"{a}+{b}", f"What is {a} + {b}?", str(a + b), ()) for a, b in chosen]


# (large unit, its plural, small unit, its plural, small per large)
_CONVERSIONS = (
    ("meter", "meters", "centimeter", "centimeters", 100),
    ("centimeter", "centimeters", "millimeter", "millimeters", 10),
    ("kilometer", "kilometers", "meter", "meters", 1000),
    ("kilogram", "kilograms", "gram", "grams", 1000),
    ("liter", "liters", "milliliter", "milliliters", 1000),
    ("hour", "hours", "minute", "minutes", 60),
    ("minute", "minutes", "second", "seconds", 60),
    ("day", "days", "hour", "hours", 24),
    ("week", "weeks", "day", "days", 7),
    ("year", "years", "month", "months", 12),
    ("foot", "feet", "inch", "inches", 12),
    ("yard", "yards", "foot", "feet", 3),
    ("dozen", "dozen", "egg", "eggs", 12),
)


def _unit_conversion(n: int = 250) -> list[Row]:
    """'How many cm are in 3 m?' both ways, whole numbers only."""
    rows = []
    for big, bigs, small, smalls, factor in _CONVERSIONS:
        for k in range(1, 13):
            big_text = f"{k} {big if k == 1 else bigs}"
            rows.append((f"{big}-to-{small}/{k}", f"How many {smalls} are in {big_text}?", str(k * factor), ()))
            rows.append((f"{small}-to-{big}/{k}", f"How many {bigs} are in {k * factor} {smalls}?", str(k), ()))
    return sorted(_rng("unit_conversion").sample(rows, n))


_NAMES = (("Tom", "he"), ("Anna", "she"), ("Sam", "he"), ("Maria", "she"), ("Ben", "he"), ("Lily", "she"), ("Omar", "he"), ("Mia", "she"))
_THINGS = ("apples", "pencils", "marbles", "stickers", "cookies", "books", "balls", "cards")

# (key, template, answer function, constraint on (a, b))
_WORD_TEMPLATES = (
    ("more", "{name} has {a} {obj}. {Pron} gets {b} more. How many {obj} does {name} have now?", lambda a, b: a + b, lambda a, b: True),
    ("away", "{name} has {a} {obj}. {Pron} gives {b} away. How many {obj} does {name} have left?", lambda a, b: a - b, lambda a, b: a > b),
    ("total", "There are {a} {obj} in a box and {b} {obj} on a table. How many {obj} are there in total?", lambda a, b: a + b, lambda a, b: True),
    ("bags", "{name} has {a} bags with {b} {obj} in each bag. How many {obj} does {name} have?", lambda a, b: a * b, lambda a, b: a <= 4 and b <= 4),
    ("age", "{name} is {a} years old. How old will {pron} be in {b} years?", lambda a, b: a + b, lambda a, b: True),
)


def _word_problems(n: int = 250) -> list[Row]:
    """One-step word problems (add, subtract, multiply) with small numbers."""
    rows, seen = [], set()
    for key, template, fn, ok in _WORD_TEMPLATES:
        for name, pron in _NAMES:
            for obj in _THINGS if "{obj}" in template else ("",):
                # Small numbers: with operands up to 9 the default model scored 5%.
                for a in range(2, 7):
                    for b in range(2, 7):
                        if not ok(a, b):
                            continue
                        q = template.format(name=name, pron=pron, Pron=pron.capitalize(), obj=obj, a=a, b=b)
                        if q not in seen:  # templates without a name or object repeat
                            seen.add(q)
                            rows.append((_slug(f"{key} {name if '{name}' in template else ''} {obj} {a} {b}"), q, str(fn(a, b)), ()))
    return sorted(_rng("word_problems").sample(rows, n))


def _subtraction(n: int = 150) -> list[Row]:
    """Differences of small whole numbers, never negative (a held-out family)."""
    pairs = [(a, b) for a in range(2, 21) for b in range(1, a)]
    chosen = sorted(_rng("subtraction").sample(pairs, n))
    return [(f"{a}-{b}", f"What is {a} - {b}?", str(a - b), ()) for a, b in chosen]


def _next_number(n: int = 250) -> list[Row]:
    """The next term of a short sequence: counting, steps up or down, doubling."""
    seqs = []
    seqs += [("count", s, 1, [s + i for i in range(5)]) for s in range(1, 51)]
    seqs += [(f"step{d}", s, d, [s + d * i for i in range(5)]) for d in range(2, 11) for s in range(1, 21)]
    seqs += [(f"down{d}", s, d, [s - d * i for i in range(5)]) for d in range(1, 6) for s in range(30, 61)]
    seqs += [("double", s, 2, [s * 2**i for i in range(5)]) for s in range(1, 10)]
    rows = []
    for kind, start, _, terms in seqs:
        shown = ", ".join(map(str, terms[:4]))
        # This wording measured 25% on the default model; "What number comes next: ..., ...?" 2-8%.
        rows.append((f"{kind}/{start}", f"What is the next number in the sequence {shown}?", str(terms[4]), ()))
    return sorted(_rng("next_number").sample(rows, n))


_GENERATED: dict[str, tuple[str, Callable[[], list[Row]]]] = {
    "add_1digit": ("Sum of two one-digit numbers (0-9).", _add_1digit),
    "add_2digit": ("Sum of two two-digit numbers (10-99), some with carries.", _add_2digit),
    "unit_conversion": ("Whole-number conversion between common units (length, mass, volume, time, dozens).", _unit_conversion),
    "word_problems": ("One-step arithmetic word problems with small numbers (add, subtract, multiply).", _word_problems),
    "next_number": ("Next term of a short arithmetic or doubling sequence.", _next_number),
    "subtraction": ("Difference of two small whole numbers (held out).", _subtraction),
}
_LISTED = ("capitals", "antonyms", "plurals", "continents", "past_tense", "colours", "comparisons")

# The families searched and trained on.
FAMILIES: tuple[str, ...] = (
    "capitals", "antonyms", "plurals", "add_1digit", "add_2digit", "unit_conversion", "word_problems", "next_number",
)
# Question families no search, supervision file or router ever sees: they
# measure how a predictor does on kinds of questions it never met.
HELD_OUT_FAMILIES: tuple[str, ...] = ("continents", "past_tense", "colours", "comparisons", "subtraction")
ALL_FAMILIES: tuple[str, ...] = FAMILIES + HELD_OUT_FAMILIES


def _family_spec(name: str) -> tuple[str, Callable[[], list[Row]]]:
    if name in _GENERATED:
        return _GENERATED[name]
    if name in _LISTED:
        return _list_family(name)
    raise ValueError(f"unknown task family {name!r}; known: {', '.join(ALL_FAMILIES)}")


def family_description(name: str) -> str:
    """One line saying what a family asks."""
    return _family_spec(name)[0]


def _build_family(name: str) -> tuple[TaskItem, ...]:
    items = []
    for suffix, question, answer, aliases in _family_spec(name)[1]():
        item_id = f"{name}/{suffix}"
        items.append(TaskItem(item_id, name, question, answer, aliases, split_of(item_id)))
    return tuple(sorted(items, key=lambda it: it.id))


@functools.lru_cache(maxsize=None)
def _family_items(name: str) -> tuple[TaskItem, ...]:
    return _build_family(name)


def load_suite(families: Iterable[str] | str | None = None, split: str | None = None) -> list[TaskItem]:
    """Items of the given families (default: the searched ones, FAMILIES) and split
    (default: all), sorted by id.

    Built once per family and cached; the returned list is a fresh copy.
    """
    if isinstance(families, str):
        families = [families]
    names = FAMILIES if families is None else tuple(families)
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    out = []
    for name in names:
        _family_spec(name)  # raises a clear error for an unknown family
        out.extend(it for it in _family_items(name) if split is None or it.split == split)
    return out


def get_item(item_id: str) -> TaskItem:
    """The item with this id (``family/suffix``)."""
    family = item_id.split("/", 1)[0]
    for item in load_suite(family):
        if item.id == item_id:
            return item
    raise KeyError(f"no task item {item_id!r}")


# ---------------------------------------------------------------------------
# Prompting.


def _shots_for(item: TaskItem, shots: int) -> list[TaskItem]:
    """`shots` train items of the item's family, chosen by a seed from the item id.

    Excludes the item itself, any item with the same question, and any with
    the same answer, so a correct output can never be copied from a shot.
    """
    own = {normalize_text(a) for a in (item.answer, *item.aliases)}
    pool = [
        s for s in _family_items(item.family)
        if s.split == "train" and s.id != item.id and s.question != item.question
        and normalize_text(s.answer) not in own
    ]
    if shots > len(pool):
        raise ValueError(f"family {item.family!r} has only {len(pool)} usable shots, asked for {shots}")
    return _rng("shots", item.id).sample(pool, shots)


def build_prompt(item: TaskItem, shots: int = 3) -> str:
    """Few-shot prompt: `shots` "Q: ...\\nA: ..." blocks, then "Q: {question}\\nA:".

    The model's continuation is expected to look like " Paris\\n"; cut it with
    `extract_answer`.
    """
    if shots < 0:
        raise ValueError("shots must be >= 0")
    blocks = [f"Q: {s.question}\nA: {s.answer}" for s in _shots_for(item, shots)]
    blocks.append(f"Q: {item.question}\nA:")
    return "\n\n".join(blocks)


def sample_items(family: str, n: int | None, split: str | None = None) -> list[TaskItem]:
    """Up to `n` items of a family, a fixed hash-ordered sample (all when n is None)."""
    items = load_suite(family, split)
    items.sort(key=lambda it: _stable_fraction(f"polar-sample/{it.id}"))
    return items if n is None else items[:n]
