"""Examples for polar_core.program: construction, validation, text, op view, JSON."""

import json

import pytest

from polar_core.program import (
    DEFAULT_MAX_STEPS_PER_LAYER,
    Program,
    ProgramError,
    Segment,
)

D = 30


def keep(a, b):
    return Segment(a, b, "keep")


def skip(a, b):
    return Segment(a, b, "skip", 0)


def rep(a, b, r):
    return Segment(a, b, "repeat", r)


# --------------------------------------------------------------------------
# construction and validation


def test_full_is_identity():
    p = Program.full(D)
    assert p.path == tuple(range(D))
    assert p.is_full and p.layer_calls == D and p.compute_fraction == 1.0
    assert p.max_steps == DEFAULT_MAX_STEPS_PER_LAYER * D
    assert p.skipped_layers() == ()


def test_constructor_coerces_to_tuple_of_plain_ints():
    p = Program([0, 1, 2], 3)
    assert p.path == (0, 1, 2) and type(p.path) is tuple
    assert Program(range(3), 3) == p
    assert Program(iter([0, 1, 2]), 3) == p
    assert p.is_full


def test_equality_ignores_step_limit_and_hashes():
    a = Program((0, 1), 2)
    b = Program((0, 1), 2, max_steps=50)
    assert a == b and hash(a) == hash(b)
    assert a != Program((0, 1), 3)  # same path, other model depth


@pytest.mark.parametrize(
    "path, match",
    [
        ((), "program is empty"),
        ([], "program is empty"),
        ((0, 30), r"layer 30 is out of range: the model has 30 layers \(0-29\)"),
        ((31,), r"layer 31 is out of range: the model has 30 layers \(0-29\)"),
        ((0, -1), "layer -1 is out of range"),
        ((0, True), "step 1 must be an integer, got a bool"),
        ((0, 1.0), "step 1 must be an integer, got float"),
        ((0, "1"), "step 1 must be an integer, got str"),
        ("0,1,2", "not text; use Program.parse"),
        ({0, 1}, "ordered sequence"),
        (5, "sequence of layer indices, got int"),
        (tuple(range(D)) * 5, "program has 150 steps; the limit is 120"),
    ],
)
def test_constructor_rejects(path, match):
    with pytest.raises(ProgramError, match=match):
        Program(path, D)


def test_step_limit_is_inclusive_and_configurable():
    assert Program((0,) * 120, D).layer_calls == 120
    with pytest.raises(ProgramError, match="program has 121 steps; the limit is 120"):
        Program((0,) * 121, D)
    assert Program((0,) * 121, D, max_steps=121).layer_calls == 121
    with pytest.raises(ProgramError, match="program has 3 steps; the limit is 2"):
        Program((0, 1, 2), D, max_steps=2)


def test_endless_iterator_is_refused_without_hanging():
    def forever():
        while True:
            yield 0

    with pytest.raises(ProgramError, match="more than 120 steps"):
        Program(forever(), D)


@pytest.mark.parametrize(
    "num_layers, max_steps, match",
    [
        (0, None, "num_layers must be at least 1"),
        (-3, None, "num_layers must be at least 1"),
        (True, None, "num_layers must be an integer"),
        (30.0, None, "num_layers must be an integer"),
        (30, 0, "max_steps must be at least 1"),
        (30, 2.5, "max_steps must be an integer"),
    ],
)
def test_constructor_rejects_bad_sizes(num_layers, max_steps, match):
    with pytest.raises(ProgramError, match=match):
        Program((0,), num_layers, max_steps)


def test_program_error_is_a_value_error():
    assert issubclass(ProgramError, ValueError)


def test_skip():
    p = Program.skip(D, 10, 13)
    assert p.path == tuple(range(10)) + tuple(range(14, D))
    assert p.skipped_layers() == (10, 11, 12, 13)
    assert p.layer_calls == 26
    assert p.compute_fraction == pytest.approx(26 / 30)
    assert not p.is_full


def test_skip_everything_is_empty():
    with pytest.raises(ProgramError, match="program is empty"):
        Program.skip(D, 0, D - 1)


@pytest.mark.parametrize("start, end, match", [(5, 3, "backwards"), (0, 30, "layer 30 is out of range"), (-1, 2, "out of range")])
def test_skip_rejects_bad_blocks(start, end, match):
    with pytest.raises(ProgramError, match=match):
        Program.skip(D, start, end)


def test_loop():
    p = Program.loop(D, 12, 15, 2)
    assert p.path == tuple(range(16)) + (12, 13, 14, 15) + tuple(range(16, D))
    assert p.layer_calls == 34
    assert p.layer_counts() == (1,) * 12 + (2,) * 4 + (1,) * 14
    assert Program.loop(D, 3, 3, 3).path[:6] == (0, 1, 2, 3, 3, 3)
    assert Program.loop(D, 0, 29, 1).is_full


def test_loop_rejects_bad_counts_fast():
    with pytest.raises(ProgramError, match="repeats must be at least 1"):
        Program.loop(D, 2, 3, 0)
    # Would be 3e9 steps if built; must fail on the count alone.
    with pytest.raises(ProgramError, match="the limit is 120"):
        Program.loop(D, 0, 29, 100_000_000)
    with pytest.raises(ProgramError, match="repeats must be an integer"):
        Program.loop(D, 2, 3, 2.0)


def test_early_exit():
    p = Program.early_exit(D, 19)
    assert p.path == tuple(range(20))
    assert p.skipped_layers() == tuple(range(20, 30))
    assert Program.early_exit(D, 29).is_full
    with pytest.raises(ProgramError, match="layer 30 is out of range"):
        Program.early_exit(D, 30)


def test_drop_layers():
    p = Program.drop_layers(D, [5, 3, 5])
    assert p.skipped_layers() == (3, 5)
    assert p.layer_calls == 28
    assert Program.drop_layers(D, []).is_full
    with pytest.raises(ProgramError, match="layer 40 is out of range"):
        Program.drop_layers(D, [1, 40])
    with pytest.raises(ProgramError, match="program is empty"):
        Program.drop_layers(3, range(3))


def test_layer_counts_of_reordered_program():
    p = Program((3, 0, 3, 1), 5)
    assert p.layer_counts() == (1, 1, 0, 2, 0)
    assert p.skipped_layers() == (2, 4)
    assert p.compute_fraction == pytest.approx(0.8)


def test_single_layer_model_message():
    with pytest.raises(ProgramError, match=r"the model has 1 layer \(0\)"):
        Program((1,), 1)


# --------------------------------------------------------------------------
# text form


@pytest.mark.parametrize(
    "text, path",
    [
        ("0-11, 12-15x2, 16-29", tuple(range(16)) + (12, 13, 14, 15) + tuple(range(16, 30))),
        ("full", tuple(range(30))),
        ("  ALL ", tuple(range(30))),
        ("0-29", tuple(range(30))),
        ("5", (5,)),
        ("5x3", (5, 5, 5)),
        ("5×3", (5, 5, 5)),
        ("5*3", (5, 5, 5)),
        ("2-3X2", (2, 3, 2, 3)),
        (" 0 - 2 x 2 ,\t7 ", (0, 1, 2, 0, 1, 2, 7)),
        ("4-4", (4,)),
        ("3, 1, 2", (3, 1, 2)),
        ("0-1x1", (0, 1)),
        ("007", (7,)),
    ],
)
def test_parse_examples(text, path):
    assert Program.parse(text, D).path == path


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "program is empty"),
        ("   ", "program is empty"),
        ("0,,1", "'0,,1' has an empty item"),
        ("0-3,", "has an empty item"),
        (",0", "has an empty item"),
        ("3-", "cannot read program item '3-'"),
        ("-3", "cannot read program item '-3'"),
        ("a", "cannot read program item 'a'"),
        ("0-3 junk", "cannot read program item '0-3 junk'"),
        ("0-3x2x2", "cannot read program item '0-3x2x2'"),
        ("1 2", "cannot read program item '1 2'"),
        ("1.5", "cannot read program item '1.5'"),
        ("٣", "cannot read program item"),  # Arabic-Indic digit: not ASCII
        ("0-3; 4", "cannot read program item '0-3; 4'"),
        ("5-3", "range in program item '5-3' is backwards"),
        ("1x0", "repeat count in program item '1x0' must be at least 1"),
        ("31", r"layer 31 is out of range: the model has 30 layers \(0-29\) \(item '31'\)"),
        ("28-31", r"layer 31 is out of range.*item '28-31'"),
        ("99999999999999999999", "number in program item '99999999999999999999' is too large"),
        ("0x99999999999999999999", "too large"),
        ("0-29x100000000", "program has 3000000000 steps; the limit is 120"),
        ("0-29x5", "program has 150 steps; the limit is 120"),
    ],
)
def test_parse_rejects(text, match):
    with pytest.raises(ProgramError, match=match):
        Program.parse(text, D)


def test_parse_rejects_non_text():
    with pytest.raises(ProgramError, match="must be a string"):
        Program.parse([0, 1], D)


def test_parse_respects_max_steps():
    assert Program.parse("0-29x5", D, max_steps=150).layer_calls == 150
    with pytest.raises(ProgramError, match="the limit is 10"):
        Program.parse("full", D, max_steps=10)


@pytest.mark.parametrize(
    "program, text",
    [
        (Program.full(30), "0-29"),
        (Program.loop(30, 12, 15, 2), "0-11, 12-15x2, 16-29"),
        (Program.skip(30, 10, 13), "0-9, 14-29"),
        (Program.early_exit(30, 19), "0-19"),
        (Program((5, 5, 5), 30), "5x3"),
        (Program((0, 1, 0, 1, 0, 1), 30), "0-1x3"),
        (Program((3, 3, 4, 4), 30), "3x2, 4x2"),
        (Program((29, 28, 27), 30), "29, 28, 27"),
        # Re-orderings have no op view and get the fewest items.
        (Program((0, 1, 2, 1, 2, 3, 5, 4, 4, 4), 30), "0-2, 1-3, 5, 4x3"),
        (Program((5, 5, 5, 3), 30), "5x3, 3"),
        (Program((2, 3, 2, 3, 0, 1), 30), "2-3x2, 0-1"),
        # Ties on item count go to the cover that shows the loop.
        (Program((3, 3, 4, 2), 30), "3x2, 4, 2"),
        (Program((5, 6, 5, 6, 7, 0), 30), "5-6x2, 7, 0"),
    ],
)
def test_format_examples(program, text):
    assert program.format() == text
    assert str(program) == text
    assert Program.parse(text, program.num_layers) == program


def test_format_long_single_layer_loop_is_fast():
    """Guards the quadratic DP: trying every repeat count made this take ~12 s."""
    p = Program((5,) * 9999 + (4,), 80, max_steps=10_000)
    assert p.format() == "5x9999, 4"


def test_format_prefers_loop_to_fewer_plain_items():
    """Guards the readable loop form: `0-15, 12-29` is shorter but hides the loop."""
    p = Program.loop(30, 12, 15, 2)
    assert p.format() != "0-15, 12-29"
    assert Program.parse("0-15, 12-29", 30) == p


# --------------------------------------------------------------------------
# op view


@pytest.mark.parametrize(
    "path, segments",
    [
        (tuple(range(6)), (keep(0, 5),)),
        ((0, 1, 4, 5), (keep(0, 1), skip(2, 3), keep(4, 5))),
        ((2, 3), (skip(0, 1), keep(2, 3), skip(4, 5))),
        ((0, 1, 2, 1, 2, 3, 4, 5), (keep(0, 0), rep(1, 2, 2), keep(3, 5))),
        ((0, 0, 0, 1, 2, 3, 4, 5), (rep(0, 0, 3), keep(1, 5))),
        ((0, 0, 1, 1, 2, 3, 4, 5), (rep(0, 0, 2), rep(1, 1, 2), keep(2, 5))),
        ((0, 1, 0, 1, 4, 5, 4, 5), (rep(0, 1, 2), skip(2, 3), rep(4, 5, 2))),
        ((0, 1, 2, 3, 2, 3, 5), (keep(0, 1), rep(2, 3, 2), skip(4, 4), keep(5, 5))),
        ((5,), (skip(0, 4), keep(5, 5))),
    ],
)
def test_op_view_examples(path, segments):
    p = Program(path, 6)
    assert p.op_view() == segments
    assert Program.from_ops(segments, 6) == p


@pytest.mark.parametrize(
    "path",
    [
        (1, 0),  # re-ordering
        (0, 2, 1, 3),  # jump back below the current block
        (0, 1, 2, 1, 3),  # jump back that is not an exact repeat
        (0, 1, 2, 1, 2, 1),  # partial last copy
        (0, 1, 2, 0, 1),  # partial copy of the block 0-2
        (3, 3, 1),
        (0, 1, 0, 1, 1),  # a layer used by two segments
    ],
)
def test_op_view_none(path):
    assert Program(path, 6).op_view() is None


def test_loop_op_view_matches_paper_form():
    assert Program.loop(30, 12, 15, 2).op_view() == (keep(0, 11), rep(12, 15, 2), keep(16, 29))


def test_from_ops_builds_and_merges_on_the_way_back():
    segments = (keep(0, 1), keep(2, 3), skip(4, 4), skip(5, 5))
    p = Program.from_ops(segments, 6)
    assert p.path == (0, 1, 2, 3)
    assert p.op_view() == (keep(0, 3), skip(4, 5))


@pytest.mark.parametrize(
    "segments, match",
    [
        ((keep(0, 2),), "cover layers 0-2; they must cover 0-5"),
        ((keep(1, 5),), "expected one starting at layer 0, got 1-5"),
        ((keep(0, 2), keep(2, 5)), "expected one starting at layer 3, got 2-5"),
        ((keep(0, 2), keep(4, 5)), "expected one starting at layer 3, got 4-5"),
        ((keep(0, 6),), "layer 6 is out of range"),
        ((skip(0, 5),), "program is empty"),
        ((rep(0, 5, 100),), "program has 600 steps; the limit is 24"),
        (("keep 0-5",), "expected a Segment"),
        ((), "they must cover 0-5"),
    ],
)
def test_from_ops_rejects(segments, match):
    with pytest.raises(ProgramError, match=match):
        Program.from_ops(segments, 6)


@pytest.mark.parametrize(
    "args, match",
    [
        ((3, 2, "keep"), "not an ascending block"),
        ((-1, 2, "keep"), "not an ascending block"),
        ((0, 2, "loop"), "segment op must be one of skip, keep, repeat"),
        ((0, 2, "keep", 2), "a keep segment cannot run 2 times"),
        ((0, 2, "skip", 3), "a skip segment cannot run 3 times"),
        ((0, 2, "repeat", 1), "a repeat segment runs at least 2 times"),
        ((0, 2, "repeat"), "a repeat segment runs at least 2 times"),
        ((0, 2.0, "keep"), "segment end must be an integer"),
    ],
)
def test_segment_rejects(args, match):
    with pytest.raises(ProgramError, match=match):
        Segment(*args)


def test_segment_skip_default_reads_naturally():
    assert Segment(0, 3, "skip").repeats == 0
    assert Segment(0, 3, "skip") == Segment(0, 3, "skip", 0)
    assert rep(2, 4, 3).layer_calls == 9 and rep(2, 4, 3).length == 3


# --------------------------------------------------------------------------
# JSON


def test_to_dict():
    d = Program.loop(30, 12, 15, 2).to_dict()
    assert d == {
        "path": list(range(16)) + [12, 13, 14, 15] + list(range(16, 30)),
        "num_layers": 30,
        "text": "0-11, 12-15x2, 16-29",
    }


@pytest.mark.parametrize("program", [Program.full(30), Program.loop(30, 3, 5, 3), Program((4, 2, 2, 9), 10)])
def test_dict_round_trip_through_json(program):
    d = json.loads(json.dumps(program.to_dict()))
    assert Program.from_dict(d) == program
    assert Program.from_dict(d, num_layers=program.num_layers) == program


def test_from_dict_path_wins_and_text_is_fallback():
    assert Program.from_dict({"path": [0, 1], "num_layers": 4, "text": "3"}).path == (0, 1)
    assert Program.from_dict({"text": "1-2x2", "num_layers": 4}).path == (1, 2, 1, 2)
    assert Program.from_dict({"text": "1-2x2"}, num_layers=4).path == (1, 2, 1, 2)


@pytest.mark.parametrize(
    "d, num_layers, match",
    [
        ([0, 1], 4, "must be a JSON object, got list"),
        ({"path": [0, 1]}, None, "does not say how many layers"),
        ({"path": [0, 1], "num_layers": 4}, 30, "program is for a model with 4 layers, but this model has 30"),
        ({"path": [0, 1], "num_layers": "4"}, None, "'num_layers' must be an integer"),
        ({"path": [0, 1], "num_layers": True}, None, "'num_layers' must be an integer"),
        ({"path": [0, 1], "num_layers": 0}, None, "num_layers must be at least 1"),
        ({"path": "0,1", "num_layers": 4}, None, "'path' must be a list"),
        ({"path": [0, "1"], "num_layers": 4}, None, "step 1 must be an integer, got str"),
        ({"path": [0, False], "num_layers": 4}, None, "step 1 must be an integer, got a bool"),
        ({"path": [0, 1.0], "num_layers": 4}, None, "step 1 must be an integer, got float"),
        ({"path": [0, 4], "num_layers": 4}, None, "layer 4 is out of range"),
        ({"path": [], "num_layers": 4}, None, "program is empty"),
        ({"num_layers": 4}, None, "needs a 'path' list or a 'text' string"),
        ({"text": 3, "num_layers": 4}, None, "'text' must be a string"),
        ({"text": "0-9", "num_layers": 4}, None, "layer 9 is out of range"),
    ],
)
def test_from_dict_rejects(d, num_layers, match):
    with pytest.raises(ProgramError, match=match):
        Program.from_dict(d, num_layers)
