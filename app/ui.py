"""The page: layout and event wiring. Logic lives in `app/handlers.py`.

Every event has an `api_name`, so whatever the page does a `gradio_client`
can do too. Handlers raise `InputError` for bad input; `_guard` turns it into
a `gr.Error` toast (an API client gets it as an error). Each event shows its
progress and errors on one component (`show_progress_on`), so a bad edit
never blanks the grid, the plots or the answers.
"""
from __future__ import annotations

import functools
import inspect
import logging
import queue
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr

from app import handlers as H
from app.session import RUN_TICKETS, InputError, Session, allowed_models, any_model_allowed, default_model, get_model
from polar_core.limits import Limits
from polar_core.study.tasks import FAMILIES

try:  # On a ZeroGPU Space, functions that run the model borrow a GPU per call.
    import spaces

    gpu = spaces.GPU
except ImportError:  # everywhere else: run as is
    def gpu(fn):
        return fn

log = logging.getLogger(__name__)

RUN_OUTPUTS = 12  # what on_run returns (the session state included)
STREAM_SECONDS = 0.15  # at most one partial answer update per this many seconds
CONCURRENCY = 2  # model calls at once; a 2-core CPU gains nothing from more
EXAMPLES = H.example_prompts()
EXAMPLE_LABELS = [label for label, _, _ in EXAMPLES]

CSS = """
.gradio-container {max-width: 1400px !important}
#title h1 {margin-bottom: 0}
#status {font-size: 0.92em; opacity: 0.9}
.answer-head p {margin: 0 !important; font-weight: 600}
#grid-note {font-size: 0.9em}
.learn-card {padding: 4px 14px 0 14px}
#summary {background: var(--block-background-fill); border-radius: 8px; padding: 6px 12px}
"""

# Writes the view into the address bar, so that a copied link reproduces it.
URL_JS = """
(prompt, program, expected, model) => {
  const url = new URL(window.location.href);
  const set = (key, value) => { if (value) url.searchParams.set(key, value); else url.searchParams.delete(key); };
  set("prompt", prompt); set("program", program); set("expected", expected); set("model", model);
  window.history.replaceState(null, "", url.toString());
}
"""


def launch_kwargs() -> dict:
    """Page-level settings for `demo.launch` (Gradio 6 takes theme and css there)."""
    return dict(theme=gr.themes.Soft(primary_hue="blue", neutral_hue="slate"), css=CSS,
                max_file_size=f"{Limits.from_env().max_upload_bytes // 1024}kb")


def _guard(fn):
    """Show an InputError as an error toast; the page keeps its state.

    Generator handlers (streaming) stay generators, so Gradio streams them.
    """
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except InputError as exc:
                raise gr.Error(str(exc), duration=10) from None
        return stream

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            raise gr.Error(str(exc), duration=10) from None
    return wrapper


# ------------------------------------------------------------- callbacks
def _editor_outputs(program) -> tuple:
    """(text, grid rows, grid note, piano roll, download file) for a program."""
    view = H.editor_view(program)
    return view.text, view.rows, view.note, view.roll, _download_file(program)


def _download_file(program) -> str:
    """A JSON file of the program for the download button (written by us, never a user path)."""
    folder = Path(tempfile.gettempdir()) / "polar-explorer-programs"
    folder.mkdir(exist_ok=True)
    path = folder / f"program-{abs(hash((program.path, program.num_layers))):x}.json"
    path.write_text(H.program_json(program.format(), program.num_layers), encoding="utf-8")
    return str(path)


@_guard
def on_model(model):
    lm = get_model(model)
    return (H.model_status(lm), *_editor_outputs(H.Program.full(lm.num_layers)))


@_guard
def on_text(text, model):
    return _editor_outputs(H.parse_program(text, get_model(model).num_layers))


@_guard
def on_grid(rows, model):
    return _editor_outputs(H.program_from_grid(rows, get_model(model).num_layers))


@_guard
def on_preset(preset, n, a, b, r, model):
    return _editor_outputs(H.preset_program(get_model(model), preset, n, a, b, r))


@_guard
def on_upload(data, model):
    return _editor_outputs(H.program_from_upload(data, get_model(model).num_layers))


@_guard
def on_example(label):
    for name, prompt, expected in EXAMPLES:
        if name == label:
            return prompt, expected
    raise InputError(f"Unknown example {str(label)[:40]!r}.")


@_guard
@gpu
def on_predict(prompt, model):
    lm = get_model(model)
    pred = H.predict(lm, prompt)
    program = pred.programs[0] if pred.programs else H.Program.full(lm.num_layers)
    if not pred.programs:
        gr.Info(pred.message)
    return (pred.rows, pred.message, *_editor_outputs(program))


@_guard
def on_pick_row(table, model, evt: gr.SelectData):
    """Load the program in the clicked row of a ranked table (column 1 holds its text)."""
    rows = H.table_rows(table)
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    if not rows or not 0 <= row < len(rows):
        raise InputError("Click a row with a program.")
    return _editor_outputs(H.parse_program(str(rows[row][1]), get_model(model).num_layers))


@_guard
@gpu
def on_search(prompt, expected, method, budget, model, progress=gr.Progress()):
    progress(0, desc="searching")
    view = H.search_programs(get_model(model), prompt, expected, method, budget,
                             progress=lambda frac, msg: progress(frac, desc=msg))
    return view.table, view.message


@_guard
@gpu
def on_evaluate(family, n_items, drop, model, progress=gr.Progress(track_tqdm=True)):
    return H.evaluate_family(get_model(model), family, n_items, drop)


@_guard
def on_learn(index, model):
    """Load curated example `index` into the page: prompt, expected answer, program."""
    examples = H.learn_examples()
    if not 0 <= int(index) < len(examples):
        raise InputError(f"There is no example {index}.")
    ex = examples[int(index)]
    program = H.parse_program(ex["program"], get_model(model).num_layers)
    return (ex["prompt"], ex["expected"], *_editor_outputs(program), gr.Tabs(selected="explore"))


def _verdict(title: str, answer: H.Answer) -> str:
    mark = "" if answer.correct is None else (" · ✓ right" if answer.correct else " · ✗ wrong")
    return f"{title} · {answer.steps} layer calls/token{mark}"


def _run_outputs(view: H.RunView, session: Session) -> tuple:
    """Everything a finished run shows, in run_out order."""
    f = view.figures
    details = {
        "full_answer": view.full.text, "edited_answer": view.edited.text, "same_answer": view.same_answer,
        "full_layers": view.full.steps, "edited_layers": view.edited.steps,
        "full_correct": view.full.correct, "edited_correct": view.edited.correct,
        "compute_saved": round(1 - view.edited.steps / view.full.steps, 4),
        "edited_seconds": round(view.edited.seconds, 3), "full_seconds": round(view.full.seconds, 3),
    }
    return (_verdict("Full program", view.full), view.full.spans, _verdict("Edited program", view.edited),
            view.edited.spans, view.summary, f["similarity"], f["logit_lens"], f["answer_probability"],
            f["block_influence"], f["alignment"], details, session)


def _partial_outputs(answers: dict[str, str]) -> tuple:
    """The answers generated so far ({"full": ..., "edited": ...}); everything else unchanged."""
    out = [gr.skip() for _ in range(RUN_OUTPUTS)]
    for which, title, column in (("full", "Full program", 0), ("edited", "Edited program", 2)):
        if which in answers:
            out[column] = f"{title} · generating…"
            out[column + 1] = [(answers[which] or "…", None)]
    return tuple(out)


@gpu
def _run_model(*args, **kwargs) -> H.RunView:
    return H.run(*args, **kwargs)


@_guard
def on_run(prompt, program_text, expected, model, session, request: gr.Request = None):
    """Run the edited and the full program, streaming the answers as they grow, then everything."""
    session = session if isinstance(session, Session) else Session()
    key = getattr(request, "session_hash", None)
    superseded = RUN_TICKETS.issue(key) if key else (lambda: False)  # a newer run of this page stops this one
    closed = threading.Event()  # Gradio closed this generator: the client left or the event was cancelled
    lm = get_model(model)
    updates: queue.SimpleQueue = queue.SimpleQueue()
    outcome: dict = {}

    def work():  # the model runs here; the generator below only relays what it reports
        try:
            outcome["view"] = _run_model(lm, session, prompt, program_text, expected,
                                         lambda: closed.is_set() or superseded(),
                                         lambda which, text: updates.put((which, text)))
        except BaseException as exc:  # re-raised below, in the request's own thread
            outcome["error"] = exc
        finally:
            updates.put(None)

    threading.Thread(target=work, name="polar-run", daemon=True).start()
    answers: dict[str, str] = {}
    sent = 0.0
    try:
        while (item := updates.get()) is not None:
            answers[item[0]] = item[1]
            if time.monotonic() - sent >= STREAM_SECONDS:  # enough to look live, few enough messages
                sent = time.monotonic()
                yield _partial_outputs(answers)
    finally:
        closed.set()  # stops the model at its next token if we leave before it finished
    error = outcome.get("error")
    if isinstance(error, H.Superseded):
        yield tuple(gr.skip() for _ in range(RUN_OUTPUTS))
        return
    if error is not None:
        raise error
    yield _run_outputs(outcome["view"], session)


@_guard
def run_if_auto(auto, prompt, program_text, expected, model, session, request: gr.Request = None):
    """Rerun after an edit when auto-run is on (and a prompt is there)."""
    if not auto or not (prompt or "").strip():
        yield tuple(gr.skip() for _ in range(RUN_OUTPUTS))
        return
    yield from on_run(prompt, program_text, expected, model, session, request)


@_guard
def on_load(session, request: gr.Request):
    """Restore prompt, expected answer, program and model from the page URL."""
    state = H.decode_url_state(dict(request.query_params) if request else {})
    model = state.get("model") or default_model()
    try:
        lm = get_model(model)
    except InputError as exc:
        gr.Warning(f"{exc} Using {default_model()}.")
        model, lm = default_model(), get_model(default_model())
    try:
        program = H.parse_program(state.get("program", "full"), lm.num_layers)
    except InputError as exc:
        gr.Warning(f"The link's program was ignored: {exc}")
        program = H.Program.full(lm.num_layers)
    return (model, state.get("prompt", ""), state.get("expected", ""), H.model_status(lm),
            *_editor_outputs(program), session if isinstance(session, Session) else Session())


# ----------------------------------------------------------------- layout
def _model_row():
    with gr.Row(equal_height=True):
        model = gr.Dropdown(allowed_models(), value=default_model(), label="Model", scale=2,
                            allow_custom_value=any_model_allowed())
        status = gr.Markdown("Loading the model…", elem_id="status")
    return model, status


def _prompt_column():
    with gr.Column(scale=5):
        example = gr.Dropdown(EXAMPLE_LABELS, value=None, label="Examples (few-shot task items, or free text)")
        prompt = gr.Textbox(label="Prompt", lines=5, max_lines=12, elem_id="prompt",
                            placeholder="Ask anything, or pick an example. Few-shot prompts end with 'A:'.")
        expected = gr.Textbox(label="Expected answer (optional: marks answers right or wrong)", elem_id="expected")
        with gr.Row():
            predict = gr.Button("Predict program", elem_id="predict")
            run = gr.Button("Run", variant="primary", elem_id="run")
            auto = gr.Checkbox(True, label="auto-run after each edit", elem_id="auto")
    return example, prompt, expected, predict, run, auto


def _predict_column():
    with gr.Column(scale=4):
        gr.Markdown("#### Router's ranked programs, then suggestions")
        table = gr.Dataframe(headers=H.PREDICT_COLUMNS, datatype=["number", "str", "number", "number", "str"],
                             interactive=False, type="array", max_height=220, elem_id="predictions")
        message = gr.Markdown("Press **Predict program** to ask the router; programs marked *suggested* need no "
                              "router and are verified to keep the full program's answer.")
    return table, message


def _editor():
    gr.Markdown("### Program editor")
    with gr.Row(equal_height=True):
        preset = gr.Dropdown([(label, key) for key, label in H.PRESETS.items()],
                             value="full", label="Preset", scale=3)
        n = gr.Number(4, label="n / k", precision=0, minimum=1, scale=1)
        a = gr.Number(20, label="a", precision=0, minimum=0, scale=1)
        b = gr.Number(29, label="b", precision=0, minimum=0, scale=1)
        r = gr.Number(2, label="× r", precision=0, minimum=1, scale=1)
        apply = gr.Button("Apply preset", scale=1, elem_id="apply-preset")
    with gr.Row(equal_height=True):
        text = gr.Textbox(label="Program (text form, e.g. 0-11, 12-15x2, 16-29 — press Enter to apply)",
                          scale=5, elem_id="program-text")
        download = gr.DownloadButton("⬇ Download JSON", scale=1, size="md")
        upload = gr.UploadButton("⬆ Upload JSON", file_types=[".json"], type="binary", scale=1, size="md")
    with gr.Row():
        with gr.Column(scale=2):
            grid = gr.Dataframe(headers=H.GRID_HEADERS, datatype=["number", "bool", "number", "str"], type="array",
                                interactive=True, static_columns=[0, 3], max_height=820, label="Layer grid",
                                elem_id="grid")
            note = gr.Markdown(elem_id="grid-note")
        with gr.Column(scale=3):
            roll = gr.Plot(label="Program: steps × layers", elem_id="roll", show_label=False)
    return preset, n, a, b, r, apply, text, download, upload, grid, note, roll


def _answers():
    """Both answers side by side, changed tokens highlighted, and the cost summary."""
    with gr.Row():
        with gr.Column():
            full_head = gr.Markdown("Full program", elem_classes="answer-head")
            full = gr.HighlightedText(label="Full program's answer (tokens the edit changes in grey)",
                                      color_map={"differs": "#C8C8C8"}, combine_adjacent=True, show_legend=False,
                                      show_inline_category=False, elem_id="answer-full")
        with gr.Column():
            edited_head = gr.Markdown("Edited program", elem_classes="answer-head")
            edited = gr.HighlightedText(label="Edited program's answer (changed tokens highlighted)",
                                        color_map={"changed": "#F58518"}, combine_adjacent=True,
                                        show_legend=False, show_inline_category=False, elem_id="answer-edited")
    summary = gr.Markdown("Press **Run** to answer the prompt under the full and the edited program.",
                          elem_id="summary")
    return full_head, full, edited_head, edited, summary


def _analysis_tabs():
    gr.Markdown("### What happens inside")
    with gr.Tabs():
        with gr.Tab("Similarity"):
            sim = gr.Plot(elem_id="plot-similarity", show_label=False)
        with gr.Tab("Logit lens"):
            lens = gr.Plot(elem_id="plot-lens", show_label=False)
        with gr.Tab("Answer-token probability"):
            prob = gr.Plot(elem_id="plot-probability", show_label=False)
        with gr.Tab("Block influence"):
            influence = gr.Plot(elem_id="plot-influence", show_label=False)
        with gr.Tab("Alignment with the full program"):
            align = gr.Plot(elem_id="plot-alignment", show_label=False)
    with gr.Accordion("Raw numbers (JSON)", open=False):
        details = gr.JSON(show_label=False)
    return sim, lens, prob, influence, align, details


def _search_tab():
    with gr.Tab("Search", id="search"):
        gr.Markdown("Find **shorter programs** that still give the expected answer for the prompt on the Explore "
                    "tab. Greedy drops blocks of layers one edit at a time; MCTS explores skip / keep / repeat "
                    "segments as in the PoLar paper. Programs are checked by teacher forcing, then by decoding.")
        with gr.Row(equal_height=True):
            method = gr.Radio(list(H.SEARCH_METHODS), value="greedy", label="Method", scale=2)
            budget = gr.Slider(10, 400, value=120, step=10, label="Budget (programs scored)", scale=3,
                               elem_id="search-budget")
            go_ = gr.Button("Find shorter programs", variant="primary", scale=2, elem_id="search-button")
        message = gr.Markdown()
        table = gr.Dataframe(headers=H.SEARCH_COLUMNS, type="array",
                             datatype=["number", "str", "number", "str", "str"], interactive=False,
                             max_height=360, elem_id="search-results")
    return method, budget, go_, message, table


def _evaluate_tab():
    with gr.Tab("Evaluate", id="evaluate"):
        gr.Markdown("Accuracy against executed layers over a task family. **Top-1** is what a deployed router "
                    "would run; best-of-k needs the answer to choose, so it is an *oracle* (hollow markers).")
        with gr.Row(equal_height=True):
            family = gr.Dropdown(list(FAMILIES), value="capitals", label="Task family", scale=2)
            n_items = gr.Slider(5, 100, value=20, step=5, label="Items (test split)", scale=2, elem_id="eval-items")
            drop = gr.Slider(0, 20, value=3, step=1, scale=2,
                             label="Layers dropped by static baselines (when there is no router, or it keeps every layer)")
            go_ = gr.Button("Evaluate", variant="primary", scale=1, elem_id="evaluate-button")
        table = gr.Dataframe(headers=H.EVAL_COLUMNS, type="array",
                             interactive=False, wrap=True, elem_id="eval-table")
        plot = gr.Plot(show_label=False, elem_id="eval-plot")
        with gr.Accordion("Markdown report", open=False):
            report = gr.Markdown()
    return family, n_items, drop, go_, table, report, plot


def _learn_tab():
    """One card per curated example, each with a button that loads it."""
    with gr.Tab("Learn", id="learn"):
        gr.Markdown("A short tour for teaching **layer redundancy**. Each example was chosen by measurement on "
                    "the default model (`python -m app.curate_examples`). Load one, then look at the answers "
                    "and the figures on the Explore tab.")
        buttons = []
        examples = H.learn_examples()
        if not examples:
            gr.Markdown("_No curated examples found (app/learn_examples.json)._")
        for i, ex in enumerate(examples):
            with gr.Group():
                gr.Markdown(f"#### {i + 1}. {ex['title']}\n{ex['explanation']}\n\n"
                            f"Program: `{ex['program']}` · expected answer: **{ex['expected']}**",
                            elem_classes="learn-card")
                buttons.append((i, gr.Button(f"Load example {i + 1}", size="sm", elem_id=f"learn-{i}")))
    return buttons


def build_demo() -> gr.Blocks:
    """The whole page. Builds components only: the model loads on first use."""
    with gr.Blocks(title="PoLar Explorer") as demo:
        session = gr.State(Session())
        gr.Markdown("# PoLar Explorer\nSee how a language model spends its layers: skip them, loop them, "
                    "and watch the answer change. ([PoLar](https://arxiv.org/abs/2606.06574))", elem_id="title")
        model, status = _model_row()
        with gr.Tabs(selected="explore") as tabs:
            with gr.Tab("Explore", id="explore"):
                with gr.Row():
                    example, prompt, expected, predict, run, auto = _prompt_column()
                    table, message = _predict_column()
                answers = _answers()
                preset, n, a, b, r, apply, text, download, upload, grid, note, roll = _editor()
                results = (*answers, *_analysis_tabs())
            s_method, s_budget, s_go, s_message, s_table = _search_tab()
            e_family, e_items, e_drop, e_go, e_table, e_report, e_plot = _evaluate_tab()
            learn_buttons = _learn_tab()

        editor = [text, grid, note, roll, download]
        run_in = [prompt, text, expected, model, session]
        run_out = [*results, session]
        summary = answers[-1]

        def edit_event(trigger, fn, inputs, api_name):
            """An editor change: sync the three views, rerun if auto-run, update the URL."""
            return (trigger(fn, inputs, editor, api_name=api_name, trigger_mode="always_last", show_progress_on=text)
                    .success(run_if_auto, [auto, *run_in], run_out, api_visibility="private", show_progress_on=summary)
                    .then(None, [prompt, text, expected, model], None, js=URL_JS))

        (demo.load(on_load, [session], [model, prompt, expected, status, *editor, session], api_name="load_view")
         .success(run_if_auto, [auto, *run_in], run_out, api_visibility="private", show_progress_on=summary))
        model.input(on_model, [model], [status, *editor], api_name="model_status")  # not .change: the URL sets it too
        (example.input(on_example, [example], [prompt, expected], api_name="example")
         .success(run_if_auto, [auto, *run_in], run_out, api_visibility="private", show_progress_on=summary)
         .then(None, [prompt, text, expected, model], None, js=URL_JS))
        edit_event(text.submit, on_text, [text, model], "set_program_text")
        edit_event(grid.input, on_grid, [grid, model], "set_program_grid")
        edit_event(apply.click, on_preset, [preset, n, a, b, r, model], "apply_preset")
        edit_event(upload.upload, on_upload, [upload, model], "upload_program")
        edit_event(table.select, on_pick_row, [table, model], "pick_prediction")
        (predict.click(on_predict, [prompt, model], [table, message, *editor], api_name="predict",
                       show_progress_on=[table, text])
         .success(run_if_auto, [auto, *run_in], run_out, api_visibility="private", show_progress_on=summary))
        s_go.click(on_search, [prompt, expected, s_method, s_budget, model], [s_table, s_message], api_name="search")
        (s_table.select(on_pick_row, [s_table, model], editor, api_name="pick_search_result")
         .success(lambda: gr.Tabs(selected="explore"), None, tabs, api_visibility="private")
         .success(run_if_auto, [auto, *run_in], run_out, api_visibility="private", show_progress_on=summary))
        e_go.click(on_evaluate, [e_family, e_items, e_drop, model], [e_table, e_report, e_plot], api_name="evaluate")
        for i, button in learn_buttons:
            (button.click(functools.partial(on_learn, i), [model], [prompt, expected, *editor, tabs],
                          api_name=f"learn_example_{i}")
             .success(on_run, run_in, run_out, api_visibility="private", show_progress_on=summary)
             .then(None, [prompt, text, expected, model], None, js=URL_JS))
        (run.click(on_run, run_in, run_out, api_name="run", trigger_mode="always_last", show_progress_on=summary)
         .then(None, [prompt, text, expected, model], None, js=URL_JS))
    return demo.queue(default_concurrency_limit=CONCURRENCY)


def warm_up() -> None:
    """Load the default model and its router before the first visitor asks (dequantizing takes seconds).

    A model or router that fails to load is logged here and shown on the page
    when used; the server starts anyway, so the page can say what went wrong.
    """
    try:
        lm = get_model(default_model())
    except InputError as exc:
        log.error("default model not loaded: %s", exc)
        return
    router, why = H.load_router_for(lm)
    if router is None:
        log.warning("no router for %s (%s): Predict will say so", lm.name, why)
