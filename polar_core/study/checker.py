"""The answer checker: is a model's answer the expected one?

One checker for every mark, search, evaluation and comparison in the
project, with two rules:

- ``"exact"``: the answer *is* the expected one (the task suite's rule, for
  few-shot "Q: ...\nA:" answers that end at a newline; detailed below);
- ``"contains"``: the expected answer appears in it as whole words, or as a
  number among its numbers (for free-text answers: "The capital of France is
  Paris." contains "Paris"; "It is 1,000." contains "1000").

Both normalise first: unicode, case, whitespace, quotes and edge
punctuation, so "Paris." == "paris". ``answer_rule`` picks the rule for a
prompt; ``describe_rule`` says it in words for the page; ``same_answer``
compares two answers as a person reads them.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from polar_core.study.tasks import STOP_TEXT, TaskItem
from polar_core.study.text import EDGE_PUNCT, basic, normalize_text

# Rule: take the generated text up to the first newline (or "Q:"); normalise
# it (NFKC, accents folded, case folded, quotes/surrounding punctuation and a
# leading article dropped, whitespace collapsed). It is correct when either the
# whole normalised text or its first sentence (text before ". ", "! ", "? ",
# "; ") equals the normalised answer or an alias. Numeric answers compare as
# numbers ("1,000" == "1000", "5.0" == "5", "seven" == "7") and the number may
# be followed by at most three unit words ("300 cm", "12 eggs"). Anything else
# after the answer ("Paris or Lyon", "Paris, Lyon", "7 or 8", "3 + 4 = 7") is
# wrong: a prediction that merely contains the answer is not the answer.

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
# Numbers anywhere in a text, each whole: not a piece of "1,000", "7.5" or "x7".
_NUMBER_IN_TEXT = re.compile(r"(?<![\w.,])" + _NUMBER.pattern + r"(?![\w]|[.,]\d)")
_WORD_NUMBER_IN_TEXT = re.compile(r"\b" + _WORD_NUMBER_RE.pattern)
# Special tokens a decoder may leave in a text ("<|im_end|>", "</s>").
_SPECIAL_TOKEN = re.compile(r"<\|[^|<>]{1,40}\|>|</?s>")

RULES = ("exact", "contains")


def extract_answer(generated: str) -> str:
    """The answer part of a continuation: text before the first newline or "Q:", stripped."""
    text = generated.split(STOP_TEXT, 1)[0]
    text = text.split("Q:", 1)[0]
    return text.strip()


def _parse_number(text: str) -> Decimal | None:
    """The number `text` is exactly (digits with commas/decimals, or words to 100), else None."""
    value, rest = _leading_number(basic(text))
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
    return value, text[match.end():].strip(EDGE_PUNCT)


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
        value, rest = _leading_number(basic(candidate))
        return value is not None and value == expected and _is_unit_suffix(rest)
    norm = normalize_text(target)
    return bool(norm) and normalize_text(candidate) == norm


def _clean(text: str) -> str:
    """The text without special tokens, basic-normalised (see polar_core.study.text)."""
    return basic(_SPECIAL_TOKEN.sub(" ", text))


def _numbers_in(text: str) -> list[Decimal]:
    """Every number written in a basic-normalised text, as digits or words."""
    values = []
    for match in _NUMBER_IN_TEXT.finditer(text):
        try:
            values.append(Decimal(match.group(0).replace(",", "")))
        except InvalidOperation:
            continue
    values += [Decimal(_WORD_NUMBERS[m.group(0)]) for m in _WORD_NUMBER_IN_TEXT.finditer(text)]
    return values


def _contains(prediction: str, target: str) -> bool:
    """The target among the prediction's words (whole words only), or its number among the prediction's numbers."""
    text = _clean(prediction)
    number = _parse_number(target)
    if number is not None:
        return number in _numbers_in(text)
    norm = normalize_text(target)
    return bool(norm) and re.search(rf"(?<!\w){re.escape(norm)}(?!\w)", normalize_text(text)) is not None


def check_answer(prediction: str, item_or_expected: TaskItem | str, aliases: Sequence[str] = (),
                 *, rule: str = "exact") -> bool:
    """Whether `prediction` (raw continuation or extracted answer) is right.

    Args:
        prediction: model output. Under "exact" it is cut at the first
            newline / "Q:" first; under "contains" all of it counts.
        item_or_expected: a TaskItem (its answer and aliases count) or the answer text.
        aliases: further accepted answers.
        rule: "exact" (the answer is the expected one) or "contains" (it
            appears in the answer); see the module docstring.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if isinstance(item_or_expected, TaskItem):
        targets = (item_or_expected.answer, *item_or_expected.aliases, *aliases)
    else:
        targets = (item_or_expected, *aliases)
    if rule == "contains":
        return any(_contains(prediction, t) for t in targets)
    return any(_matches(c, t) for c in _candidates(prediction) for t in targets)


def answer_rule(few_shot: bool, exact: bool = False) -> str:
    """The rule for a prompt's answers: "exact" for few-shot task answers (or
    when the user asks for it), "contains" for free-text answers."""
    return "exact" if few_shot or exact else "contains"


def describe_rule(rule: str, expected: str) -> str:
    """The rule in words, for beside a mark: 'contains “Paris”' or 'is “Paris” (exact)'."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    shown = " ".join(expected.split())
    return f"contains “{shown}”" if rule == "contains" else f"is “{shown}” (exact)"


def same_answer(a: str, b: str) -> bool:
    """Whether two answers read the same: equal once normalised (case,
    whitespace, edge punctuation, special tokens), so "France" == "France.\n"."""
    na, nb = normalize_text(_SPECIAL_TOKEN.sub(" ", a)), normalize_text(_SPECIAL_TOKEN.sub(" ", b))
    return na == nb if (na or nb) else a.strip() == b.strip()
