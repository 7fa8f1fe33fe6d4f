"""Shape and content tests for the pure Plotly figure builders in app/figures.py."""

import base64
import json

import numpy as np
import plotly.graph_objects as go
import pytest

from app import figures as F


def _cells(trace) -> int:
    """Number of filled (non-NaN) cells of a heatmap trace."""
    return int(np.isfinite(np.asarray(trace.z, dtype=float)).sum())


def _by_name(fig, name):
    """Heatmap traces of the given name (legend swatches share the name)."""
    return [t for t in fig.data if t.name == name and isinstance(t, go.Heatmap)]


def _reject(const):
    raise AssertionError(f"figure JSON holds a bare {const}, which browsers cannot parse")


def _serialisable(fig):
    """Parse fig.to_json() strictly: bare NaN/Infinity literals are invalid JSON."""
    return json.loads(fig.to_json(), parse_constant=_reject)


def _is_placeholder(fig, text):
    return isinstance(fig, go.Figure) and len(fig.data) == 0 and text in fig.layout.annotations[0].text


# ------------------------------------------------------------ display_token
@pytest.mark.parametrize("raw, shown", [
    (" Paris", "␣Paris"),
    ("\n", "\\n"),
    ("a\tb\r", "a\\tb\\r"),
    ("\x00", "\\x00"),
    ("", "∅"),
    ("Paris", "Paris"),
])
def test_display_token(raw, shown):
    assert F.display_token(raw) == shown


def test_plot_text_escapes_html_like_tokens():
    # Plotly renders <b>, <br>, <s> ...; a token "<s>" must show literally.
    assert F._plot_text("<s>") == "&lt;s&gt;"


# ------------------------------------------------------------- program_grid
def test_program_grid_full_program_is_a_staircase():
    D = 6
    fig = F.program_grid(list(range(D)), D)
    skip, keep, rep = (_by_name(fig, F.OP_NAMES[op])[0] for op in ("skip", "keep", "repeat"))
    z = np.asarray(keep.z, dtype=float)
    assert z.shape == (D, D)
    assert np.array_equal(np.isfinite(z), np.eye(D, dtype=bool))  # cell (layer k, step k)
    assert _cells(rep) == 0 and _cells(skip) == 0
    _serialisable(fig)


def test_program_grid_loop_cells_use_loop_colour():
    path = [0, 1, 2, 1, 2, 3]  # block (1, 2) looped twice
    fig = F.program_grid(path, 4)
    heat = {t.name: t for t in fig.data if isinstance(t, go.Heatmap)}
    keep, rep = heat[F.OP_NAMES["keep"]], heat[F.OP_NAMES["repeat"]]
    assert _cells(keep) + _cells(rep) == len(path)
    rz = np.isfinite(np.asarray(rep.z, dtype=float))
    assert list(zip(*np.nonzero(rz))) == [(1, 3), (2, 4)]  # (layer, step) of the second visits
    assert {c for _, c in rep.colorscale} == {F.OP_COLORS["repeat"]}
    assert {c for _, c in keep.colorscale} == {F.OP_COLORS["keep"]}
    assert rep.text[2][4] == "step 4: layer 2 (visit 2)"
    assert keep.text[1][1] == "step 1: layer 1 (visit 1)"
    # Legend swatches: keep and repeat, no skip (every layer runs).
    legend = [t.name for t in fig.data if isinstance(t, go.Scatter) and t.showlegend is not False]
    assert legend == [F.OP_NAMES["keep"], F.OP_NAMES["repeat"]]


def test_program_grid_marks_skipped_rows_and_baseline():
    D = 5
    fig = F.program_grid([0, 1, 4], D, baseline_path=list(range(D)))
    heat = {t.name: t for t in fig.data if isinstance(t, go.Heatmap)}
    skip = np.isfinite(np.asarray(heat[F.OP_NAMES["skip"]].z, dtype=float))
    assert skip.shape == (D, D)  # step axis as wide as the longer baseline
    assert skip.all(axis=1).tolist() == [False, False, True, True, False]
    assert heat[F.OP_NAMES["skip"]].text[2][0] == "layer 2: skipped"
    base = fig.data[0]
    assert isinstance(base, go.Scatter) and list(base.y) == list(range(D))
    assert "2 layers skipped" in fig.layout.title.text
    assert F.OP_NAMES["skip"] in [t.name for t in fig.data if isinstance(t, go.Scatter)]


def test_program_grid_large_program_stays_compact():
    D = 40
    path = [i for i in range(D) for _ in range(4)]  # every layer looped 4 times: 4*D steps
    fig = F.program_grid(path, D)
    heat = {t.name: t for t in fig.data if isinstance(t, go.Heatmap)}
    assert _cells(heat[F.OP_NAMES["keep"]]) == D
    assert _cells(heat[F.OP_NAMES["repeat"]]) == 3 * D
    assert 300 <= fig.layout.height <= 450
    assert fig.layout.xaxis.dtick >= 5 and fig.layout.yaxis.dtick >= 2  # ticks thinned
    _serialisable(fig)


def test_program_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="path"):
        F.program_grid([0, 5], 4)
    with pytest.raises(ValueError, match="baseline_path"):
        F.program_grid([0], 4, baseline_path=[0, -1])
    with pytest.raises(ValueError, match="num_layers"):
        F.program_grid([0], 0)
    assert _is_placeholder(F.program_grid([], 4), "Empty program")


# ------------------------------------------------------- similarity_heatmap
def test_similarity_heatmap_cosine_ranges():
    S = 7
    pos = np.full((S, S), 0.5)
    fig = F.similarity_heatmap(pos, [f"s{k}·L{k}" for k in range(S)])
    (h,) = fig.data
    assert np.asarray(h.z).shape == (S, S)
    assert (h.zmin, h.zmax) == (0.0, 1.0)
    assert list(h.x) == list(h.y) == [f"s{k}·L{k}" for k in range(S)]
    assert h.hovertemplate.startswith("%{y} vs %{x}")
    assert fig.layout.yaxis.autorange == "reversed"
    neg = pos.copy()
    neg[0, 1] = -0.2
    h = F.similarity_heatmap(neg, [str(k) for k in range(S)]).data[0]
    assert (h.zmin, h.zmax) == (-1.0, 1.0)
    _serialisable(fig)


def test_similarity_heatmap_angular_distance():
    m = np.array([[1.0, 0.0], [0.0, 1.0 + 1e-7]])  # rounding above 1 must not give NaN
    h = F.similarity_heatmap(m, ["a", "b"], metric="angular").data[0]
    np.testing.assert_allclose(np.asarray(h.z), [[0.0, 0.5], [0.5, 0.0]], atol=1e-6)
    assert (h.zmin, h.zmax) == (0.0, 1.0)


def test_similarity_heatmap_thins_tick_labels():
    S = 160
    fig = F.similarity_heatmap(np.eye(S), [f"s{k}" for k in range(S)])
    assert len(fig.layout.xaxis.tickvals) <= F.MAX_TICKS
    assert fig.layout.xaxis.tickvals[1] == fig.layout.xaxis.ticktext[1] == "s8"
    assert len(fig.to_json()) < 250_000  # no (S, S) hover-text matrix, float32 z


def test_similarity_heatmap_keeps_repeated_labels_apart():
    """A category axis would merge two steps with the same label into one cell."""
    h = F.similarity_heatmap(np.eye(3), ["L1", "L1", "L2"]).data[0]
    assert list(h.x) == ["L1", "L1 (2)", "L2"]


def test_similarity_heatmap_rejects_bad_input():
    with pytest.raises(ValueError, match="labels"):
        F.similarity_heatmap(np.eye(3), ["a", "b"])
    with pytest.raises(ValueError, match="square"):
        F.similarity_heatmap(np.ones((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="metric"):
        F.similarity_heatmap(np.eye(2), ["a", "b"], metric="euclid")
    assert _is_placeholder(F.similarity_heatmap(np.zeros((0, 0)), []), "No steps")


# ------------------------------------------------------ block_influence_bar
def test_block_influence_bar_one_trace_per_op():
    vals = [0.1, 0.2, 0.05, 0.3]
    ops = ["keep", "keep", "repeat", "loop"]
    fig = F.block_influence_bar(vals, ["a", "b", "c", "d"], ops, secondary=[0.0, 0.1, 0.2, 0.3])
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert [b.name for b in bars] == [F.OP_NAMES["keep"], F.OP_NAMES["repeat"]]
    assert list(bars[0].x) == [0, 1] and list(bars[1].x) == [2, 3]  # "loop" read as repeat
    assert bars[1].marker.color == F.OP_COLORS["repeat"]
    assert list(bars[1].customdata) == ["c", "d"]
    (line,) = [t for t in fig.data if isinstance(t, go.Scatter)]
    assert line.name == "mean over tokens" and len(line.y) == 4
    _serialisable(fig)


def test_block_influence_bar_rejects_bad_input():
    with pytest.raises(ValueError, match="labels"):
        F.block_influence_bar([0.1, 0.2], ["a"], ["keep", "keep"])
    with pytest.raises(ValueError, match="ops"):
        F.block_influence_bar([0.1, 0.2], ["a", "b"], ["keep"])
    with pytest.raises(ValueError, match="secondary"):
        F.block_influence_bar([0.1], ["a"], ["keep"], secondary=[1, 2])
    with pytest.raises(ValueError, match="unknown"):
        F.block_influence_bar([0.1], ["a"], ["jump"])
    assert _is_placeholder(F.block_influence_bar([], [], []), "No steps")


# ---------------------------------------------------------- logit_lens_grid
def test_logit_lens_grid_text_and_highlight():
    labels = ["s0·L0", "s1·L1", "s2·L2"]
    toks = [[" the", "\n", "<s>"], [" Paris", " Lyon", "Paris"], [" Paris", " France", " the"]]
    probs = [[0.2, 0.1, 0.05], [0.4, 0.2, 0.1], [0.9, 0.05, 0.01]]
    fig = F.logit_lens_grid(labels, toks, probs, highlight_token=" Paris")
    (h,) = fig.data
    assert np.asarray(h.z).shape == (3, 3)
    assert list(h.text[0]) == ["␣the", "\\n", "&lt;s&gt;"]
    assert h.text[1][0] == "␣Paris"
    assert h.texttemplate == "%{text}"
    assert "rank 1: ␣Paris" in h.customdata[2][0]
    long = F.logit_lens_grid(["a"], [["x" * 40]], [[0.5]]).data[0]
    assert long.text[0][0] == "x" * 11 + "…" and "x" * 40 in long.customdata[0][0]
    # " Paris" and "Paris" both match: (step 1, rank 1), (1, 3), (2, 1).
    boxes = sorted((s.y0 + 0.5, s.x0 + 0.5) for s in fig.layout.shapes)
    assert boxes == [(1, 1), (1, 3), (2, 1)]
    assert fig.layout.yaxis.title.text.startswith("step (first at bottom")
    _serialisable(fig)


@pytest.mark.parametrize("S", [30, 120])
def test_logit_lens_grid_shows_tokens_at_any_depth(S):
    """Over 24 steps (the full program, every lesson) the lens drew colour bars
    with no token text; up to the 4 x 30-layer step limit every row must read."""
    k = 5
    tokens = [[f"t{s}", "x", "y", "z", " Paris" if s == S - 1 else "w"] for s in range(S)]
    fig = F.logit_lens_grid([f"s{s + 1}·L{s}" for s in range(S)], tokens, np.full((S, k), 0.1), highlight_token="Paris")
    (h,) = fig.data
    assert h.texttemplate == "%{text}" and len(h.text) == S and all(row[0] == f"t{s}" for s, row in enumerate(h.text))
    assert len(fig.layout.yaxis.tickvals) == S  # every step labelled
    assert fig.layout.height >= F.LENS_ROW_PX * S  # rows tall enough for their text
    assert [(sh.y0 + 0.5, sh.x0 + 0.5) for sh in fig.layout.shapes] == [(S - 1, 5)]  # the answer outlined


def test_logit_lens_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="top_tokens"):
        F.logit_lens_grid(["a", "b"], [["x"]], [[0.1], [0.2]])
    with pytest.raises(ValueError, match="top_probs"):
        F.logit_lens_grid(["a"], [["x"]], [[0.1], [0.2]])
    with pytest.raises(ValueError, match=r"top_tokens\[0\]"):
        F.logit_lens_grid(["a"], [["x"]], [[0.1, 0.2]])
    assert _is_placeholder(F.logit_lens_grid([], [], []), "No steps")


# -------------------------------------------------- answer_probability_curve
def test_answer_probability_curve_series_of_different_lengths():
    series = {
        "full program": ([f"L{i}" for i in range(5)], [0.0, 0.1, 0.2, 0.5, 0.8]),
        "edited": (["L0", "L1", "L1", "L2"], [0.0, 0.2, 0.6, 0.9]),
    }
    fig = F.answer_probability_curve(series, token=" Paris")
    assert [t.name for t in fig.data] == ["full program", "edited"]
    assert [len(t.x) for t in fig.data] == [5, 4]
    assert fig.data[0].line.color == F.BASELINE_COLOR
    assert fig.data[1].line.color == F.EDITED_COLOR
    assert list(fig.data[1].customdata) == ["L0", "L1", "L1", "L2"]
    assert "␣Paris" in fig.layout.title.text
    assert fig.layout.yaxis.type != "log"
    log = F.answer_probability_curve(series, token="x", log=True, quantity="rank")
    assert log.layout.yaxis.type == "log" and log.layout.yaxis.autorange == "reversed"
    _serialisable(fig)


def test_answer_probability_curve_rejects_bad_input():
    with pytest.raises(ValueError, match="edited"):
        F.answer_probability_curve({"edited": (["a", "b"], [0.1])}, token="x")
    with pytest.raises(ValueError, match="quantity"):
        F.answer_probability_curve({"e": (["a"], [0.1])}, token="x", quantity="logit")
    assert _is_placeholder(F.answer_probability_curve({}, token="x"), "No answer")


# ----------------------------------------------------------- alignment_curve
def test_alignment_curve_two_lines_with_gaps():
    fig = F.alignment_curve(["a", "b", "c"], [1.0, np.nan, 0.8], [0.2, 0.5, 0.9])
    assert len(fig.data) == 2 and all(isinstance(t, go.Scatter) for t in fig.data)
    assert np.isnan(fig.data[0].y[1])
    y = _serialisable(fig)["data"][0]["y"]
    # Plotly ships numpy arrays as typed binary; NaN survives there and plotly.js draws a gap.
    decoded = np.frombuffer(base64.b64decode(y["bdata"]), dtype=y["dtype"]) if isinstance(y, dict) else y
    assert decoded[1] is None or np.isnan(decoded[1])


def test_alignment_curve_rejects_bad_input():
    with pytest.raises(ValueError, match="cos_to_final"):
        F.alignment_curve(["a", "b"], [1.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="cos_to_baseline"):
        F.alignment_curve(["a"], [1.0, 1.0], [1.0])
    assert _is_placeholder(F.alignment_curve([], [], []), "No steps")


# --------------------------------------------------------- accuracy_vs_depth
def test_accuracy_vs_depth_marks_oracles():
    points = [
        {"method": "full program", "accuracy": 0.42, "layer_calls": 30, "oracle": False, "family": None},
        {"method": "router top-1", "accuracy": 0.46, "layer_calls": 27.5, "oracle": False, "family": "router"},
        {"method": "router pass@5", "accuracy": 0.68, "layer_calls": 26.0, "oracle": True, "family": "router"},
    ]
    fig = F.accuracy_vs_depth(points)
    named = {t.name: t for t in fig.data if t.name}
    assert set(named) == {"full program", "router top-1", "router pass@5 (oracle)"}
    oracle, top1 = named["router pass@5 (oracle)"], named["router top-1"]
    assert oracle.marker.symbol == "circle-open" and top1.marker.symbol == "circle"
    assert oracle.marker.color == top1.marker.color  # same family, same colour
    assert list(oracle.y) == [pytest.approx(68.0)]
    (link,) = [t for t in fig.data if t.line.dash == "dash"]  # top-1 -> pass@5 connector
    assert list(link.x) == [27.5, 26.0]
    assert fig.layout.yaxis.title.text == "accuracy (%)"
    _serialisable(fig)


def test_accuracy_vs_depth_methods_at_one_spot_share_one_label():
    """Six methods at one point (a router that keeps every layer) drew six labels on top of each other."""
    same = [{"method": m, "accuracy": 0.8, "layer_calls": 30, "oracle": False} for m in "ABCDEF"]
    fig = F.accuracy_vs_depth(same + [{"method": "G", "accuracy": 0.5, "layer_calls": 27}])
    labelled = [t for t in fig.data if t.mode == "markers+text"]
    assert [t.text[0] for t in labelled] == ["A<br>B<br>C<br>D<br>E<br>F", "G"]
    assert {t.name for t in fig.data} == set("ABCDEFG")  # each method keeps its legend entry
    assert labelled[0].textposition != labelled[1].textposition


def test_accuracy_vs_depth_rejects_bad_input():
    with pytest.raises(ValueError, match="accuracy"):
        F.accuracy_vs_depth([{"method": "m", "accuracy": 46.2, "layer_calls": 3}])  # percent, not 0-1
    with pytest.raises(ValueError, match="layer_calls"):
        F.accuracy_vs_depth([{"method": "m", "accuracy": 0.5}])
    assert _is_placeholder(F.accuracy_vs_depth([]), "No evaluation")


# ------------------------------------------------------------- empty_figure
def test_empty_figure_shows_escaped_message():
    fig = F.empty_figure("Error: <bad> input")
    assert len(fig.data) == 0
    assert fig.layout.annotations[0].text == "Error: &lt;bad&gt; input"
    assert fig.layout.xaxis.visible is False
    assert fig.layout.template.layout.paper_bgcolor is not None  # the shared (plotly_white-like) template applied
    _serialisable(fig)


# ------------------------------------------------------------ the page's look
def test_titles_fit_beside_the_toolbar_on_a_phone():
    """Long titles ran under the Plotly toolbar at 390 px; titles stay short, captions say the rest."""
    figs = [
        F.program_grid([0, 1, 4], 30, baseline_path=list(range(30))),
        F.similarity_heatmap(np.eye(3), ["a", "b", "c"]),
        F.logit_lens_grid(["a"], [[" Washington"]], [[0.5]], highlight_token=" Washington"),
        F.answer_probability_curve({"full program": (["a"], [0.5])}, token=" Washington"),
        F.block_influence_bar([0.1], ["a"], ["keep"]),
        F.alignment_curve(["a"], [1.0], [1.0]),
        F.accuracy_vs_depth([{"method": "m", "accuracy": 0.5, "layer_calls": 3}]),
    ]
    for fig in figs:
        assert len(fig.layout.title.text) <= 40, fig.layout.title.text
        assert fig.layout.modebar.orientation == "v"  # the toolbar stands in the right margin


def test_every_chart_has_a_caption_and_a_png_name():
    for name in ("program", "similarity", "logit_lens", "answer_probability", "block_influence", "alignment",
                 "accuracy"):
        assert F.CAPTIONS[name].endswith(".") and "\n" not in F.CAPTIONS[name]
    config = F.plot_config("logit_lens")
    assert config["toImageButtonOptions"] == {"format": "png", "filename": "polar-logit_lens", "scale": 2}
