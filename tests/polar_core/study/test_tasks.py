"""The offline task suite: data, splits, prompts and the answer checker."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polar_core.study import tasks
from polar_core.study.checker import check_answer, extract_answer
from polar_core.study.tasks import (
    FAMILIES,
    SPLITS,
    TaskItem,
    build_prompt,
    family_description,
    load_suite,
    split_of,
)


def _item(answer: str, *aliases: str) -> TaskItem:
    return TaskItem("test/x", "test", "Q?", answer, tuple(aliases))


# ---------------------------------------------------------------------------
# Checker: each normalisation rule, then what must be rejected.


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("Paris", "Paris"),
        (" paris\n", "Paris"),  # case, surrounding whitespace, newline stop
        ("PARIS", "Paris"),
        ("Paris.", "Paris"),  # trailing punctuation
        ('"Paris"', "Paris"),  # quotes
        ("\u201cParis\u201d!", "Paris"),  # curly quotes
        ("*Paris*", "Paris"),  # markdown emphasis
        ("the Hague", "The Hague"),
        ("Hague", "The Hague"),  # leading article dropped on both sides
        ("a cat", "cat"),
        ("Buenos   Aires", "Buenos Aires"),  # inner whitespace collapsed
        ("Bogota", "Bogotá"),  # accents folded
        ("BOGOTÁ", "bogota"),
        ("Ｐａｒｉｓ", "Paris"),  # NFKC: full-width letters
        ("Port au Prince", "Port-au-Prince"),  # hyphen == space
        ("Ndjamena", "N'Djamena"),  # apostrophe dropped
        ("N\u2019Djamena", "N'Djamena"),  # curly apostrophe
        ("Washington D.C.", "Washington, D.C."),
        ("Paris. It is in France.", "Paris"),  # the first sentence is the answer
        ("Paris\nQ: What is", "Paris"),
        ("Paris Q: next", "Paris"),
        ("1,000", "1000"),  # thousands separator
        ("1000", "1,000"),
        ("5.0", "5"),  # decimals
        ("5", "5.00"),
        ("12,500.50", "12500.5"),
        ("-3", "-3"),
        ("\u22123", "-3"),  # unicode minus
        ("seven", "7"),  # number words
        ("Twenty-one", "21"),
        ("twenty one", "21"),
        ("7", "seven"),
        ("300 cm", "300"),  # unit suffixes
        ("300 centimeters.", "300"),
        ("12 eggs", "12"),
        ("5 square meters", "5"),
        ("10 years old", "10"),
        ("7.", "7"),
        ("7\n8", "7"),  # only the first line counts
        ("7. Seven is right.", "7"),
    ],
)
def test_checker_accepts(prediction, expected):
    assert check_answer(prediction, expected)


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("Paris or Lyon", "Paris"),  # an alternative is not an answer
        ("Paris, Lyon", "Paris"),
        ("Paris and Lyon", "Paris"),
        ("Lyon", "Paris"),
        ("Parisian", "Paris"),  # prefix of a word
        ("Pari", "Paris"),
        ("The answer is Paris", "Paris"),  # contains the answer among other words
        ("France, Paris", "Paris"),
        ("", "Paris"),
        ("\nParis", "Paris"),  # the answer after the stop text does not count
        ("Q: Paris", "Paris"),
        ("7 or 8", "7"),
        ("7 and 8", "7"),
        ("3 + 4 = 7", "7"),  # an expression, first number is 3
        ("17", "7"),
        ("70", "7"),
        ("7.5", "7"),
        ("1,000", "100"),
        ("100", "1,000"),
        ("7 8", "7"),  # a second number is not a unit
        ("7 apples or 8", "7"),
        ("seventy", "7"),
        ("7 is not right", "7"),
        ("...", "!"),  # nothing left after normalising is never an answer
        ("Washington, D.C. or New York", "Washington, D.C."),  # "D.C." does not end a sentence
    ],
)
def test_checker_rejects(prediction, expected):
    assert not check_answer(prediction, expected)


def test_checker_aliases_from_item_and_argument():
    item = _item("Washington, D.C.", "Washington", "Washington DC")
    assert check_answer("Washington", item)
    assert check_answer("washington dc", item)
    assert check_answer("DC", item, aliases=("DC",))
    assert not check_answer("New York", item)
    assert check_answer("USA", "United States", aliases=("USA", "US"))
    assert not check_answer("UK", "United States", aliases=("USA", "US"))


def test_extract_answer_cuts_at_newline_and_next_question():
    assert extract_answer(" Paris\nQ: What is the capital") == "Paris"
    assert extract_answer(" Paris Q: next") == "Paris"
    assert extract_answer("  42  ") == "42"
    assert extract_answer("\nParis") == ""


@given(st.integers(min_value=0, max_value=10**7))
@settings(max_examples=200, deadline=None)
def test_checker_number_formats(n):
    assert check_answer(f"{n:,}", str(n))
    assert check_answer(f"{n}.0", str(n))
    assert check_answer(f" {n} units\n", str(n))
    assert not check_answer(str(n + 1), str(n))
    assert not check_answer(f"{n} or {n + 1}", str(n))


def test_every_item_accepts_its_own_answer_and_aliases():
    for item in load_suite():
        for text in (item.answer, *item.aliases):
            assert check_answer(f" {text}\n\nQ: next", item), (item.id, text)
        assert not check_answer(f"{item.answer} or {item.answer}x", item), item.id


def test_numeric_items_reject_off_by_one():
    for item in load_suite(["add_1digit", "add_2digit", "unit_conversion", "word_problems", "next_number"]):
        assert not check_answer(str(int(item.answer) + 1), item), item.id


# ---------------------------------------------------------------------------
# Suite shape, splits, determinism.


def test_suite_size_and_families():
    suite = load_suite()
    assert len(suite) >= 1500
    assert len(FAMILIES) >= 6
    assert {it.family for it in suite} == set(FAMILIES)
    for family in FAMILIES:
        assert family_description(family)
        for split in SPLITS:
            assert load_suite(family, split), (family, split)


def test_ids_unique_and_no_duplicate_questions_within_family():
    suite = load_suite()
    assert len({it.id for it in suite}) == len(suite)
    for family in FAMILIES:
        questions = Counter(it.question for it in load_suite(family))
        assert not [q for q, n in questions.items() if n > 1], family


def test_splits_disjoint_cover_suite_and_roughly_70_15_15():
    suite = load_suite()
    parts = {s: {it.id for it in load_suite(split=s)} for s in SPLITS}
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
    assert set().union(*parts.values()) == {it.id for it in suite}
    share = {s: len(ids) / len(suite) for s, ids in parts.items()}
    assert 0.65 < share["train"] < 0.75 and 0.11 < share["val"] < 0.19 and 0.11 < share["test"] < 0.19


def test_split_is_a_stable_hash_of_the_id():
    """Regression guard: changing the hash (or using Python's salted hash()) would
    silently move items between train and test."""
    for item in load_suite():
        assert item.split == split_of(item.id)
    # Values pinned when the suite was made; they must never change.
    pinned = {it.id: it.split for it in load_suite() if it.id in {"capitals/france", "antonyms/hot", "add_1digit/3+4"}}
    assert pinned == {"capitals/france": "train", "antonyms/hot": "val", "add_1digit/3+4": "test"}
    assert [split_of(f"x/{i}") for i in range(8)] == ["train", "train", "val", "train", "train", "train", "train", "test"]


def test_generation_is_deterministic_and_cache_free():
    for family in FAMILIES:
        assert tasks._build_family(family) == tasks._build_family(family)
    assert load_suite() == load_suite()
    assert load_suite() is not load_suite()  # callers get a copy, not the cache


def test_load_suite_filters_and_errors():
    assert all(it.family == "capitals" for it in load_suite("capitals"))
    assert all(it.split == "val" for it in load_suite(["antonyms"], "val"))
    with pytest.raises(ValueError, match="unknown task family"):
        load_suite(["nope"])
    with pytest.raises(ValueError, match="unknown split"):
        load_suite(split="dev")
    with pytest.raises(ValueError):
        TaskItem("a", "b", "q", "a", split="dev")


def test_get_item():
    assert tasks.get_item("capitals/france").answer == "Paris"
    with pytest.raises(KeyError):
        tasks.get_item("capitals/atlantis")


# ---------------------------------------------------------------------------
# Answers are right: recompute every generated family.


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def test_addition_answers():
    for item in load_suite(["add_1digit", "add_2digit"]):
        a, b = _ints(item.question)
        assert int(item.answer) == a + b, item.id
    assert len(load_suite("add_1digit")) == 100


def test_unit_conversion_answers():
    factor = {}
    for big, bigs, small, smalls, f in tasks._CONVERSIONS:
        factor[(smalls, big)] = factor[(smalls, bigs)] = ("mul", f)
        factor[(bigs, small)] = factor[(bigs, smalls)] = ("div", f)
    for item in load_suite("unit_conversion"):
        m = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", item.question)
        op, f = factor[(m.group(1), m.group(3))]
        k = int(m.group(2))
        assert int(item.answer) == (k * f if op == "mul" else k // f), item.id
        assert op == "mul" or k % f == 0


def test_word_problem_answers():
    for item in load_suite("word_problems"):
        a, b = _ints(item.question)[:2]
        q = item.question
        expected = a - b if "away" in q else a * b if "in each bag" in q else a + b
        assert int(item.answer) == expected > 0, item.id


def test_next_number_answers():
    for item in load_suite("next_number"):
        terms = _ints(item.question)
        assert len(terms) == 4
        steps = {y - x for x, y in zip(terms, terms[1:])}
        ratios = {y / x for x, y in zip(terms, terms[1:])}
        if len(steps) == 1:
            assert int(item.answer) == terms[-1] + steps.pop(), item.id
        else:
            assert ratios == {2.0} and int(item.answer) == terms[-1] * 2, item.id


# ---------------------------------------------------------------------------
# Prompts.


def test_prompt_format_and_shots_from_train():
    train_qa = {(it.question, it.answer) for it in load_suite(split="train")}
    for item in load_suite():
        prompt = build_prompt(item, shots=3)
        assert prompt.endswith(f"Q: {item.question}\nA:")
        assert prompt.count(item.question) == 1, item.id  # never its own shot
        blocks = prompt.split("\n\n")
        assert len(blocks) == 4
        for block in blocks[:-1]:
            q, a = block.removeprefix("Q: ").split("\nA: ")
            assert (q, a) in train_qa
            assert not check_answer(a, item), (item.id, a)  # a copied shot never passes


def test_prompt_is_deterministic_and_respects_shots():
    item = tasks.get_item("capitals/france")
    assert build_prompt(item) == build_prompt(item)
    assert build_prompt(item, shots=0) == "Q: What is the capital of France?\nA:"
    assert build_prompt(item, shots=5).count("Q: ") == 6
    with pytest.raises(ValueError):
        build_prompt(item, shots=-1)
    with pytest.raises(ValueError, match="usable shots"):
        build_prompt(item, shots=10_000)


# ---------------------------------------------------------------------------
# Measurement entry point (with a stand-in model; the real run is recorded in
# polar_core/assets/baselines/<model>.json).


def test_measure_full_accuracy_with_a_stand_in_model(monkeypatch):
    from types import SimpleNamespace

    from polar_core.study import evaluate

    answers = {build_prompt(it): it.answer for it in load_suite()}
    monkeypatch.setattr(evaluate, "generate", lambda lm, prompts, programs, **kwargs: [
        SimpleNamespace(text=f" {answers[p]}\n") for p in prompts])
    report = evaluate.measure_full_accuracy(SimpleNamespace(name="stand-in"), ("capitals", "add_1digit"),
                                            per_family=5, log=lambda *_: None)
    assert report["families"]["capitals"] == {"n": 5, "correct": 5, "accuracy": 1.0}
    assert len(report["items"]) == 10 and all(r["correct"] for r in report["items"].values())


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "gemma3-270m"])
def test_baseline_file_records_its_command(model):
    data = json.loads(tasks.baseline_path(model).read_text())
    assert data["command"].startswith("python -m polar_core baseline") and data["model"] == model
    assert set(data["families"]) == set(FAMILIES)
    for fam in data["families"].values():
        assert 0 <= fam["accuracy"] <= 1 and fam["n"] > 0
