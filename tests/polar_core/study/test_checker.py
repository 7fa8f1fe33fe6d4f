"""The checker's two rules (exact for few-shot answers, contains for free
text), same_answer, and the rule as the page words it. The exact rule's
normalisation is tested case by case in test_tasks.py."""
from __future__ import annotations

import pytest

from polar_core.study.checker import answer_rule, check_answer, describe_rule, same_answer


@pytest.mark.parametrize("prediction, expected", [
    # Both were marked wrong for every program before free text had its own rule.
    ("The capital of France is Paris.", "Paris"),
    ("Kenya is a continent located in East Africa", "Africa"),
    ("PARIS!", "paris"),
    ("It's the Hague.", "The Hague"),
    ("Buenos   Aires is the capital.", "Buenos Aires"),
    ("The answer is 8.", "8"),  # numbers compare as numbers
    ("It is 1,000 metres.", "1000"),
    ("That makes 5.0", "5"),
    ("I have seven apples", "7"),
    ("3 + 4 = 7", "7"),
    ("Paris<|im_end|>", "Paris"),  # a special token left in the text
    ("First line.\nThe answer: Paris", "Paris"),  # free text is read whole, past newlines
])
def test_contains_accepts(prediction, expected):
    assert check_answer(prediction, expected, rule="contains")


@pytest.mark.parametrize("prediction, expected", [
    ("Parisian food is good.", "Paris"),  # whole words only
    ("Lyon", "Paris"),
    ("18 apples", "8"),
    ("7.5 percent", "7"),
    ("1,000,000", "1000"),
    ("x7 and 7th", "7"),
    ("BuenosAires", "Buenos Aires"),
    ("", "Paris"),
])
def test_contains_rejects(prediction, expected):
    assert not check_answer(prediction, expected, rule="contains")


def test_exact_stays_the_task_suites_rule():
    """Few-shot items keep the strict rule: containing the answer is not being it."""
    assert not check_answer("The capital of France is Paris.", "Paris")
    assert not check_answer("The capital of France is Paris.", "Paris", rule="exact")
    assert check_answer(" Paris\nQ: next", "Paris")
    with pytest.raises(ValueError, match="rule"):
        check_answer("Paris", "Paris", rule="fuzzy")


def test_answer_rule_and_its_words():
    assert answer_rule(few_shot=True) == "exact"
    assert answer_rule(few_shot=False) == "contains"
    assert answer_rule(few_shot=False, exact=True) == "exact"
    assert describe_rule("contains", " Paris ") == "contains “Paris”"
    assert describe_rule("exact", "Paris") == "is “Paris” (exact)"


@pytest.mark.parametrize("a, b, same", [
    ("France", "France\n", True),  # one stopped at the newline, the other at end-of-sequence
    (" France.", "france", True),
    ("France", "Paris", False),
    ("", "", True),
    ("...", "!!!", False),
])
def test_same_answer_compares_what_a_person_reads(a, b, same):
    assert same_answer(a, b) is same
