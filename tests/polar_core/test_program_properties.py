"""Properties of polar_core.program: no crashes on junk, and lossless round trips."""

import itertools

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from polar_core.program import Program, ProgramError, Segment

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

depths = st.integers(min_value=1, max_value=40)

# Text built mostly from the grammar's own characters, so the parser's deep
# branches are reached, with arbitrary characters mixed in.
grammar_chars = st.sampled_from(list("0123456789-,xX×* \t")) | st.characters()
program_texts = st.text(grammar_chars, max_size=40) | st.sampled_from(["full", "all", " Full ", "0-29x100000000"])


@st.composite
def paths(draw, max_len=60):
    """A random valid (num_layers, path): anything in range, any order."""
    num_layers = draw(depths)
    size = min(max_len, 4 * num_layers)
    layers = st.integers(min_value=0, max_value=num_layers - 1)
    return num_layers, tuple(draw(st.lists(layers, min_size=1, max_size=size)))


@st.composite
def item_paths(draw):
    """A valid (num_layers, path) glued from runs and repeated runs, like real loops."""
    num_layers = draw(depths)
    path: list[int] = []
    for _ in range(draw(st.integers(1, 6))):
        start = draw(st.integers(0, num_layers - 1))
        end = draw(st.integers(start, min(num_layers - 1, start + 5)))
        path += list(range(start, end + 1)) * draw(st.integers(1, 4))
    assume(len(path) <= 4 * num_layers)
    return num_layers, tuple(path)


@st.composite
def tilings(draw):
    """Random op-view segments tiling 0..D-1, repeats up to 4 (the paper's bound)."""
    num_layers = draw(depths)
    segments, start = [], 0
    while start < num_layers:
        end = draw(st.integers(start, min(num_layers - 1, start + 3)))
        op = draw(st.sampled_from(["skip", "keep", "repeat"]))
        repeats = {"skip": 0, "keep": 1, "repeat": draw(st.integers(2, 4))}[op]
        segments.append(Segment(start, end, op, repeats))
        start = end + 1
    return num_layers, tuple(segments)


@SETTINGS
@given(text=program_texts, num_layers=depths)
def test_parse_never_crashes(text, num_layers):
    try:
        p = Program.parse(text, num_layers)
    except ProgramError as err:
        assert str(err)  # every refusal says why
        return
    assert 1 <= p.layer_calls <= p.max_steps
    assert all(0 <= layer < num_layers for layer in p.path)


@SETTINGS
@given(case=paths() | item_paths())
def test_format_parse_round_trip(case):
    num_layers, path = case
    p = Program(path, num_layers)
    text = p.format()
    assert Program.parse(text, num_layers) == p
    # Canonical: formatting the parsed program gives the same text back.
    assert Program.parse(text, num_layers).format() == text
    segments = p.op_view()
    if segments is not None:
        # Written segment by segment: one item per segment that runs.
        assert len(text.split(",")) == sum(s.op != "skip" for s in segments)
    else:
        # Fewest items: never worse than one item per maximal ascending run.
        runs = 1 + sum(1 for x, y in zip(path, path[1:]) if y != x + 1)
        assert len(text.split(",")) <= runs


@SETTINGS
@given(case=paths() | item_paths())
def test_op_view_round_trip(case):
    num_layers, path = case
    p = Program(path, num_layers)
    segments = p.op_view()
    if segments is None:
        return
    assert Program.from_ops(segments, num_layers) == p
    # Merged: no two neighbouring keeps, no two neighbouring skips.
    for left, right in zip(segments, segments[1:]):
        assert not (left.op == right.op and left.op in ("keep", "skip"))
    assert [s.start for s in segments] == [0] + [s.end + 1 for s in segments[:-1]]


@SETTINGS
@given(case=tilings())
def test_every_tiling_has_an_op_view(case):
    num_layers, segments = case
    try:
        p = Program.from_ops(segments, num_layers)
    except ProgramError:
        assume(False)  # all skips: an empty program
    view = p.op_view()
    assert view is not None
    assert Program.from_ops(view, num_layers) == p
    assert len(view) <= len(segments)


def _all_op_paths(num_layers, max_repeats):
    """Every path any tiling of num_layers layers can produce, by brute force."""
    found = set()
    for cuts in itertools.product([False, True], repeat=num_layers - 1):
        bounds, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                bounds.append((start, i - 1))
                start = i
        bounds.append((start, num_layers - 1))
        for counts in itertools.product(range(max_repeats + 1), repeat=len(bounds)):
            found.add(tuple(layer for (a, b), r in zip(bounds, counts) for _ in range(r) for layer in range(a, b + 1)))
    found.discard(())
    return found


def _min_items(path):
    """Fewest text items covering path, by plain recursion over prefixes."""
    if not path:
        return 0
    best = len(path)  # one item per step always works
    for k in range(1, len(path) + 1):
        for size in range(1, k + 1):
            block = tuple(range(path[0], path[0] + size))
            if k % size == 0 and path[:k] == block * (k // size):
                best = min(best, 1 + _min_items(path[k:]))
    return best


def test_op_view_exists_exactly_when_some_tiling_gives_the_path():
    """Exhaustive for D=3, paths up to 6 steps: op_view is None iff no tiling
    exists; format round-trips, and uses the fewest items when there is no op view."""
    num_layers, max_len = 3, 6
    tiled = _all_op_paths(num_layers, max_repeats=max_len)
    for size in range(1, max_len + 1):
        for path in itertools.product(range(num_layers), repeat=size):
            p = Program(path, num_layers)
            assert (p.op_view() is not None) == (path in tiled), path
            text = p.format()
            assert Program.parse(text, num_layers) == p, path
            if p.op_view() is None:
                assert len(text.split(",")) == _min_items(path), path


json_scalars = st.none() | st.booleans() | st.integers(-5, 50) | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=12,
)
program_dicts = st.fixed_dictionaries(
    {},
    optional={
        "path": json_values | st.lists(st.integers(-2, 40), max_size=8),
        "num_layers": json_values | st.integers(-1, 40),
        "text": json_values | program_texts,
    },
)


@SETTINGS
@given(d=json_values | program_dicts, num_layers=st.none() | st.integers(-1, 40))
def test_from_dict_returns_program_or_program_error(d, num_layers):
    try:
        p = Program.from_dict(d, num_layers)
    except ProgramError:
        return
    assert isinstance(p, Program)
    assert Program.from_dict(p.to_dict()) == p
