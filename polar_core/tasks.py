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

Run ``python -m polar_core.tasks measure`` for full-program baseline accuracy.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import random
import re
import sys
import time
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Iterable, Sequence

from polar_core.assets import asset_path

TASK_DIR = asset_path("tasks")
BASELINE_FILE = TASK_DIR / "baseline_accuracy.json"

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
    return re.sub(r"[^a-z0-9]+", "-", _fold(text).lower()).strip("-")


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
}
_LISTED = ("capitals", "antonyms", "plurals")

FAMILIES: tuple[str, ...] = (
    "capitals", "antonyms", "plurals", "add_1digit", "add_2digit", "unit_conversion", "word_problems", "next_number",
)


def _family_spec(name: str) -> tuple[str, Callable[[], list[Row]]]:
    if name in _GENERATED:
        return _GENERATED[name]
    if name in _LISTED:
        return _list_family(name)
    raise ValueError(f"unknown task family {name!r}; known: {', '.join(FAMILIES)}")


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
    """Items of the given families (default: all) and split (default: all), sorted by id.

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
    own = {_normalize_text(a) for a in (item.answer, *item.aliases)}
    pool = [
        s for s in _family_items(item.family)
        if s.split == "train" and s.id != item.id and s.question != item.question
        and _normalize_text(s.answer) not in own
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


# ---------------------------------------------------------------------------
# The checker.
#
# Rule: take the generated text up to the first newline (or "Q:"); normalise
# it (NFKC, accents folded, case folded, quotes/surrounding punctuation and a
# leading article dropped, whitespace collapsed). It is correct when either the
# whole normalised text or its first sentence (text before ". ", "! ", "? ",
# "; ") equals the normalised answer or an alias. Numeric answers compare as
# numbers ("1,000" == "1000", "5.0" == "5", "seven" == "7") and the number may
# be followed by at most three unit words ("300 cm", "12 eggs"). Anything else
# after the answer ("Paris or Lyon", "Paris, Lyon", "7 or 8", "3 + 4 = 7") is
# wrong: a prediction that merely contains the answer is not the answer.

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2212": "-", "`": "'"})
_EDGE_PUNCT = " \t\"'.,;:!?()[]{}*_<>«»"
_ARTICLES = ("the ", "a ", "an ")
# A sentence ends at . ! ? ; and a space, but not after an initial ("D.C. or X" is one sentence).
_SENTENCE_END = re.compile(r"(?:(?<=\w\w[.!?;])|(?<=\d[.!?;]))\s+")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")
# Words that make a trailing remainder an alternative or an expression, not a unit.
_NOT_UNITS = frozenset("or and to plus minus times divided by over than of not is equals nor but".split())

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def _number_words() -> dict[str, int]:
    words = {w: i for i, w in enumerate(_ONES)}
    for t, tens in enumerate(_TENS, start=2):
        words[tens] = 10 * t
        for i in range(1, 10):
            words[f"{tens}-{_ONES[i]}"] = words[f"{tens} {_ONES[i]}"] = 10 * t + i
    words["a hundred"] = words["one hundred"] = words["hundred"] = 100
    return words


_WORD_NUMBERS = _number_words()
# Longest first so "twenty one" wins over "twenty".
_WORD_NUMBER_RE = re.compile(r"(?:" + "|".join(sorted(map(re.escape, _WORD_NUMBERS), key=len, reverse=True)) + r")\b")


def extract_answer(generated: str) -> str:
    """The answer part of a continuation: text before the first newline or "Q:", stripped."""
    text = generated.split(STOP_TEXT, 1)[0]
    text = text.split("Q:", 1)[0]
    return text.strip()


def _fold(text: str) -> str:
    """NFKC, then drop accents (é -> e) so spellings with and without them match."""
    text = unicodedata.normalize("NFKC", text)
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _basic(text: str) -> str:
    """Fold unicode and case, unify quotes, collapse whitespace, trim edge punctuation."""
    text = " ".join(_fold(text).translate(_QUOTES).casefold().split())
    return text.strip(_EDGE_PUNCT)


def _normalize_text(text: str) -> str:
    """Canonical form for word answers (see the checker rule above)."""
    text = _basic(text)
    for article in _ARTICLES:
        if text.startswith(article):
            text = text[len(article):]
            break
    # "D.C." == "DC", "N'Djamena" == "Ndjamena", "Port-au-Prince" == "Port au Prince".
    text = re.sub(r"[.']", "", text)
    text = re.sub(r"[-,/]", " ", text)
    return " ".join(text.split())


def _parse_number(text: str) -> Decimal | None:
    """The number `text` is exactly (digits with commas/decimals, or words to 100), else None."""
    value, rest = _leading_number(_basic(text))
    return value if value is not None and not rest else None


def _leading_number(text: str) -> tuple[Decimal | None, str]:
    """Split a basic-normalised text into a leading number and the rest."""
    match = _NUMBER.match(text) or _WORD_NUMBER_RE.match(text)
    if not match:
        return None, text
    token = match.group(0)
    if token in _WORD_NUMBERS:
        value = Decimal(_WORD_NUMBERS[token])
    else:
        try:
            value = Decimal(token.replace(",", ""))
        except InvalidOperation:
            return None, text
    return value, text[match.end():].strip(_EDGE_PUNCT)


def _is_unit_suffix(rest: str) -> bool:
    """True for "", "cm", "square meters", "eggs": at most three words, letters only."""
    words = rest.split()
    return len(words) <= 3 and all(w.isalpha() and w not in _NOT_UNITS for w in words)


def _candidates(prediction: str) -> list[str]:
    """The whole prediction and its first sentence."""
    text = extract_answer(prediction)
    first = _SENTENCE_END.split(text, 1)[0]
    return [text] if first == text else [text, first]


def _matches(candidate: str, target: str) -> bool:
    expected = _parse_number(target)
    if expected is not None:
        value, rest = _leading_number(_basic(candidate))
        return value is not None and value == expected and _is_unit_suffix(rest)
    norm = _normalize_text(target)
    return bool(norm) and _normalize_text(candidate) == norm


def check_answer(prediction: str, item_or_expected: TaskItem | str, aliases: Sequence[str] = ()) -> bool:
    """Whether `prediction` (raw continuation or extracted answer) is right.

    Args:
        prediction: model output; cut at the first newline / "Q:" first.
        item_or_expected: a TaskItem (its answer and aliases count) or the answer text.
        aliases: further accepted answers.
    """
    if isinstance(item_or_expected, TaskItem):
        targets = (item_or_expected.answer, *item_or_expected.aliases, *aliases)
    else:
        targets = (item_or_expected, *aliases)
    return any(_matches(c, t) for c in _candidates(prediction) for t in targets)


# ---------------------------------------------------------------------------
# Measurement: full-program greedy accuracy of the default model.


def sample_items(family: str, n: int | None, split: str | None = None) -> list[TaskItem]:
    """Up to `n` items of a family, a fixed hash-ordered sample (all when n is None)."""
    items = load_suite(family, split)
    items.sort(key=lambda it: _stable_fraction(f"polar-sample/{it.id}"))
    return items if n is None else items[:n]


def _generate_texts(lm, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations under the full program, cut at the first newline."""
    try:
        from polar_core.executor import generate
    except ImportError:  # executor not available: plain transformers greedy decoding
        return _hf_generate(lm.model, lm.tokenizer, prompts, max_new_tokens)
    traces = generate(lm, prompts, None, max_new_tokens=max_new_tokens, chat=False, stop_strings=(STOP_TEXT,))
    return [t.text for t in traces]


def _hf_generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    tokenizer.padding_side = "left"  # decoder-only: pad on the left so new tokens line up
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def measure(
    families: Sequence[str] = FAMILIES,
    per_family: int | None = 40,
    split: str | None = None,
    shots: int = 3,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    model: str = "smollm2-135m-instruct",
    log=print,
) -> dict:
    """Full-program greedy accuracy per family; returns a JSON-ready report."""
    from polar_core.models import load_model

    lm = load_model(model)
    report = {"model": model, "shots": shots, "per_family": per_family, "split": split,
              "max_new_tokens": max_new_tokens, "suite_version": SUITE_VERSION, "families": {}, "items": {}}
    for family in families:
        items = sample_items(family, per_family, split)
        start, right = time.perf_counter(), 0
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            texts = _generate_texts(lm, [build_prompt(it, shots) for it in chunk], max_new_tokens)
            for item, text in zip(chunk, texts):
                ok = check_answer(text, item)
                right += ok
                report["items"][item.id] = {"prediction": extract_answer(text), "correct": ok}
        acc = right / len(items) if items else 0.0
        report["families"][family] = {"n": len(items), "correct": right, "accuracy": round(acc, 4)}
        log(f"{family:16s} {right:3d}/{len(items):3d} = {acc:6.1%}  ({time.perf_counter() - start:.1f} s)")
    return report


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polar_core.tasks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="full-program greedy accuracy per family on the default model")
    m.add_argument("--per-family", type=int, default=40, help="items per family (0 = all)")
    m.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    m.add_argument("--split", choices=SPLITS, default=None, help="sample from one split only (default: all)")
    m.add_argument("--shots", type=int, default=3)
    m.add_argument("--batch-size", type=int, default=16)
    m.add_argument("--model", default="smollm2-135m-instruct")
    m.add_argument("--out", type=Path, default=BASELINE_FILE)
    sub.add_parser("stats", help="items per family and split")
    args = parser.parse_args(argv)
    if args.command == "stats":
        for family in FAMILIES:
            counts = {sp: len(load_suite(family, sp)) for sp in SPLITS}
            print(f"{family:16s} {counts}  {family_description(family)}")
        print(f"total {len(load_suite())}")
        return 0
    report = measure(args.families, args.per_family or None, args.split, args.shots, args.batch_size, model=args.model)
    report["command"] = "python -m polar_core.tasks " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": report.pop("command"), **report}
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
