"""Thin handlers behind the page: parse what the user gave, call polar_core,
build figures. Plain functions with no Gradio inside, so tests drive them
without a browser; `app/ui.py` wires them to components.

Every bad input raises `InputError` with a message meant for the user; the UI
turns it into a visible warning and leaves the page as it was.
"""
from __future__ import annotations

import dataclasses
import functools
import html
import importlib.resources
import json
import logging
import math
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from app import figures
from app.escape import escape_md
from app.session import InputError, Session
from polar_core.engine.generate import PromptPassStopped, Stopping, Trace, generate
from polar_core.engine.inputs import PromptError
from polar_core.engine.models import DEFAULT_MODEL, MODEL_ALIASES, LoadedModel
from polar_core.limits import Deadline, LimitError, Limits, load_json
from polar_core.program import DEFAULT_MAX_STEPS_PER_LAYER, Program, ProgramError
from polar_core.study import tasks
from polar_core.study.analysis import Analysis, analyze, word_marks
from polar_core.study.checker import describe_rule
from polar_core.study.evaluate import evaluate_family as library_evaluate_family
from polar_core.study.find import find_programs
from polar_core.study.prompts import PromptStyle, has_chat_template, prompt_style, shown_answer
from polar_core.study.redundancy import gromov_program, shortgpt_program
from polar_core.study.router import CONFIG_FILE, default_router_path, load_router, route_batch
from polar_core.study.suggest import MAX_CANDIDATES, suggest_programs
from polar_core.study.tasks import FAMILIES

MAX_PROMPT_CHARS = 4000
MAX_EXPECTED_CHARS = 200
MAX_PROGRAM_CHARS = 2000
MAX_NEW_TOKENS = 32  # the app's answers; $POLAR_MAX_NEW_TOKENS may lower it
MAX_UPLOAD_BYTES = Limits().max_upload_bytes  # default; $POLAR_MAX_UPLOAD_BYTES overrides it
GRID_HEADERS = ["layer", "run", "times"]
PROGRAM_JSON_KEYS = {"path", "num_layers", "text", "model", "prompt", "format"}
ROUTER_ENV = "POLAR_ROUTER_DIR"  # the operator's router checkpoint folder; never a path from the page

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ inputs
# A lone surrogate is not text (the tokenizer raises TypeError on it) and a
# NUL byte is never meant: both are refused before any model work.
_NOT_TEXT = re.compile("[\ud800-\udfff\x00]")


def _check_chars(text: str, what: str) -> str:
    bad = _NOT_TEXT.search(text)
    if bad is not None:
        kind = "a NUL character" if bad.group() == "\x00" else "a lone surrogate (half of a UTF-16 pair)"
        raise InputError(f"{what} holds {kind} at position {bad.start()}: it is not text. Remove it and try again.")
    return text


def check_prompt(prompt) -> str:
    """The prompt, or InputError when it is empty, too long or not text."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("Type a prompt first (or pick an example).")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"The prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}.")
    return _check_chars(prompt, "The prompt")


def check_expected(expected) -> str:
    """The expected answer ('' when none), or InputError when it cannot be one."""
    if expected is None:
        return ""
    if not isinstance(expected, str):
        raise InputError("The expected answer must be text.")
    expected = expected.strip()
    if len(expected) > MAX_EXPECTED_CHARS:
        raise InputError(f"The expected answer has {len(expected)} characters; the limit is {MAX_EXPECTED_CHARS}.")
    if "\n" in expected:
        raise InputError("The expected answer must be one line.")
    return _check_chars(expected, "The expected answer")


def parse_program(text, num_layers: int) -> Program:
    """Read the text form; every ProgramError becomes an InputError."""
    if not isinstance(text, str):
        raise InputError("The program must be text such as '0-11, 12-15x2, 16-29'.")
    if len(text) > MAX_PROGRAM_CHARS:
        raise InputError(f"The program text has {len(text)} characters; the limit is {MAX_PROGRAM_CHARS}.")
    _check_chars(text, "The program text")
    try:
        return Program.parse(text, num_layers, max_steps=Limits.from_env().max_steps(num_layers))
    except ProgramError as exc:
        raise InputError(f"Program: {exc}") from None


# -------------------------------------------------------------- the grid
def is_per_layer(program: Program) -> bool:
    """Whether the grid can express the program: layers in order, each run
    0..max times back to back (no block loops, no reordering)."""
    path = program.path
    return all(a <= b for a, b in zip(path, path[1:])) and max(program.layer_counts()) <= DEFAULT_MAX_STEPS_PER_LAYER


def grid_rows(program: Program) -> tuple[list[list], str]:
    """Rows [layer, run, times] for the layer grid, and a note about them.

    No op column: the piano roll beside the grid shows each layer's op, and a
    column the server rewrites after every tick would re-render the grid
    under the user's next click.
    """
    counts = program.layer_counts()
    rows = [[i, n > 0, max(n, 1)] for i, n in enumerate(counts)]
    if is_per_layer(program):
        note = "Untick **run** to skip a layer; set **times** to 2–4 to loop it in place."
    else:
        note = ("⚠️ This program loops a block of layers or changes their order, which a per-layer grid "
                "cannot express: **times** shows how often each layer runs. Edit the text form, or edit "
                "the grid to replace it with a per-layer program.")
    return rows, note


def _cell_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "x", "✓")
    return bool(value) and not (isinstance(value, float) and math.isnan(value))


def _cell_int(value, layer: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"Layer {layer}: 'times' must be a whole number 1–{DEFAULT_MAX_STEPS_PER_LAYER}, got {str(value)[:20]!r}.") from None
    if not number.is_integer() or not 1 <= number <= DEFAULT_MAX_STEPS_PER_LAYER:
        raise InputError(f"Layer {layer}: 'times' must be a whole number 1–{DEFAULT_MAX_STEPS_PER_LAYER}, got {value}.")
    return int(number)


def program_from_grid(rows, num_layers: int) -> Program:
    """The per-layer program a grid describes (rows in layer order)."""
    rows = table_rows(rows)
    if len(rows) != num_layers:
        raise InputError(f"The grid has {len(rows)} rows; the model has {num_layers} layers.")
    path: list[int] = []
    for layer, row in enumerate(rows):
        if len(row) < len(GRID_HEADERS):
            raise InputError(f"Grid row {layer} is incomplete.")
        if _cell_bool(row[1]):
            path.extend([layer] * _cell_int(row[2], layer))
    if not path:
        raise InputError("Every layer is skipped: keep at least one.")
    return Program(tuple(path), num_layers)


def table_rows(value) -> list[list]:
    """A Dataframe value (list of lists, pandas frame, or {'data': ...}) as rows."""
    if hasattr(value, "values") and hasattr(value, "columns"):  # pandas
        return value.values.tolist()
    if isinstance(value, Mapping):
        value = value.get("data", [])
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise InputError("The grid value is not a table.")
    return [list(r) for r in value]


@dataclass
class EditorView:
    """The three synchronised views of one program."""

    program: Program
    text: str
    rows: list[list]
    note: str
    roll: go.Figure  # the piano roll


def editor_view(program: Program) -> EditorView:
    """The text form, grid rows, note (the program as read, then how to edit it) and piano roll."""
    rows, note = grid_rows(program)
    note = f"Program `{program.format()}` · {program.layer_calls} layer calls/token. {note}"
    full = tuple(range(program.num_layers))
    roll = figures.program_grid(program.path, program.num_layers, baseline_path=None if program.is_full else full)
    return EditorView(program, program.format(), rows, note, roll)


# ---------------------------------------------------------------- presets
PRESETS = {
    "full": "Full program (all layers once)",
    "shortgpt": "ShortGPT: drop the n most redundant layers",
    "gromov": "Gromov: drop the most redundant block of n layers",
    "early_exit": "Early exit after k layers",
    "skip": "Skip block a–b",
    "loop": "Loop block a–b × r",
}


# The number fields each preset reads (the page shows only these), with their labels.
PRESET_FIELDS = {
    "full": {},
    "shortgpt": {"n": "n: layers to drop"},
    "gromov": {"n": "n: block length"},
    "early_exit": {"n": "k: layers to keep"},
    "skip": {"a": "a: first layer", "b": "b: last layer"},
    "loop": {"a": "a: first layer", "b": "b: last layer", "r": "r: times"},
}


def _whole(value, name: str, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number, got {str(value)[:20]!r}.") from None
    if not number.is_integer() or not low <= number <= high:
        raise InputError(f"{name} must be a whole number from {low} to {high}, got {value}.")
    return int(number)


def preset_program(lm: LoadedModel, preset: str, n=4, a=0, b=0, r=2) -> Program:
    """One of the PRESETS, with its numbers checked against the model depth."""
    D = lm.num_layers
    if not isinstance(preset, str) or preset not in PRESETS:
        raise InputError(f"Unknown preset {str(preset)[:30]!r}; choose one of {', '.join(PRESETS)}.")
    if preset == "full":
        return Program.full(D)
    if preset == "early_exit":
        return Program.early_exit(D, _whole(n, "k", 1, D) - 1)
    if preset in ("shortgpt", "gromov"):
        return _redundancy_preset(lm, preset, _whole(n, "n", 1, D - 1))
    first, last = _whole(a, "a", 0, D - 1), _whole(b, "b", 0, D - 1)
    if first > last:
        raise InputError(f"Block {first}–{last} is backwards: a must be ≤ b.")
    try:
        if preset == "skip":
            if last - first + 1 >= D:
                raise InputError("Skipping every layer leaves nothing to run.")
            return Program.skip(D, first, last)
        return Program.loop(D, first, last, _whole(r, "r", 1, DEFAULT_MAX_STEPS_PER_LAYER))
    except ProgramError as exc:
        raise InputError(str(exc)) from None


def _redundancy_preset(lm: LoadedModel, preset: str, n: int) -> Program:
    """ShortGPT / Gromov programs from the library's redundancy scores."""
    make = shortgpt_program if preset == "shortgpt" else gromov_program
    try:
        return make(lm, n)
    except (ValueError, FileNotFoundError) as exc:
        raise InputError(f"{PRESETS[preset]}: {exc}") from None


# ---------------------------------------------------------------- predict
@dataclass
class Prediction:
    """Ranked programs: the router's (when one is loaded), then training-free
    suggestions verified to keep the full program's answer."""

    programs: list[Program]
    rows: list[list]  # [rank, program text, layers/token, score, source] (PREDICT_COLUMNS)
    message: str
    sources: list[str] = field(default_factory=list)  # per program: ROUTER_SOURCE or SUGGESTED_SOURCE


PREDICT_COLUMNS = ["rank", "program", "layers", "score", "source"]
ROUTER_SOURCE = "router"
GATED_SOURCE = "full program: the prompt is unlike the router's training prompts"
SUGGESTED_SOURCE = "suggested, verified to keep the full answer"
PAGE_SUGGESTIONS = 3  # suggestions shown on the page
PAGE_CANDIDATES = MAX_CANDIDATES  # verified in one teacher-forced pass: as many as the evaluation verifies


def router_folder(lm: LoadedModel) -> Path | None:
    """$POLAR_ROUTER_DIR when set; else the router shipped for this model, or None when none ships."""
    override = os.environ.get(ROUTER_ENV, "").strip()
    if override:
        return Path(override).resolve()
    folder = default_router_path(lm.name)
    return folder if (folder / CONFIG_FILE).is_file() else None


def load_router_for(lm: LoadedModel):
    """(router, "") or (None, why no router is loaded).

    A corrupted checkpoint, or one made for another model, is reported rather
    than raised: the page runs on without a router (presets, search and runs
    need none). The server log gets the full error.
    """
    folder = router_folder(lm)
    if folder is None:
        return None, "none ships for it"
    try:
        return load_router(folder, lm), ""
    # RouterError for what the checks catch; anything else (a failed
    # allocation, a torch error) must not stop the app either.
    except Exception as exc:  # noqa: BLE001
        log.warning("router checkpoint %s not loaded: %s", folder, exc)
        # The page names the problem, not where the server keeps its files.
        why = str(exc).replace(str(folder), folder.name)[:300]
        return None, f"its router checkpoint cannot be used: {why}"


def predict(lm: LoadedModel, prompt, k: int = 5, suggestions: int = PAGE_SUGGESTIONS) -> Prediction:
    """The router's top-k programs for this prompt, best first, then up to
    `suggestions` training-free ones (polar_core.study.suggest), cheapest
    first, each verified to keep the full program's answer. Without a router
    the suggestions alone."""
    prompt = check_prompt(prompt)
    router, why = load_router_for(lm)
    routed = route_batch(lm, router, [prompt], k=k)[0] if router is not None else None
    ranked = routed.gated if routed is not None else []
    found = suggest_programs(lm, prompt, k=suggestions, max_candidates=PAGE_CANDIDATES) if suggestions else None
    gated = routed is not None and not routed.familiar
    entries = [(p, float(s), GATED_SOURCE if gated and i == 0 else ROUTER_SOURCE) for i, (p, s) in enumerate(ranked)]
    entries += [(s.program, s.margin, SUGGESTED_SOURCE) for s in (found.suggestions if found else [])]
    rows = [[i + 1, p.format(), p.layer_calls, round(score, 4), source] for i, (p, score, source) in enumerate(entries)]
    kept = (f" Suggested programs (score: their teacher-forced margin) keep the full program's first "
            f"{len(found.answer_ids)} answer tokens; finding them ran the full program.") if found and found.suggestions else ""
    if router is None:
        message = f"No router loaded for this model ({why})." + (kept or " No shorter program kept the full answer: "
                                                                   "try a preset, or search for programs.")
    else:
        message = (f"Router top-{len(ranked)}: click a row to load it. Top-1 is what a deployment would run. "
                   "**Score**: the router's log-probability of the program (≤ 0; higher = more confident)." + kept)
        if gated:
            message = (f"This prompt is unlike the prompts the router was trained on (similarity "
                       f"{routed.familiarity:.3f} to the nearest, below its threshold {routed.threshold:.3f}), so "
                       "top-1 is the full program: the router promises no skip here. Its own picks follow. "
                       + message)
    return Prediction([p for p, _, _ in entries], rows, message, [src for _, _, src in entries])


# -------------------------------------------------------------------- run
@dataclass(frozen=True)
class Stamp:
    """What a result was computed from. Every result the page shows carries
    one, and the page draws a result only while its editor still holds the
    stamp's program (app/ui.py)."""

    prompt: str
    program: str  # canonical text form
    model: str
    expected: str = ""
    rule: str = "exact"  # how answers were checked (polar_core.study.checker)

    def markdown(self, verb: str = "Ran") -> str:
        """One line naming the prompt (its end, where a few-shot prompt asks), program, model, expected answer."""
        prompt = " ".join(self.prompt.split())
        prompt = prompt if len(prompt) <= 80 else "…" + prompt[-79:]
        program = f" · program `{self.program}`" if self.program else ""
        expected = f" · expected “{escape_md(self.expected)}”" if self.expected else ""
        return f"{verb} prompt “{escape_md(prompt)}”{program} · model **{escape_md(self.model)}**{expected}"


@dataclass
class Answer:
    """One program's answer, its changed words marked, and its cost."""

    text: str  # as shown: decoded whole (emoji and numbers intact), cut at the stop string
    spans: list[tuple[str, str | None]]  # (text, "changed" | "differs" | None) for gr.HighlightedText
    correct: bool | None
    steps: int
    seconds: float
    tokens: int
    program: str = ""  # text form


@dataclass
class RunView:
    """Everything the page shows after a run."""

    full: Answer
    edited: Answer
    summary: str  # markdown: executed layers, compute saved, timings, the stamp
    stamp: Stamp
    rule_text: str = ""  # 'contains “Paris”' when an expected answer was given
    figures: dict = field(default_factory=dict)  # name -> go.Figure
    same_answer: bool = True
    analysis: Analysis | None = None
    trace: Trace | None = None  # of the edited program


def answer_heading(title: str, answer: Answer, rule_text: str = "") -> str:
    """Markdown above an answer: which program, its cost, and its mark with the rule beside it."""
    mark = ""
    if answer.correct is not None:
        mark = (" · ✓ right" if answer.correct else " · ✗ wrong") + (f" — {escape_md(rule_text)}" if rule_text else "")
    return f"{title} `{answer.program}` · {answer.steps} layer calls/token{mark}"


def word_spans(runs: Sequence[tuple[str, bool]], label: str = "changed") -> list[tuple[str, str | None]]:
    """polar_core.study.analysis.word_marks runs as gr.HighlightedText spans."""
    spans = [(text, label if changed else None) for text, changed in runs]
    return spans or [("(empty answer)", None)]


class Superseded(Exception):
    """A newer run of the same session started; this one's outputs are stale."""


def _text_so_far(lm: LoadedModel, style: PromptStyle, on_text):
    """An executor on_tokens callback passing the answer so far, as the page shows it, to on_text."""
    if on_text is None:
        return None

    def on_tokens(rows):
        on_text(shown_answer(lm.tokenizer.decode(rows[0], skip_special_tokens=True), style))
    return on_tokens


def _generate(lm: LoadedModel, prompt: str, program: Program, drafts=(), should_stop=None, on_text=None) -> Trace:
    style = prompt_style(lm, prompt)
    limits = Limits.from_env()
    # The time limit also bounds the work of a request whose client went
    # away: Gradio cannot interrupt a handler that is already running.
    stopping = Stopping(strings=style.stop_strings, time_limit_s=limits.request_seconds, should_stop=should_stop)
    try:
        trace = generate(lm, [style.text(prompt)], program, max_new_tokens=min(MAX_NEW_TOKENS, limits.max_new_tokens),
                         stopping=stopping, chat=style.chat, capture="last",
                         max_prompt_tokens=limits.max_prompt_tokens, drafts=drafts,
                         on_tokens=_text_so_far(lm, style, on_text))[0]
    except (PromptError, ProgramError) as exc:
        raise InputError(str(exc)) from None
    except PromptPassStopped as exc:
        if exc.reason == "cancelled":
            raise Superseded from None
        raise InputError(f"Program {program.format()}: {exc}: try a shorter prompt or a program with fewer "
                         "layer calls.") from None
    if trace.finish_reason == "cancelled":
        raise Superseded
    return trace


def check_prompt_pass_fits(base: Trace, program: Program, limit_s: float) -> None:
    """Refuse up front a program whose prompt pass cannot finish in the time limit.

    The full program's prompt pass was just timed on this prompt; the
    edited one costs about as much per layer call, so a looped program on a
    long prompt is refused before it holds a model slot until the limit
    (the prompt pass would stop there anyway, PromptPassStopped).
    """
    estimate = base.prefill_seconds * program.layer_calls / max(1, base.program.layer_calls)
    if estimate > limit_s:
        raise InputError(f"Program {program.format()}: its prompt pass ({len(base.prompt_ids)} tokens x "
                         f"{program.layer_calls} layer calls) would take about {estimate:.0f} s, more than the "
                         f"time limit of {limit_s:g} s: try a shorter prompt or a program with fewer layer calls.")


def baseline_trace(lm: LoadedModel, session: Session, prompt: str, should_stop=None, on_text=None):
    """The full program's trace of this prompt, from the session when already run."""
    key = (lm.name, str(lm.device), prompt)
    trace = session.cached_baseline(key)
    if trace is None:
        trace = _generate(lm, prompt, Program.full(lm.num_layers), should_stop=should_stop, on_text=on_text)
        session.remember_baseline(key, trace)
    return trace


def run(lm: LoadedModel, session: Session, prompt, program_text, expected="", should_stop=None,
        on_partial=None, exact: bool = False) -> RunView:
    """Answer the prompt under the edited program and the full one; build every figure.

    `should_stop` (polled between tokens) turning true raises Superseded; a
    cut-short baseline is never remembered. `on_partial(which, text)` gets the
    answers as they grow: which is "full" or "edited". Answers are checked
    with the prompt's rule (few-shot: exact; free text: contains the
    expected answer, or exact when `exact`).
    """
    def on_text(which: str):
        return None if on_partial is None else functools.partial(on_partial, which)

    prompt, expected = check_prompt(prompt), check_expected(expected)
    program = parse_program(program_text, lm.num_layers)
    style = prompt_style(lm, prompt)
    rule = style.answer_rule(exact)
    base = baseline_trace(lm, session, prompt, should_stop, on_text("full"))
    # Edited answers often run like the full one, or like the previous edit's,
    # for a while: checking those as drafts, several tokens per pass, decodes
    # such stretches fast (and changes no answer).
    drafts = [base.token_ids, session.last_edit_tokens]
    if not program.is_full:
        check_prompt_pass_fits(base, program, Limits.from_env().request_seconds)
    trace = base if program.is_full else _generate(lm, prompt, program, drafts, should_stop, on_text("edited"))
    if not program.is_full:
        session.last_edit_tokens = list(trace.token_ids)
    result = analyze(lm, trace, base, expected=expected or None, k=5, rule=rule)
    full_text, edited_text = shown_answer(base.text, style), shown_answer(trace.text, style)
    full_runs, edited_runs = word_marks(full_text, edited_text)
    full = Answer(full_text, word_spans(full_runs, "differs"), result.baseline_expected_met, base.program.layer_calls,
                  base.total_seconds, len(base.token_ids), base.program.format())
    edited = Answer(edited_text, word_spans(edited_runs), result.expected_met, program.layer_calls,
                    trace.total_seconds, len(trace.token_ids), program.format())
    stamp = Stamp(prompt, program.format(), lm.name, expected, rule)
    view = RunView(full, edited, run_summary(base, trace) + "  \n" + stamp.markdown(), stamp,
                   describe_rule(rule, expected) if expected else "", same_answer=result.same_answer,
                   analysis=result, trace=trace)
    view.figures = analysis_figures(result)
    return view


def run_summary(base, trace) -> str:
    """Markdown: executed layers, compute saved, timings of both programs."""
    program = trace.program
    saved = 1 - program.compute_fraction
    cost = f"**{saved:.0%} compute saved**" if saved >= 0 else f"**{-saved:.0%} more compute**"
    return (
        f"Edited program: **{program.layer_calls}** layer calls per token of {program.num_layers} "
        f"({len(program.skipped_layers())} skipped) · {cost} · {_timing(trace)} · "
        f"full program: {_timing(base)}"
    )


def _timing(trace) -> str:
    cut = " (cut at the time limit)" if trace.finish_reason == "time" else ""
    return (f"prefill {1000 * trace.prefill_seconds:.0f} ms + {len(trace.token_ids)} tokens in "
            f"{1000 * trace.decode_seconds:.0f} ms{cut}")


# ------------------------------------------------------------- data out
def step_table(a: Analysis) -> pd.DataFrame:
    """A run's per-step data, one row per step of the edited program: where it
    runs, block influence, alignment, the lens (top-k tokens with
    probabilities, the answer token's probability and rank), and the step's
    row of the similarity matrix (columns "similarity_to_<label>", "emb" =
    the embeddings). The CSV download; Analysis.step_frame plus similarities."""
    sim = a.similarity_frame().iloc[1:]  # the embeddings' own row is its column here
    sim.columns = [f"similarity_to_{c}" for c in sim.columns]
    return pd.concat([a.step_frame(), sim.reset_index(drop=True)], axis=1)


def run_record(view: RunView) -> dict:
    """Everything a run computed, JSON-ready: its stamp, both answers and marks,
    costs, and the data behind every chart (the page's "Raw numbers" and the
    JSON download)."""
    a, full, edited = view.analysis, view.full, view.edited
    base = a.baseline_lens
    return {
        "stamp": dataclasses.asdict(view.stamp), "rule": view.rule_text,
        "full_answer": full.text, "edited_answer": edited.text, "same_answer": view.same_answer,
        "full_layers": full.steps, "edited_layers": edited.steps,
        "full_correct": full.correct, "edited_correct": edited.correct,
        "compute_saved": round(1 - edited.steps / full.steps, 4),
        "edited_seconds": round(edited.seconds, 3), "full_seconds": round(full.seconds, 3),
        "data": {
            "steps": json.loads(step_table(a).to_json(orient="records", double_precision=6)),
            "similarity": {"labels": a.similarity_labels, "matrix": a.similarity.numpy().round(6).tolist()},
            "full_program": {
                "labels": a.baseline_labels, "top_tokens": base.top_tokens,
                "top_probs": base.top_probs.numpy().round(6).tolist(),
                **{f"{name}_token_prob": t.prob.numpy().round(6).tolist() for name, t in base.tracks.items()},
            },
        },
    }


# --------------------------------------------------------------- analysis
def analysis_figures(a: Analysis) -> dict:
    """The analysis figures of one run from its polar_core.study.analysis.Analysis.

    The piano roll is not among them: the editor draws it on every edit already.
    """
    track = a.lens.tracks.get("expected") or a.lens.tracks.get("answer")
    # The answer opened with a bare space token: the lens looks one token on (polar_core.study.analysis.lens_states).
    lens = figures.logit_lens_grid(
        a.labels, [[figures.display_token(t) for t in row] for row in a.lens.top_tokens], a.lens.top_probs.numpy(),
        highlight_token=figures.display_token(track.token) if track else None)
    if a.lens_offset:
        lens.update_layout(title_text=lens.layout.title.text.replace("Logit lens", "Lens, 2nd token", 1))
    figs = {
        "similarity": figures.similarity_heatmap(a.similarity.numpy(), a.similarity_labels),
        "logit_lens": lens,
        "block_influence": figures.block_influence_bar(a.block_influence.numpy(), a.labels, a.ops),
        "alignment": figures.alignment_curve(a.labels, a.cos_to_baseline.numpy(), a.cos_to_final.numpy()),
    }
    if track is None:
        figs["answer_probability"] = figures.empty_figure("No answer token to follow: give an expected answer")
    else:
        series = a.answer_probability_series(track.name)
        second = a.lens_offset or a.baseline_lens_offset
        figs["answer_probability"] = figures.answer_probability_curve(
            series, token=track.token,
            title=f"“{html.escape(figures.display_token(track.token))}” as 2nd token, by step" if second else None)
    return figs


# ------------------------------------------------------------- URL state
URL_KEYS = ("prompt", "program", "expected", "model")
_URL_LIMITS = {"prompt": MAX_PROMPT_CHARS, "program": MAX_PROGRAM_CHARS, "expected": MAX_EXPECTED_CHARS, "model": 200}


def encode_url_state(prompt: str = "", program: str = "", expected: str = "", model: str = "") -> str:
    """Query string ("?prompt=...&program=...") that reproduces a view; empty fields left out."""
    values = {"prompt": prompt, "program": program, "expected": expected, "model": model}
    pairs = [(k, v) for k, v in values.items() if v]
    return "?" + urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote) if pairs else ""


def decode_url_state(params: Mapping[str, str] | str) -> dict[str, str]:
    """The known fields of a query string or mapping, each cut to its limit; unknown keys ignored.

    Values are only text: they are validated like typed input when used.
    """
    if isinstance(params, str):
        params = dict(urllib.parse.parse_qsl(params.lstrip("?"), keep_blank_values=True))
    return {k: str(params[k])[: _URL_LIMITS[k]] for k in URL_KEYS if params.get(k)}


# ------------------------------------------------------------ JSON files
def program_json(program_text, num_layers: int, model: str = "", prompt: str = "") -> str:
    """The JSON file offered for download: Program.to_dict plus the model and prompt."""
    program = parse_program(program_text, num_layers)
    data = program.to_dict()
    data.update({k: v for k, v in (("model", model), ("prompt", prompt)) if v})
    return json.dumps(data, indent=2, ensure_ascii=False)


def program_from_upload(data, num_layers: int) -> Program:
    """A program from uploaded JSON bytes: size-limited, schema-checked, validated."""
    if isinstance(data, str):  # raw JSON text from an API client
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray)):
        raise InputError("Upload a program as a .json file.")
    limits = Limits.from_env()
    try:
        limits.check_upload(data)
        obj = load_json(data, limits.max_upload_bytes)  # size, nesting and integers bounded before parsing
    except LimitError as exc:
        raise InputError(f"Program file: {exc}.") from None
    except ValueError as exc:  # not UTF-8, not JSON
        raise InputError(f"The file is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise InputError("A program file holds one JSON object with 'path' (or 'text') and 'num_layers'.")
    unknown = sorted(set(obj) - PROGRAM_JSON_KEYS)
    if unknown:
        raise InputError(f"Unknown keys in the program file: {', '.join(map(str, unknown))[:100]}.")
    try:
        program = Program.from_dict(obj, num_layers)
    except ProgramError as exc:
        raise InputError(f"Program file: {exc}") from None
    limit = limits.max_steps(num_layers)
    if program.layer_calls > limit:
        raise InputError(f"Program file: the program has {program.layer_calls} steps; the limit is {limit}.")
    return program


# --------------------------------------------------------------- examples
EXAMPLE_FAMILIES = ("capitals", "antonyms", "plurals", "add_1digit", "next_number", "word_problems")
FREE_TEXT_EXAMPLES = (
    ("free text: Name the largest planet", "Which planet is the largest in our solar system? Answer in one word.", "Jupiter"),
    ("free text: Explain a rainbow", "In one sentence, why do rainbows appear?", ""),
)


def example_prompts(per_family: int = 2) -> list[tuple[str, str, str]]:
    """(label, prompt, expected) examples: few-shot task items, then free text."""
    out = []
    for family in EXAMPLE_FAMILIES:
        for item in tasks.sample_items(family, per_family, "test"):
            out.append((f"{family}: {item.question}", tasks.build_prompt(item), item.answer))
    return out + list(FREE_TEXT_EXAMPLES)


def model_status(lm: LoadedModel) -> str:
    """Status line: name, family, layers, parameters, device, and how the CPU
    decodes: on the GGUF codes or not, with the lean C step or not (both chosen at load)."""
    info = lm.describe()
    params = info["parameters"]
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    codes = " · decoding on the GGUF codes" if lm.packing and lm.packing.packed else ""
    if lm.lean is not None and lm.lean.ready:
        codes += f" with the lean C step ({lm.lean.vectors})"
    elif lm.lean is not None and lm.lean.switched_off:
        codes += " · lean C step off (POLAR_LEAN=0): transformers' layers"
    line = (f"**{info['name']}** · {info['family']} · {info['layers']} layers · hidden {info['hidden_size']} · "
            f"{size} parameters · {info['device']} / {info['dtype']}{codes}")
    if not has_chat_template(lm):
        line += ("  \nA base model (no chat template): free-text prompts are asked as "
                 "“Question: …⏎Answer:” and the answer ends at the line's end; few-shot prompts run as typed.")
    entry = MODEL_ALIASES.get(lm.name)
    if entry is not None and entry.notice:
        line += f"  \n_{entry.notice}._"
    return line


# ----------------------------------------------------------------- search
SEARCH_METHODS = ("greedy", "mcts")
SEARCH_COLUMNS = ["#", "program", "layer calls/token", "compute saved", "answer"]


@dataclass
class SearchView:
    table: pd.DataFrame  # SEARCH_COLUMNS, shortest program first
    message: str
    programs: list[Program]


def search_programs(lm: LoadedModel, prompt, expected, method: str = "greedy", budget=100, progress=None,
                    exact: bool = False, cancelled=None) -> SearchView:
    """Find programs whose greedy answer is `expected`, shortest first, each verified by decoding.

    Answers are checked as the Explore tab marks them (the prompt's rule).
    The search stops at $POLAR_JOB_SECONDS or when `cancelled()` turns true,
    and shows what it found, marked partial.

    Args:
        progress: optional callable(fraction, message), e.g. a gr.Progress.
        exact: check free-text answers exactly (default: they must contain `expected`).
        cancelled: optional callable, true once the client left or pressed Stop.
    """
    prompt, expected = check_prompt(prompt), check_expected(expected)
    if not expected:
        raise InputError("Search needs an expected answer: a program is valid when it produces it.")
    if method not in SEARCH_METHODS:
        raise InputError(f"Unknown search method {str(method)[:20]!r}; choose {' or '.join(SEARCH_METHODS)}.")
    limits = Limits.from_env()
    try:
        budget = limits.check_search_budget(_whole(budget, "Budget", 1, 10**6))
    except LimitError as exc:
        raise InputError(str(exc)) from None
    report = None if progress is None else (lambda done, total: progress(min(1.0, done / total), f"{done} programs scored"))
    deadline = Deadline(limits.job_seconds, cancelled)
    try:
        found = find_programs(lm, prompt, expected, method=method, budget=budget, progress=report, exact=bool(exact),
                              should_stop=deadline)
    except PromptError as exc:
        raise InputError(str(exc)) from None
    table = pd.DataFrame(
        [[i + 1, p.format(), p.layer_calls, f"{1 - p.compute_fraction:.0%}", answer]
         for i, (p, answer) in enumerate(zip(found.programs, found.answers))], columns=SEARCH_COLUMNS)
    full = {True: "right", False: "wrong", None: "not scored yet"}[found.full_valid]
    partial = (f"**Partial results**: the search {deadline.describe()} after {found.programs_scored} of "
               f"{budget} programs. " if found.stopped else "")
    message = (partial + f"{method} search scored {found.programs_scored} programs in {found.seconds:.1f} s; the full program is "
               f"**{full}** (an answer is right when it {describe_rule(found.rule, escape_md(expected))}). "
               f"{len(found.programs)} valid program(s) shown, shortest first (checked by decoding)"
               + (": click one to load it into the editor." if found.programs else ".")
               + "  \n" + Stamp(prompt, "", lm.name, expected).markdown("Searched"))
    return SearchView(table, message, found.programs)


# --------------------------------------------------------------- evaluate
EVAL_COLUMNS = ["method", "accuracy", "layer calls/token", "oracle", "note"]


def evaluate_family(lm: LoadedModel, family, n_items=20, drop=6, cancelled=None):
    """Router top-1 (when a router is loaded) and baselines over a task family
    (polar_core.study.evaluate.evaluate_family). It stops at $POLAR_JOB_SECONDS
    or when `cancelled()` turns true, with the rows finished so far, marked partial.

    Returns (table, markdown report, accuracy-vs-depth figure, the table's
    notes as markdown: which depth the static baselines ran at, and why).
    """
    if family not in FAMILIES:
        raise InputError(f"Unknown task family {str(family)[:30]!r}; choose one of {', '.join(FAMILIES)}.")
    n_items = _whole(n_items, "Items", 1, 200)
    drop = _whole(drop, "Layers to drop", 0, lm.num_layers - 1)
    router, why_none = load_router_for(lm)
    deadline = Deadline(Limits.from_env().job_seconds, cancelled)
    table = library_evaluate_family(lm, router, family, n_items=n_items, drop=drop, why_no_router=why_none,
                                    should_stop=deadline)
    df = table.frame()
    shown = pd.DataFrame({"method": df["method"], "accuracy": df["accuracy"].map("{:.1%}".format),
                          "layer calls/token": df["layer_calls"].map("{:.2f}".format),
                          "oracle": df["oracle"].map({True: "yes", False: ""}), "note": df["note"]},
                         columns=EVAL_COLUMNS)
    partial = [f"- **Partial results**: the evaluation {deadline.describe()}."] if deadline.reason else []
    notes = "\n".join(partial + [f"- Model **{escape_md(lm.name)}**, {escape_md(table.title)}."]
                       + [f"- {note}" for note in table.notes])
    return shown, table.to_markdown(), figures.accuracy_vs_depth(table.points()), notes


# ------------------------------------------------------------------ learn
LEARN_DIR = Path(str(importlib.resources.files("app"))) / "learn"


def learn_file(model: str) -> Path:
    """Where a model's lessons are kept (`python -m app.curate_examples --model M --out ...`)."""
    return LEARN_DIR / f"{model}.json"


def lesson_models() -> list[str]:
    """The models with curated lessons, the default first."""
    return sorted((p.stem for p in LEARN_DIR.glob("*.json")), key=lambda m: (m != DEFAULT_MODEL, m))


def learn_examples(model: str = DEFAULT_MODEL, path=None) -> list[dict]:
    """A model's curated tour (written by `python -m app.curate_examples`); [] when absent."""
    path = path or learn_file(model)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    keys = ("title", "explanation", "prompt", "expected", "program")
    return [ex for ex in data.get("examples", []) if all(isinstance(ex.get(k), str) for k in keys)]


def lesson_card(ex: dict, number: int) -> str:
    """The card a loaded lesson keeps beside the results: title, explanation, what to look at."""
    look = f"\n\n**Look at:** {ex['look']}" if isinstance(ex.get("look"), str) else ""
    return (f"#### Lesson {number}: {ex['title']}\n{ex['explanation']}{look}\n\n"
            f"Program `{ex['program']}` · expected answer **{ex['expected']}**")
