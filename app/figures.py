"""Plotly figure builders for the explorer: plain data in, ``go.Figure`` out.

Pure functions with no Gradio, torch or polar_core imports, so they can be
tested on their shapes and reused in notebooks. Every figure goes through
``_style`` so margins, font, template and legend placement match across the app.

Conventions shared by all builders:
- step axes are numeric (step index k); the step labels (e.g. "s3·L12") are
  shown in hover text and as thinned tick labels. Numeric axes keep steps in
  order even when two labels coincide, which a categorical axis would merge.
  (The similarity heatmap uses category axes of de-duplicated labels instead,
  to keep its JSON small.)
- one colour per op everywhere: keep = blue, repeat/loop = orange, skip = grey;
  baseline (full program) = grey, edited program = blue.
- empty inputs give ``empty_figure`` with a message; mismatched lengths raise
  ``ValueError`` naming the argument.
"""

from __future__ import annotations

import html
import math
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

OP_COLORS = {"keep": "#4C78A8", "repeat": "#F58518", "skip": "#D9D9D9"}
OP_NAMES = {"keep": "keep", "repeat": "repeat / loop", "skip": "skipped layer"}
BASELINE_COLOR = "#8C8C8C"
EDITED_COLOR = "#1F77B4"
# Colours for further series / method families; orange and grey are left out
# because they already mean "loop" and "baseline".
PALETTE = ["#1F77B4", "#54A24B", "#B279A2", "#E45756", "#72B7B2", "#9D755D", "#EECA3B"]
HIGHLIGHT_COLOR = "#D62728"

# The look of plotly_white, only the parts our figures use. Applying the full
# "plotly_white" template deep-copies defaults for every trace type (~10-20 ms
# per figure, six figures per edit); this lean copy costs ~1 ms.
_AXIS = dict(gridcolor="#EBF0F8", linecolor="#EBF0F8", zerolinecolor="#EBF0F8", zerolinewidth=2, ticks="",
             automargin=True, title=dict(standoff=15))
TEMPLATE = go.layout.Template(layout=dict(
    paper_bgcolor="white", plot_bgcolor="white", hovermode="closest", xaxis=_AXIS, yaxis=_AXIS,
    colorway=["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692"],
))
FONT = dict(family="Inter, Segoe UI, Helvetica, Arial, sans-serif", size=12)
MAX_TICKS = 20  # more tick labels than this collide at laptop widths
LENS_ROW_PX = 20  # one lens row per step, tall enough for 11 px token text
# A colour bar in the lower part of the right margin, below the Plotly toolbar
# (drawn vertically in that margin, see PLOT_CONFIG), so neither covers the other.
COLORBAR = dict(thickness=12, len=0.6, y=0, yanchor="bottom")

# One line under each chart saying how to read it (the page shows them; tests
# check that every chart the page draws has one).
CAPTIONS = {
    "program": "Each filled cell is one step: the layer (row) the program runs at that step (column). "
               "A staircase is the full program; gaps are skipped layers; orange cells run a layer again (a loop).",
    "similarity": "Cosine similarity of the hidden state after every pair of steps (last prompt token). "
                  "Bright blocks are steps that barely change the state: candidates to skip.",
    "logit_lens": "Each row decodes one step's hidden state as if it were the last layer: its top 5 next tokens, "
                  "darker = more probable. The last step is at the top; the answer's token is outlined in red.",
    "answer_probability": "Probability of the answer's first token when each step is decoded (logit lens), "
                          "full program in grey, edited program in blue: where the answer appears.",
    "block_influence": "How much each step changes the hidden state, 1 − cos(input, output). "
                       "Low bars are steps that do little (ShortGPT drops those layers).",
    "alignment": "Cosine of the edited program's hidden state to the full program's, after the same layer (solid) "
                 "and at its end (dashed): 1 = on the same track.",
    "accuracy": "Accuracy against average layer calls per token, one marker per method; hollow markers are "
                "oracles (they need the answer to choose), dashed lines join a method to its oracle.",
}
# Plotly's own options for every chart (gr.Plot passes them on): the toolbar
# stands vertically in the right margin, off the titles, and its camera saves
# a PNG at twice the screen size.
PLOT_CONFIG = dict(displaylogo=False, modeBarButtonsToRemove=["select2d", "lasso2d", "autoScale2d"])


# ----------------------------------------------------------------- helpers
def _style(
    fig: go.Figure,
    *,
    title: str | None,
    height: int,
    xaxis_title: str | None = None,
    yaxis_title: str | None = None,
) -> go.Figure:
    """Apply the shared look: template, font, margins, title left, legend top right."""
    legend = sum(t.showlegend is not False and bool(t.name) for t in fig.data) > 1
    fig.update_layout(
        template=TEMPLATE,
        font=FONT,
        height=height,
        margin=dict(l=64, r=44, t=56 if title else 28, b=96 if legend else 56),
        title=dict(text=title, x=0.01, xanchor="left", font=dict(size=15)) if title else None,
        # Under the x axis, so that neither the title nor the toolbar covers it at phone widths.
        legend=dict(orientation="h", x=0, xanchor="left", y=0, yref="container", yanchor="bottom"),
        hoverlabel=dict(font=dict(family=FONT["family"], size=12)),
        modebar=dict(orientation="v", bgcolor="rgba(255,255,255,0.6)"),
    )
    if xaxis_title is not None:
        fig.update_xaxes(title_text=xaxis_title)
    if yaxis_title is not None:
        fig.update_yaxes(title_text=yaxis_title)
    return fig


def _clamp(v: float, lo: int, hi: int) -> int:
    return int(max(lo, min(hi, v)))


def _check_len(name: str, values: Sequence, expected: int, against: str) -> None:
    if len(values) != expected:
        raise ValueError(f"{name} has length {len(values)}, expected {expected} (len({against}))")


def plot_config(name: str) -> dict:
    """PLOT_CONFIG with the PNG file name for one chart ("polar-<name>.png")."""
    return dict(PLOT_CONFIG, toImageButtonOptions=dict(format="png", filename=f"polar-{name}", scale=2))


def _step_ticks(labels: Sequence[str], max_ticks: int = MAX_TICKS) -> dict:
    """Axis settings showing at most max_ticks step labels, evenly thinned."""
    n = len(labels)
    stride = max(1, math.ceil(n / max_ticks))
    idx = list(range(0, n, stride))
    return dict(tickmode="array", tickvals=idx, ticktext=[str(labels[i]) for i in idx])


def _unique(labels: list[str]) -> list[str]:
    """Labels made unique by numbering repeats ("a", "a (2)"), for category axes."""
    seen: dict[str, int] = {}
    out = []
    for x in labels:
        seen[x] = seen.get(x, 0) + 1
        out.append(x if seen[x] == 1 else f"{x} ({seen[x]})")
    return out


def _int_dtick(n: int) -> int:
    """Tick spacing for an integer axis of n values (layers or steps)."""
    for d in (1, 2, 5, 10, 20, 50):
        if n / d <= MAX_TICKS:
            return d
    return 100


def display_token(s: str) -> str:
    """Make whitespace and control characters in a token visible.

    " Paris" -> "␣Paris", "\\n" -> the two characters backslash-n, "" -> "∅".
    The result is plain text; ``_plot_text`` additionally escapes it for Plotly.
    """
    if s == "":
        return "∅"
    out = []
    for ch in s:
        if ch == " ":
            out.append("␣")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _plot_text(s: str, max_len: int | None = None) -> str:
    """display_token, shortened to max_len characters, escaped for Plotly text."""
    t = display_token(s)
    if max_len is not None and len(t) > max_len:
        t = t[: max_len - 1] + "…"
    # Plotly renders a subset of HTML in text; tokens such as "<s>" or "<br>"
    # must show literally. Escape last so an entity is never cut in half.
    return html.escape(t, quote=False)


def empty_figure(message: str) -> go.Figure:
    """A blank figure with a centered message (before a run, or on errors)."""
    fig = go.Figure()
    fig.add_annotation(
        text=html.escape(message, quote=False), x=0.5, y=0.5, xref="paper", yref="paper",
        showarrow=False, font=dict(size=14, color="#666666"),
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _style(fig, title=None, height=300)


# ---------------------------------------------------------------- builders
def _check_paths(path: Sequence[int], baseline_path: Sequence[int] | None, num_layers: int) -> None:
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    for name, p in (("path", path), ("baseline_path", baseline_path or [])):
        bad = [i for i in p if not 0 <= int(i) < num_layers]
        if bad:
            raise ValueError(f"{name} has layers outside 0..{num_layers - 1}: {bad[:5]}")


def _roll_cells(path: list[int], D: int, S: int) -> tuple[dict, dict]:
    """Per op, a (D, S) matrix (1 = a cell, NaN = none, so no hover) and its hover text.

    A layer's first visit is "keep", later visits "repeat"; a layer never
    visited is a "skip" row across every step.
    """
    z = {op: np.full((D, S), np.nan) for op in ("skip", "keep", "repeat")}
    hover = np.full((D, S), "", dtype=object)  # keep and repeat cells never overlap: one text for both
    skip_hover = np.full((D, S), "", dtype=object)
    visits = [0] * D
    for k, layer in enumerate(path):
        visits[layer] += 1
        z["keep" if visits[layer] == 1 else "repeat"][layer, k] = 1.0
        hover[layer, k] = f"step {k}: layer {layer} (visit {visits[layer]})"
    for i in (i for i in range(D) if visits[i] == 0):
        z["skip"][i, :] = 1.0
        skip_hover[i, :] = f"layer {i}: skipped"
    return z, {"skip": skip_hover, "keep": hover, "repeat": hover}


def _roll_heatmaps(fig: go.Figure, z: dict, text: dict, D: int, S: int) -> None:
    """One single-colour heatmap per op, then a legend swatch for each op shown."""
    for op in ("skip", "keep", "repeat"):
        fig.add_trace(go.Heatmap(
            z=z[op], x=list(range(S)), y=list(range(D)), text=text[op], name=OP_NAMES[op],
            colorscale=[[0, OP_COLORS[op]], [1, OP_COLORS[op]]], zmin=0, zmax=1, showscale=False,
            hoverongaps=False, hovertemplate="%{text}<extra></extra>", xgap=1, ygap=1,
            legendgroup=op, opacity=0.6 if op == "skip" else 1.0,
        ))
    # Heatmaps have no legend swatch of their own: add one marker per op shown.
    shown = ["keep"] + [op for op in ("repeat", "skip") if np.isfinite(z[op]).any()]
    for op in shown:
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", name=OP_NAMES[op], legendgroup=op,
            marker=dict(symbol="square", size=12, color=OP_COLORS[op]),
        ))


def program_grid(
    path: Sequence[int],
    num_layers: int,
    *,
    title: str | None = None,
    baseline_path: Sequence[int] | None = None,
) -> go.Figure:
    """Piano roll of a program: layer (y, 0 at bottom) x step (x).

    A filled cell at (k, path[k]); the first visit of a layer is drawn in the
    keep colour, later visits (loops) in the repeat colour. Rows of layers the
    program never runs are shaded grey across all steps. ``baseline_path``, if
    given, is drawn as a faint grey staircase on the same step axis.
    Traces: [baseline line], skipped-layer heatmap, keep heatmap, repeat
    heatmap, then one legend-only marker per op.
    """
    path = [int(i) for i in path]
    _check_paths(path, baseline_path, num_layers)
    if not path:
        return empty_figure("Empty program: no steps to show")
    D, S = num_layers, max(len(path), len(baseline_path or []))  # S: width of the step axis
    z, text = _roll_cells(path, D, S)
    fig = go.Figure()
    if baseline_path:
        fig.add_trace(go.Scatter(
            x=list(range(len(baseline_path))), y=[int(i) for i in baseline_path],
            mode="lines", name="full program", line=dict(color=BASELINE_COLOR, width=1, dash="dot"),
            opacity=0.6, hoverinfo="skip",
        ))
    _roll_heatmaps(fig, z, text, D, S)
    fig.update_xaxes(range=[-0.5, S - 0.5], dtick=_int_dtick(S), showgrid=False, zeroline=False)
    fig.update_yaxes(range=[-0.5, D - 0.5], dtick=_int_dtick(D), showgrid=False, zeroline=False)
    if title is None:
        skipped = int(np.isfinite(z["skip"][:, 0]).sum())
        title = f"Program: {len(path)} steps" + (f", {skipped} layers skipped" if skipped else "")
    return _style(fig, title=title, height=_clamp(150 + 7 * D, 300, 450),
                  xaxis_title="step", yaxis_title="layer")


def similarity_heatmap(
    matrix,
    labels: Sequence[str],
    *,
    metric: str = "cosine",
    title: str | None = None,
) -> go.Figure:
    """Step x step similarity of hidden states.

    Args:
        matrix: (S, S) cosine similarities between step outputs.
        labels: S step labels, e.g. "s3·L12".
        metric: "cosine" shows the cosines, on [0, 1] when none is negative
            and [-1, 1] otherwise; "angular" shows arccos(cos)/pi on [0, 1]
            (0 = same direction).
    """
    if metric not in ("cosine", "angular"):
        raise ValueError(f"metric must be 'cosine' or 'angular', got {metric!r}")
    m = np.asarray(matrix, dtype=float)
    S = len(labels)
    if m.size == 0 and S == 0:
        return empty_figure("No steps to compare")
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix must be square (S, S), got shape {m.shape}")
    _check_len("labels", labels, m.shape[0], "matrix")

    if metric == "angular":
        z = np.arccos(np.clip(m, -1.0, 1.0)) / np.pi
        zmin, zmax, scale, name = 0.0, 1.0, "Viridis_r", "angular distance"
    elif np.nanmin(m) >= 0:
        z, zmin, zmax, scale, name = m, 0.0, 1.0, "Viridis", "cosine"
    else:
        z, zmin, zmax, scale, name = m, -1.0, 1.0, "RdBu_r", "cosine"
    # Category axes named by the (made unique) labels let the hover show them
    # without an (S, S) text matrix, which would be ~0.9 MB of JSON at S=160.
    lab = _unique([str(x) for x in labels])
    fig = go.Figure(go.Heatmap(
        # float32 halves the payload and is ample precision for colours.
        z=z.astype(np.float32), x=lab, y=lab, colorscale=scale, zmin=zmin, zmax=zmax,
        colorbar=dict(COLORBAR, title=dict(text=name)),
        hovertemplate=f"%{{y}} vs %{{x}}<br>{name} = %{{z:.3f}}<extra></extra>",
    ))
    stride = max(1, math.ceil(S / MAX_TICKS))
    ticks = dict(type="category", tickmode="array", tickvals=lab[::stride], ticktext=lab[::stride])
    fig.update_xaxes(**ticks, showgrid=False, constrain="domain")
    # Row 0 at the top, as in a matrix; square cells.
    fig.update_yaxes(**ticks, showgrid=False, autorange="reversed", scaleanchor="x", constrain="domain")
    if title is None:
        title = ("Angular distance" if metric == "angular" else "Similarity") + " between steps"
    return _style(fig, title=title, height=450, xaxis_title="step", yaxis_title="step")


def block_influence_bar(
    values,
    labels: Sequence[str],
    ops: Sequence[str],
    *,
    title: str | None = None,
    secondary=None,
    secondary_name: str = "mean over tokens",
) -> go.Figure:
    """Block influence BI = 1 - cos(h_in, h_out) per step, bars coloured by op.

    Args:
        values: (S,) BI per step (e.g. at the last token).
        labels: S step labels.
        ops: S ops, "keep" or "repeat" ("loop" is read as "repeat").
        secondary: optional (S,) second series drawn as a line, e.g. the mean
            over tokens, named ``secondary_name``.
    """
    v = np.asarray(values, dtype=float).reshape(-1)
    S = len(v)
    _check_len("labels", labels, S, "values")
    _check_len("ops", ops, S, "values")
    if secondary is not None:
        secondary = np.asarray(secondary, dtype=float).reshape(-1)
        _check_len("secondary", secondary, S, "values")
    if S == 0:
        return empty_figure("No steps to show")
    ops = ["repeat" if o == "loop" else o for o in ops]
    unknown = sorted(set(ops) - set(OP_COLORS))
    if unknown:
        raise ValueError(f"ops has unknown values {unknown}; expected one of {sorted(OP_COLORS)}")

    lab = [str(x) for x in labels]
    fig = go.Figure()
    for op in OP_COLORS:
        idx = [k for k in range(S) if ops[k] == op]
        if not idx:
            continue
        fig.add_trace(go.Bar(
            x=idx, y=v[idx], name=OP_NAMES[op], marker_color=OP_COLORS[op],
            customdata=[lab[k] for k in idx],
            hovertemplate="%{customdata}<br>BI = %{y:.4f}<extra>" + OP_NAMES[op] + "</extra>",
        ))
    if secondary is not None:
        fig.add_trace(go.Scatter(
            x=list(range(S)), y=secondary, name=secondary_name, mode="lines+markers",
            line=dict(color="#333333", width=1.5), marker=dict(size=4), customdata=lab,
            hovertemplate="%{customdata}<br>%{y:.4f}<extra>" + html.escape(secondary_name) + "</extra>",
        ))
    fig.update_xaxes(**_step_ticks(lab), range=[-0.6, S - 0.4])
    fig.update_layout(bargap=0.15)
    return _style(fig, title=title or "Block influence per step", height=340,
                  xaxis_title="step", yaxis_title="block influence")


def _check_lens(labels: Sequence[str], top_tokens: Sequence[Sequence[str]], probs: np.ndarray) -> None:
    S = len(labels)
    _check_len("top_tokens", top_tokens, S, "labels")
    if probs.ndim != 2 or probs.shape[0] != S:
        raise ValueError(f"top_probs must have shape (S, k) = ({S}, k), got {probs.shape}")
    for s, row in enumerate(top_tokens):
        if len(row) != probs.shape[1]:
            raise ValueError(f"top_tokens[{s}] has {len(row)} tokens, expected k={probs.shape[1]} (top_probs columns)")


def _outline_cells(fig: go.Figure, top_tokens: Sequence[Sequence[str]], token: str) -> int:
    """A red box around every cell holding `token` (surrounding whitespace ignored); how many."""
    want, boxes = token.strip(), 0
    for s, row in enumerate(top_tokens):
        for r, t in enumerate(row):
            if t.strip() == want:
                fig.add_shape(type="rect", x0=r + 0.5, x1=r + 1.5, y0=s - 0.5, y1=s + 0.5,
                              line=dict(color=HIGHLIGHT_COLOR, width=2.5), layer="above")
                boxes += 1
    return boxes


def logit_lens_grid(
    labels: Sequence[str],
    top_tokens: Sequence[Sequence[str]],
    top_probs,
    *,
    highlight_token: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """Logit lens: each step's top-k next tokens, steps as rows, rank as columns.

    The first step is the bottom row and the last at the top, matching the
    layer grid where depth grows upwards. Cells are coloured by probability on
    a fixed [0, 1] scale so steps compare honestly; cells whose token equals
    ``highlight_token`` (ignoring surrounding whitespace) get a red outline.
    Every cell shows its token (cut to 12 characters; whole in the hover) at
    any depth: the figure grows LENS_ROW_PX per step (4 × 30 layers = 120
    steps make a tall figure that the page scrolls), and every row is labelled.

    Args:
        labels: S step labels.
        top_tokens: S rows of k decoded tokens, best first.
        top_probs: (S, k) their probabilities.
    """
    probs = np.asarray(top_probs, dtype=float)
    S = len(labels)
    if S == 0:
        return empty_figure("No steps to show")
    _check_lens(labels, top_tokens, probs)
    lab = [str(x) for x in labels]
    # Cells hold a shortened token so long ones do not spill into neighbours.
    text = [[_plot_text(t, max_len=12) for t in row] for row in top_tokens]
    hover = [[f"{lab[s]}, rank {r + 1}: {_plot_text(t)}" for r, t in enumerate(row)] for s, row in enumerate(top_tokens)]
    fig = go.Figure(go.Heatmap(
        z=probs, x=list(range(1, probs.shape[1] + 1)), y=list(range(S)), text=text, customdata=hover,
        # Light to mid blue, so the dark token text stays readable on the most probable cells too.
        texttemplate="%{text}", textfont=dict(size=11, color="#1a1a1a"), zmin=0, zmax=1, xgap=1, ygap=1,
        colorscale=[[0, "#F7FBFF"], [1, "#6BAED6"]],
        colorbar=dict(COLORBAR, title=dict(text="p")),
        hovertemplate="%{customdata}<br>p = %{z:.3f}<extra></extra>",
    ))
    outlined = bool(highlight_token and highlight_token.strip()) and _outline_cells(fig, top_tokens, highlight_token)
    fig.update_xaxes(dtick=1, showgrid=False, side="top")
    fig.update_yaxes(**_step_ticks(lab, max_ticks=S), showgrid=False)
    if title is None:
        title = "Logit lens"
        if highlight_token and highlight_token.strip():
            title += f" · “{_plot_text(highlight_token.strip())}” " + ("outlined" if outlined else "not in any top 5")
    return _style(fig, title=title, height=max(300, 130 + LENS_ROW_PX * S),
                  xaxis_title="rank", yaxis_title="step (first at bottom)")


def _series_color(name: str, i: int) -> tuple[str, str]:
    """(colour, dash) for a named series: the full program is grey and dotted."""
    low = name.lower()
    if low.startswith("full") or low.startswith("baseline"):
        return BASELINE_COLOR, "dot"
    return PALETTE[i % len(PALETTE)], "solid"


def answer_probability_curve(
    series: Mapping[str, tuple[Sequence[str], Sequence[float]]],
    *,
    token: str,
    title: str | None = None,
    log: bool = False,
    quantity: str = "probability",
) -> go.Figure:
    """Probability (or rank) of the answer's first token after each step.

    Args:
        series: name -> (step labels, values); one line each, lengths may
            differ between series. Names starting with "full"/"baseline" are
            drawn grey and dotted, the others in blue, green, ...
        token: the answer token, shown in the title and hover.
        log: log-scale y axis.
        quantity: "probability" (y on [0, 1]) or "rank" (1 = top, drawn at
            the top of the axis).
    """
    if quantity not in ("probability", "rank"):
        raise ValueError(f"quantity must be 'probability' or 'rank', got {quantity!r}")
    if not series or all(len(v) == 0 for _, v in series.values()):
        return empty_figure("No answer-token curve to show")
    tok = _plot_text(token)
    fig = go.Figure()
    other = 0
    for name, (labels, values) in series.items():
        _check_len(f"series[{name!r}] values", values, len(labels), f"series[{name!r}] labels")
        color, dash = _series_color(name, other)
        other += dash == "solid"
        fig.add_trace(go.Scatter(
            x=list(range(len(values))), y=np.asarray(values, dtype=float), name=name,
            mode="lines+markers", line=dict(color=color, dash=dash, width=2), marker=dict(size=5),
            customdata=[str(x) for x in labels],
            hovertemplate="%{customdata}<br>" + quantity + " = %{y:.4g}<extra>" + html.escape(name) + "</extra>",
        ))
    if log:
        fig.update_yaxes(type="log")
    elif quantity == "probability":
        fig.update_yaxes(range=[0, 1.02])
    if quantity == "rank":
        fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(dtick=_int_dtick(max(len(v) for _, v in series.values())))
    return _style(fig, title=title or f"{quantity.capitalize()} of “{tok}” by step",
                  height=340, xaxis_title="step", yaxis_title=quantity + (" (log)" if log else ""))


def alignment_curve(labels: Sequence[str], cos_to_baseline, cos_to_final, *, title: str | None = None) -> go.Figure:
    """How the edited trajectory lines up with the full program.

    Args:
        labels: S step labels of the edited program.
        cos_to_baseline: (S,) cosine to the full program's state after the
            same layer (NaN where there is none: the line shows a gap).
        cos_to_final: (S,) cosine to the full program's final state.
    """
    a = np.asarray(cos_to_baseline, dtype=float).reshape(-1)
    b = np.asarray(cos_to_final, dtype=float).reshape(-1)
    S = len(labels)
    _check_len("cos_to_baseline", a, S, "labels")
    _check_len("cos_to_final", b, S, "labels")
    if S == 0:
        return empty_figure("No steps to show")
    lab = [str(x) for x in labels]
    fig = go.Figure()
    for y, name, color, dash in (
        (a, "vs full program, same layer", EDITED_COLOR, "solid"),
        (b, "vs full program, final state", PALETTE[2], "dash"),
    ):
        fig.add_trace(go.Scatter(
            x=list(range(S)), y=y, name=name, mode="lines+markers", customdata=lab,
            line=dict(color=color, dash=dash, width=2), marker=dict(size=5),
            hovertemplate="%{customdata}<br>cos = %{y:.3f}<extra>" + name + "</extra>",
        ))
    fig.update_xaxes(**_step_ticks(lab))
    return _style(fig, title=title or "Alignment with the full program", height=340,
                  xaxis_title="step", yaxis_title="cosine similarity")


def _point_name(p: Mapping) -> str:
    name = str(p["method"])
    return name + " (oracle)" if p.get("oracle") and "oracle" not in name.lower() else name


def _point_labels(points: Sequence[Mapping]) -> list[tuple[str, str]]:
    """(text, position) per point: points at the same spot share one label
    (their names one under another) on the first of them, so labels never
    pile up; labels of neighbouring spots alternate above and below."""
    spot = [(round(float(p["layer_calls"]), 1), round(100 * float(p["accuracy"]), 1)) for p in points]
    names: dict[tuple, list[str]] = {}
    for key, p in zip(spot, points):
        names.setdefault(key, []).append(html.escape(_point_name(p)))
    order = {key: i for i, key in enumerate(sorted(names))}
    out, labelled = [], set()
    for key in spot:
        text = "" if key in labelled else "<br>".join(names[key])
        labelled.add(key)
        out.append((text, "top center" if order[key] % 2 == 0 else "bottom center"))
    return out


def _oracle_connectors(fig: go.Figure, points: Sequence[Mapping], color: Mapping[str, str]) -> None:
    """Within a family, a dashed line from each deployable point to each oracle point."""
    for fam in color:
        members = [p for p in points if (p.get("family") or p["method"]) == fam]
        for o in (p for p in members if p.get("oracle")):
            for d in (p for p in members if not p.get("oracle")):
                fig.add_trace(go.Scatter(
                    x=[float(d["layer_calls"]), float(o["layer_calls"])],
                    y=[100 * float(d["accuracy"]), 100 * float(o["accuracy"])],
                    mode="lines", line=dict(color=color[fam], dash="dash", width=1),
                    showlegend=False, hoverinfo="skip",
                ))


def accuracy_vs_depth(points: Sequence[Mapping]) -> go.Figure:
    """Accuracy against average executed layers, one marker per method.

    Each point: {"method", "accuracy" (0-1), "layer_calls", "oracle", "family"}.
    Oracle methods (they need the ground truth, e.g. pass@k) are hollow and
    get "(oracle)" in their legend name; within a family, a dashed grey line
    joins each deployable point to its oracle, showing the gap honestly.
    Methods at the same spot share one label (``_point_labels``).
    Traces: the dashed connectors, then one scatter per point.
    """
    if not points:
        return empty_figure("No evaluation results yet")
    for i, p in enumerate(points):
        for key in ("method", "accuracy", "layer_calls"):
            if key not in p:
                raise ValueError(f"points[{i}] lacks {key!r}")
        if not 0.0 <= float(p["accuracy"]) <= 1.0:
            raise ValueError(f"points[{i}]['accuracy'] must be in [0, 1], got {p['accuracy']}")

    families = list(dict.fromkeys(p.get("family") or p["method"] for p in points))
    color = {f: PALETTE[i % len(PALETTE)] for i, f in enumerate(families)}
    fig = go.Figure()
    _oracle_connectors(fig, points, color)  # first, so the markers are drawn on top of them
    for p, (text, position) in zip(points, _point_labels(points)):
        oracle, name = bool(p.get("oracle", False)), _point_name(p)
        fig.add_trace(go.Scatter(
            x=[float(p["layer_calls"])], y=[100 * float(p["accuracy"])], name=name,
            mode="markers+text" if text else "markers", text=[text], textposition=position,
            # Open symbols are stroked with marker.color, so hollow = same colour, open symbol.
            marker=dict(size=11, color=color[p.get("family") or p["method"]],
                        symbol="circle-open" if oracle else "circle", line=dict(width=2 if oracle else 0)),
            hovertemplate=html.escape(name) + "<br>accuracy %{y:.1f}%<br>avg layers %{x:.2f}<extra></extra>",
        ))
    fig.update_yaxes(range=[-8, 112])  # room for labels above 100% and below 0%
    return _style(fig, title="Accuracy vs layer calls", height=440,
                  xaxis_title="average layer calls per token", yaxis_title="accuracy (%)")
