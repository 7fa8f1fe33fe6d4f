"""polar_core.study.supervision: reading and writing merged_mcts_samples.json."""

import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polar_core.program import Program
from polar_core.study.supervision import (
    SupervisionError,
    SupervisionSample,
    load_supervision,
    save_supervision,
)

D = 6

# The reference implementation's README example, for a 6-layer model.
REFERENCE_SAMPLE = {
    "question": "Solve ...",
    "gt_ans": "\\boxed{42}",
    "initial_score": 0.0,
    "final_valid_transitions": [[0, 1, 2, 4, 5], [0, 1, 2, 2, 3, 4, 5]],
    "final_invalid_transitions": [[0, 1, 3, 4, 5]],
}


def sample(**changes):
    """The reference sample with some fields changed (None deletes a field)."""
    out = dict(REFERENCE_SAMPLE)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def write(tmp_path, data, name="merged_mcts_samples.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_reference_example_from_file(tmp_path):
    path = write(tmp_path, {"samples": [REFERENCE_SAMPLE]})
    (s,) = load_supervision(path, D)
    assert s.question == "Solve ..."
    assert s.answer == "\\boxed{42}"
    assert s.initial_score == 0.0
    assert [p.path for p in s.valid_programs] == [(0, 1, 2, 4, 5), (0, 1, 2, 2, 3, 4, 5)]
    assert s.valid_programs[1].op_view() is not None  # the repeat reads as a loop
    assert [p.path for p in s.invalid_programs] == [(0, 1, 3, 4, 5)]
    assert all(p.num_layers == D for p in s.valid_programs + s.invalid_programs)
    assert load_supervision(str(path), D) == [s]  # str paths too


@pytest.mark.parametrize(
    "data",
    [
        {"samples": [REFERENCE_SAMPLE, sample(question="Q2")]},
        [REFERENCE_SAMPLE, sample(question="Q2")],
        {"id-a": REFERENCE_SAMPLE, "id-b": sample(question="Q2")},
    ],
    ids=["samples-object", "list", "id-mapping"],
)
def test_accepted_shapes(data):
    loaded = load_supervision(data, D)
    assert [s.question for s in loaded] == ["Solve ...", "Q2"]
    assert all(len(s.valid_programs) == 2 for s in loaded)


@pytest.mark.parametrize(
    "changes, answer",
    [
        ({"gt_ans": "7"}, "7"),
        ({"gt_ans": None, "ground_truth": "8"}, "8"),
        ({"gt_ans": None, "answer": "9"}, "9"),
        ({"gt_ans": None, "sample_info": {"ground_truth": "10"}}, "10"),
        ({"gt_ans": None, "sample_info": {"answer": "11"}}, "11"),
        ({"gt_ans": 12}, "12"),  # numeric answers are read as text
        ({"ground_truth": "second"}, "\\boxed{42}"),  # gt_ans comes first
    ],
)
def test_answer_aliases(changes, answer):
    (s,) = load_supervision([sample(**changes)], D)
    assert s.answer == answer


def test_question_in_sample_info():
    (s,) = load_supervision([sample(question=None, sample_info={"question": "inner"})], D)
    assert s.question == "inner"


def test_optional_fields_may_be_missing_or_null():
    (s,) = load_supervision([sample(final_invalid_transitions=None, initial_score=None)], D)
    assert s.invalid_programs == () and s.initial_score is None
    raw = dict(REFERENCE_SAMPLE, final_invalid_transitions=None, initial_score=None)
    (t,) = load_supervision([raw], D)
    assert t.invalid_programs == () and t.initial_score is None


def test_empty_valid_list_is_kept():
    loaded = load_supervision([sample(final_valid_transitions=[]), REFERENCE_SAMPLE], D)
    assert len(loaded) == 2
    assert loaded[0].valid_programs == ()


def test_empty_file_shapes_give_no_samples():
    assert load_supervision([], D) == []
    assert load_supervision({"samples": []}, D) == []
    assert load_supervision({}, D) == []


def test_extra_keys_are_ignored():
    data = {"samples": [sample(search_metadata={"x": 1}, query_id="q1")], "original_depth": D}
    assert len(load_supervision(data, D)) == 1


@pytest.mark.parametrize(
    "data, match",
    [
        (True, "must be an object or a list of samples, got bool"),
        (42, "got int"),
        (b"[]", "got bytes"),  # bytes are neither a path nor parsed JSON
        ({"samples": {"a": REFERENCE_SAMPLE}}, "'samples' must be a list"),
        ([REFERENCE_SAMPLE, "text"], "sample 1: a sample must be an object, got str"),
        ({"q7": [1, 2]}, "sample 'q7': a sample must be an object, got list"),
        ([sample(question=None)], "sample 0: missing question"),
        ([sample(question=3)], "sample 0: question must be a string, got int"),
        ([REFERENCE_SAMPLE, sample(gt_ans=None)], "sample 1: missing answer"),
        ([sample(gt_ans=True)], "sample 0: answer must be a string, got bool"),
        ([sample(final_valid_transitions=None)], "sample 0: missing 'final_valid_transitions'"),
        ([sample(final_valid_transitions="0,1")], "'final_valid_transitions' must be a list of paths"),
        ([sample(final_valid_transitions=[[0, 1], "0,1"])], r"final_valid_transitions\[1\] must be a list"),
        (
            [REFERENCE_SAMPLE, sample(final_valid_transitions=[[0, 6]])],
            r"sample 1: final_valid_transitions\[0\]: layer 6 is out of range: the model has 6 layers \(0-5\)",
        ),
        ([sample(final_valid_transitions=[[0, -1]])], "layer -1 is out of range"),
        ([sample(final_valid_transitions=[[]])], r"final_valid_transitions\[0\]: program is empty"),
        ([sample(final_valid_transitions=[[0, 1.5]])], "step 1 must be an integer, got float"),
        ([sample(final_valid_transitions=[[0, True]])], "got a bool"),
        ([sample(final_valid_transitions=[[0] * 25])], "program has 25 steps; the limit is 24"),
        ([sample(final_invalid_transitions=[[9]])], r"final_invalid_transitions\[0\]: layer 9"),
        ([sample(final_invalid_transitions=5)], "'final_invalid_transitions' must be a list"),
        ([sample(initial_score="high")], "initial_score must be a number or null"),
        ([sample(initial_score=True)], "initial_score must be a number or null"),
        ([sample(initial_score=float("nan"))], "initial_score must be finite"),
        ({"num_layers": 28, "samples": [REFERENCE_SAMPLE]}, "file is for a model with 28 layers, but this model has 6"),
    ],
)
def test_errors_name_sample_and_problem(data, match):
    with pytest.raises(SupervisionError, match=match):
        load_supervision(data, D)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nests 100000 levels deep"),  # refused before parsing (RecursionError)
        ("[" + "9" * 5000 + "]", "a number has 5000 digits"),  # refused before int() converts it
    ],
)
def test_bad_files(tmp_path, text, match):
    with pytest.raises(SupervisionError, match=match):
        load_supervision(write(tmp_path, text), D)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'{"samples": [\xff]}')
    with pytest.raises(SupervisionError, match="not UTF-8"):
        load_supervision(path, D)


def test_missing_file(tmp_path):
    with pytest.raises(SupervisionError, match="cannot read supervision file"):
        load_supervision(tmp_path / "nope.json", D)
    with pytest.raises(SupervisionError, match="cannot read supervision file"):
        load_supervision(str(tmp_path), D)  # a directory
    with pytest.raises(SupervisionError, match="cannot read supervision file"):
        load_supervision("bad\x00name.json", D)  # the OS refuses NUL bytes with ValueError


def test_file_over_size_limit_is_refused_before_reading(tmp_path):
    path = write(tmp_path, {"samples": [REFERENCE_SAMPLE] * 50})
    size = path.stat().st_size
    assert len(load_supervision(path, D, max_bytes=size)) == 50
    with pytest.raises(SupervisionError, match=f"file is {size} bytes; the limit is {size - 1}"):
        load_supervision(path, D, max_bytes=size - 1)


def test_bad_num_layers_is_a_supervision_error():
    with pytest.raises(SupervisionError, match="num_layers must be at least 1"):
        load_supervision([], 0)


def test_save_load_round_trip(tmp_path):
    samples = [
        SupervisionSample(
            question="Capital of France?",
            answer="Paris",
            valid_programs=(Program.full(D), Program.loop(D, 2, 3, 2), Program((5, 0, 0), D)),
            invalid_programs=(Program.skip(D, 0, 2),),
            initial_score=1.0,
        ),
        SupervisionSample(question="Ünïcode ✓", answer="", valid_programs=()),
    ]
    path = save_supervision(samples, tmp_path / "out.json")
    assert load_supervision(path, D) == samples
    document = json.loads(path.read_text(encoding="utf-8"))
    # The reference implementation's field names, so its loader reads our files.
    assert document["num_layers"] == D
    assert document["samples"][0]["gt_ans"] == "Paris"
    assert document["samples"][0]["final_valid_transitions"][1] == [0, 1, 2, 3, 2, 3, 4, 5]
    assert document["samples"][1]["initial_score"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left


def test_saved_depth_guards_against_wrong_model(tmp_path):
    path = save_supervision([SupervisionSample("q", "a", (Program.full(D),))], tmp_path / "s.json")
    # The paths would all be in range for 8 layers; only the stored depth catches it.
    with pytest.raises(SupervisionError, match="model with 6 layers, but this model has 8"):
        load_supervision(path, 8)


def test_save_refuses_mixed_depths(tmp_path):
    samples = [SupervisionSample("q", "a", (Program.full(D), Program.full(D + 1)))]
    with pytest.raises(SupervisionError, match="mix programs"):
        save_supervision(samples, tmp_path / "s.json")
    assert not list(tmp_path.iterdir())


def test_sample_lists_become_tuples():
    s = SupervisionSample("q", "a", [Program.full(D)], [Program.full(D)])
    assert isinstance(s.valid_programs, tuple) and isinstance(s.invalid_programs, tuple)


# --------------------------------------------------------------------------
# property: any JSON value fails only with SupervisionError

json_scalars = st.none() | st.booleans() | st.integers(-3, 8) | st.floats() | st.text(max_size=6)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
paths = st.lists(st.integers(-1, D) | json_scalars, max_size=6) | json_values
near_samples = st.fixed_dictionaries(
    {},
    optional={
        "question": st.text(max_size=6) | json_values,
        "gt_ans": st.text(max_size=6) | json_values,
        "ground_truth": json_values,
        "sample_info": json_values,
        "final_valid_transitions": st.lists(paths, max_size=3) | json_values,
        "final_invalid_transitions": st.lists(paths, max_size=3) | json_values,
        "initial_score": st.floats() | json_values,
    },
)
documents = (
    json_values
    | st.lists(near_samples, max_size=3)
    | st.dictionaries(st.text(max_size=4), near_samples, max_size=3)
    | st.fixed_dictionaries({"samples": st.lists(near_samples, max_size=3) | json_values})
)
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(data):
    try:
        loaded = load_supervision(data, D)
    except SupervisionError as err:
        assert str(err)
        return
    assert all(isinstance(s, SupervisionSample) for s in loaded)


@SETTINGS
@given(data=documents)
def test_random_json_values_fail_only_with_supervision_error(data):
    _check(data)


@settings(max_examples=50, deadline=None)
@given(data=documents | st.binary(max_size=40))
def test_random_files_fail_only_with_supervision_error(data):
    # tmp_path is per test, not per example; a temp dir per example is cheap.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.json")
        with open(path, "wb") as f:
            try:
                f.write(data if isinstance(data, bytes) else json.dumps(data).encode())
            except UnicodeEncodeError:  # lone surrogates cannot be written as UTF-8
                return
        _check(path)


def test_a_pipe_cannot_bypass_the_size_limit(tmp_path):
    """Regression: the limit was checked on st_size, which is 0 for a FIFO, so a
    pipe fed 300 MiB was read whole. The file is now read with a byte cap."""
    import threading

    fifo = tmp_path / "samples.json"
    os.mkfifo(fifo)
    written = []

    def feed():
        try:
            with open(fifo, "wb") as f:
                for _ in range(64):  # 64 x 64 KiB = 4 MiB, far over the 100 KB limit below
                    f.write(b"[" + b" " * 65535)
                    written.append(1)
        except BrokenPipeError:  # the reader stopped at its cap: what we want
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    with pytest.raises(SupervisionError, match="more than 100000 bytes"):
        load_supervision(fifo, D, max_bytes=100_000)
    writer.join(10)
    assert len(written) < 64  # the reader did not drain the pipe


def test_merge_samples_unions_programs_per_question():
    from polar_core.study.supervision import SupervisionError, merge_samples

    full, short, shorter = Program.full(4), Program((0, 1, 3), 4), Program((0, 3), 4)
    a = [SupervisionSample("q1", "x", (full,), (short,), 1.0), SupervisionSample("q2", "y", (), (full,), 0.0)]
    b = [SupervisionSample("q1", "x", (short, shorter), (), None)]
    merged = merge_samples(a, b)
    assert [s.question for s in merged] == ["q1", "q2"]
    assert merged[0].valid_programs == (shorter, short, full)  # shortest first
    assert merged[0].invalid_programs == () and merged[0].initial_score == 1.0  # found valid by the other search
    with pytest.raises(SupervisionError, match="two answers"):
        merge_samples(a, [SupervisionSample("q1", "other", (), ())])
