"""The page: layout and event wiring. Logic lives in `app/handlers.py`.

Every action has an `api_name`, so whatever the page does a `gradio_client`
can do too (a row pick takes the row's index). Handlers raise `InputError`
for bad input; `_guard` turns it into a `gr.Error` toast (an API client gets
it as an error). Each event shows its progress on one component
(`show_progress_on`), so a bad edit never blanks the grid, plots or answers.

What the page shows is always what the editor holds. Every result carries
its stamp (prompt, program, model) in its headings. An edit stops the run in
progress (`RUN_TICKETS.edited`), says "running `<program>`…" at once, and its
own run follows: editor events and the runs after them are `always_last`
(an edit made while one is pending is deferred, never dropped: Gradio's
default for chained events drops it), and a run whose page moved on draws
nothing. The API's `/run` is a separate endpoint without tickets, so
concurrent jobs of one client each get their whole answer.
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
from gradio.components.plot import PlotData

from app import figures
from app import handlers as H
from app.escape import code_md, escape_html
from app.session import RUN_TICKETS, InputError, Session, allowed_models, any_model_allowed, default_model, get_model
from polar_core.engine.models import DEFAULT_MODEL
from polar_core.limits import Limits
from polar_core.study.tasks import FAMILIES

try:  # On a ZeroGPU Space, functions that run the model borrow a GPU per call.
    import spaces

    gpu = spaces.GPU
except ImportError:  # everywhere else: run as is
    def gpu(fn):
        return fn

log = logging.getLogger(__name__)

PLOTS = ("similarity", "logit_lens", "answer_probability", "block_influence", "alignment")
RUN_OUTPUTS = 14  # what a run returns besides the session state (see _run_outputs)
STREAM_SECONDS = 0.15  # at most one partial answer update per this many seconds
POLL_SECONDS = 0.5  # a search or evaluation yields this often, so Gradio can stop it
SESSION_SECONDS = 1800
CONCURRENCY = 2  # model calls at once; a 2-core CPU gains nothing from more
EXAMPLES = H.example_prompts()
EXAMPLE_LABELS = [label for label, _, _ in EXAMPLES]
MAX_FILES = 200  # downloads kept in this process's folder; the oldest go first
DOWNLOAD_PREFIXES = ("run-", "program-")  # the names _write gives (_program_file, _run_files)


def gradio_cache() -> tuple[int, int]:
    """Gradio's delete_cache: (how often, how old) in seconds. Every run's JSON
    differs (its timings), so Gradio copies each into its cache: without an
    age limit the copies pile up (hundreds of MB an hour under load)."""
    age = max(1, int(Limits.from_env().file_seconds))
    return max(10, age // 4), age

CSS = """
.gradio-container {max-width: 1400px !important}
#title h1 {margin-bottom: 0}
#status {font-size: 0.92em; opacity: 0.9}
.answer-head p {margin: 0 !important; font-weight: 600}
.caption p, #labels-note p {font-size: 0.9em; opacity: 0.85; margin: 2px 0 !important}
#grid-note {font-size: 0.9em}
#lesson {border-left: 4px solid var(--color-accent); padding: 2px 12px}
#summary {background: var(--block-background-fill); border-radius: 8px; padding: 6px 12px}
#grid .table-wrap, #grid .table-container {max-height: none !important}
#grid td, #grid th {padding-top: 1px !important; padding-bottom: 1px !important}
@media (max-width: 640px) { #roll {min-width: 0 !important} }
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

# Copies the page's address (kept current by URL_JS) and says so on the button.
COPY_JS = """
() => {
  const url = window.location.href;
  const done = () => {
    const b = document.querySelector('#copy-link');
    if (b) { const old = b.innerText; b.innerText = '✓ Link copied'; setTimeout(() => { b.innerText = old; }, 1500); }
  };
  if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(url).then(done, done); return; }
  const t = document.createElement('textarea'); t.value = url; document.body.appendChild(t); t.select();
  try { document.execCommand('copy'); } catch (e) {} document.body.removeChild(t); done();
}
"""

# Right after an edit, before the server has run it: the edited answer's
# heading names the new program, and no answer of another program is shown.
# The program is the text box's value: made inert as app.escape.code_md does on the server.
PENDING_JS = """
(auto, program) => [
  "Edited program `" + String(program).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/`/g, "'") + "` · " + (auto ? "running…" : "not run yet: press **Run**"),
  [{token: auto ? "…" : "(press Run)", class_or_confidence: null}],
]
"""


# A loaded lesson: scroll to the top of the Explore tab, where its card sits beside the prompt, above the answers.
SCROLL_JS = "() => { const t = document.querySelector('#main-tabs'); if (t) t.scrollIntoView({block: 'start'}); }"


def launch_kwargs() -> dict:
    """Page-level settings for `demo.launch` (Gradio 6 takes theme and css there)."""
    return dict(theme=gr.themes.Soft(primary_hue="blue", neutral_hue="slate"), css=CSS,
                max_file_size=f"{Limits.from_env().max_upload_bytes // 1024}kb")


def _error(message) -> gr.Error:
    """An error toast. Toasts render HTML, and messages quote user input: escaped."""
    return gr.Error(escape_html(message), duration=10)


def _warn(message) -> None:
    gr.Warning(escape_html(message))


def _info(message) -> None:
    gr.Info(escape_html(message))


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
                raise _error(exc) from None
        return stream

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            raise _error(exc) from None
    return wrapper


def _page(request) -> str | None:
    """The browser page (Gradio session) a request came from."""
    return getattr(request, "session_hash", None)


# ------------------------------------------------------------- callbacks
def _editor_outputs(program, request=None, keep=()) -> tuple:
    """(text, grid rows, grid note, piano roll, download file) for a program.

    An editor output is an edit: whatever the page is running is stale now.
    `keep` names views ("text", "grid") left as the user left them: writing
    a value back into the box being edited replaces what the user did in the
    meantime (the next edit of a burst, a click on the re-rendered grid).
    """
    RUN_TICKETS.edited(_page(request), program.format())
    view = H.editor_view(program)
    return (gr.skip() if "text" in keep else view.text, gr.skip() if "grid" in keep else view.rows,
            view.note, view.roll, _program_file(program))


class Downloads:
    """The files behind the download buttons: a private folder of this process
    (mkdtemp: mode 0700, an unpredictable name; removed at exit), names we
    make (never a user path), at most MAX_FILES files none older than
    $POLAR_FILE_SECONDS: each write deletes the stale ones."""

    def __init__(self, max_files: int = MAX_FILES, max_age_s: float | None = None):
        self.max_files = max_files
        self.max_age_s = Limits.from_env().file_seconds if max_age_s is None else max_age_s
        self._folder: Path | None = None
        self._lock = threading.Lock()
        self._cache_pruned = time.monotonic()

    @property
    def folder(self) -> Path:
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="polar-explorer-"))
                atexit.register(shutil.rmtree, self._folder, True)
            return self._folder

    def write(self, name: str, text: str) -> str:
        path = self.folder / name
        tmp = path.with_name(f".{name}.{threading.get_ident()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)  # a reader never sees half a file
        self.prune(keep=path)
        if time.monotonic() - self._cache_pruned > max(10.0, self.max_age_s / 4):
            self._cache_pruned = time.monotonic()
            prune_gradio_cache(Path(gr.utils.get_upload_folder()), self.max_age_s)
        return str(path)

    def prune(self, keep: Path | None = None) -> None:
        """Delete files older than max_age_s, then the oldest beyond max_files."""
        now, files = time.time(), []
        for entry in os.scandir(self.folder):
            if entry.name.startswith("."):  # being written
                continue
            try:
                files.append((entry.stat().st_mtime, Path(entry.path)))
            except FileNotFoundError:  # another thread pruned it
                continue
        files.sort()
        stale = [p for t, p in files if now - t > self.max_age_s]
        fresh = [p for t, p in files if now - t <= self.max_age_s]
        stale += fresh[: max(0, len(fresh) - self.max_files)]
        for path in stale:
            if path != keep:
                path.unlink(missing_ok=True)


def prune_gradio_cache(cache: Path, max_age_s: float, prefixes=DOWNLOAD_PREFIXES) -> int:
    """Delete Gradio's cached copies of our downloads older than max_age_s; the number deleted.

    Gradio copies every file a handler returns into its cache (a folder per
    content hash). Its `delete_cache` cleans only the copies it tracks, and
    it tracks none made for a streaming event (every run is one), so without
    this they pile up: each run's JSON differs (its timings), one copy per
    run. Only files named as ours are touched: the cache may be shared.
    """
    deleted, now = 0, time.time()
    with contextlib.suppress(FileNotFoundError):
        for folder in os.scandir(cache):
            if not folder.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                for entry in os.scandir(folder.path):
                    if entry.name.startswith(prefixes) and now - entry.stat().st_mtime > max_age_s:
                        os.unlink(entry.path)
                        deleted += 1
                # An empty folder goes too, unless Gradio made it just now (to copy into it).
                if not any(os.scandir(folder.path)) and now - folder.stat().st_mtime > max_age_s:
                    os.rmdir(folder.path)
    return deleted


DOWNLOADS = Downloads()


def _write(name: str, text: str) -> str:
    """A file for a download button (see Downloads)."""
    return DOWNLOADS.write(name, text)


def _digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:16]


def _program_file(program) -> str:
    return _write(f"program-{_digest(program.path, program.num_layers)}.json",
                  H.program_json(program.format(), program.num_layers))


@_guard
def on_model(model, request: gr.Request = None):
    lm = get_model(model)
    return (H.model_status(lm), *_editor_outputs(H.Program.full(lm.num_layers), request))


@_guard
def on_text(text, model, request: gr.Request = None):
    """The program typed as text, all views (the API's /set_program_text)."""
    return _editor_outputs(H.parse_program(text, get_model(model).num_layers), request)


@_guard
def on_text_page(text, model, request: gr.Request = None):
    """The page's Enter in the text form: the other views follow, the box keeps what the user typed."""
    return _editor_outputs(H.parse_program(text, get_model(model).num_layers), request, keep=("text",))


@_guard
def on_grid(rows, text, model, request: gr.Request = None):
    """The program the grid describes, all views (the API's /set_program_grid)."""
    return _grid(rows, text, model, request, keep=())


@_guard
def on_grid_page(rows, text, model, request: gr.Request = None):
    """A tick in the page's grid: the other views follow; a valid grid is not
    written back (that re-renders it under the user's next click, which is
    then lost)."""
    return _grid(rows, text, model, request, keep=("grid",))


def _grid(rows, text, model, request, keep):
    """An invalid cell is reset to the program the text form holds, with a
    warning, so no wrong value and no error badge stay behind."""
    lm = get_model(model)
    try:
        return _editor_outputs(H.program_from_grid(rows, lm.num_layers), request, keep)
    except InputError as exc:
        _warn(f"{exc} The grid shows the program again.")
        return _editor_outputs(H.parse_program(text, lm.num_layers), request)


@_guard
def on_preset(preset, n, a, b, r, model, request: gr.Request = None):
    return _editor_outputs(H.preset_program(get_model(model), preset, n, a, b, r), request)


def on_preset_choice(preset):
    """Show only the number fields the chosen preset reads, labelled for it."""
    used = H.PRESET_FIELDS.get(preset, {})
    return tuple(gr.update(visible=key in used, label=used.get(key)) for key in ("n", "a", "b", "r"))


@_guard
def on_upload(data, model, request: gr.Request = None):
    return _editor_outputs(H.program_from_upload(data, get_model(model).num_layers), request)


@_guard
def on_example(label):
    for name, prompt, expected in EXAMPLES:
        if name == label:
            return prompt, expected, gr.update(value="", visible=False)
    raise InputError(f"Unknown example {str(label)[:40]!r}.")


@_guard
@gpu
def on_predict(prompt, model, request: gr.Request = None):
    lm = get_model(model)
    pred = H.predict(lm, prompt)
    program = pred.programs[0] if pred.programs else H.Program.full(lm.num_layers)
    if not pred.programs:
        _info(pred.message)
    return (pred.rows, pred.message, *_editor_outputs(program, request))


def clicked_row(evt: gr.SelectData):
    """The row index of a click in a table (the page's half of a row pick)."""
    return evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index


@_guard
def on_pick_row(table, row, model, request: gr.Request = None):
    """Load the program in row `row` (0-based) of a ranked table; column 1 holds its text."""
    rows = H.table_rows(table)
    try:
        row = int(row)
    except (TypeError, ValueError):
        raise InputError(f"Pick a row by its index, got {str(row)[:20]!r}.") from None
    if not rows or not 0 <= row < len(rows):
        raise InputError(f"Pick a row with a program: the table has {len(rows)} row(s), got row {row}.")
    if len(rows[row]) < 2:
        raise InputError(f"Row {row} of the table holds no program.")
    return _editor_outputs(H.parse_program(str(rows[row][1]), get_model(model).num_layers), request)


def _until_done(work):
    """Run `work(cancelled)` in a thread; yield None while it runs, then its result.

    Gradio can stop a handler only where it yields: when the client leaves
    or presses Stop, it closes this generator at its next yield, which sets
    `cancelled` (the work stops at its next check) instead of leaving a
    search to hold a model slot for minutes. The thread runs in this
    request's context, so gr.Progress still reaches the page.
    """
    closed, out = threading.Event(), {}
    context = contextvars.copy_context()

    def target():
        try:
            out["value"] = context.run(work, closed.is_set)
        except BaseException as exc:  # re-raised below, in the request's own thread
            out["error"] = exc

    thread = threading.Thread(target=target, name="polar-job", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(POLL_SECONDS)
            if thread.is_alive():
                yield None
    finally:
        closed.set()
    if "error" in out:
        raise out["error"]
    yield out["value"]


@_guard
@gpu
def on_search(prompt, expected, method, budget, model, exact=False, progress=gr.Progress()):
    """Search in a worker thread, stoppable (see _until_done); partial results at the time limit."""
    lm = get_model(model)
    progress(0, desc="searching")
    def work(cancelled):
        return H.search_programs(lm, prompt, expected, method, budget, exact=exact, cancelled=cancelled,
                                 progress=lambda frac, msg: progress(frac, desc=msg))

    for view in _until_done(work):
        yield (gr.skip(), gr.skip()) if view is None else (view.table, view.message)


@_guard
@gpu
def on_evaluate(family, n_items, drop, model, progress=gr.Progress(track_tqdm=True)):
    lm = get_model(model)
    for result in _until_done(lambda cancelled: H.evaluate_family(lm, family, n_items, drop, cancelled=cancelled)):
        yield tuple(gr.skip() for _ in range(4)) if result is None else result


def _lesson(lesson_model: str, index) -> tuple[int, dict]:
    examples = H.learn_examples(lesson_model)
    try:
        index = int(index)
    except (TypeError, ValueError):
        raise InputError(f"There is no lesson {str(index)[:20]!r}.") from None
    if not 0 <= index < len(examples):
        raise InputError(f"There is no lesson {index + 1}.")
    return index, examples[index]


@_guard
def on_learn(lesson_model: str, index, request: gr.Request = None):
    """Load lesson `index` of `lesson_model` into the Explore tab: the model, prompt, expected
    answer, program, and its card."""
    index, ex = _lesson(lesson_model, index)
    lm = get_model(lesson_model)
    program = H.parse_program(ex["program"], lm.num_layers)
    return (lesson_model, H.model_status(lm), ex["prompt"], ex["expected"], *_editor_outputs(program, request),
            gr.update(value=H.lesson_card(ex, index + 1), visible=True), gr.Tabs(selected="explore"))


# -------------------------------------------------------------------- runs
def _plot(fig, name: str) -> PlotData:
    """A figure for gr.Plot with Plotly's options (PNG download, toolbar) in its JSON."""
    plot = fig.to_json()
    return PlotData(type="plotly", plot=plot[:-1] + ', "config": ' + json.dumps(figures.plot_config(name)) + "}")


def _run_files(view: H.RunView) -> tuple[str, str, dict]:
    """The run's per-step CSV and JSON files, and the JSON record itself."""
    record = H.run_record(view)
    key = _digest(view.stamp, view.edited.text)
    csv = _write(f"run-{key}.csv", H.step_table(view.analysis).to_csv(index=False))
    return csv, _write(f"run-{key}.json", json.dumps(record, indent=1, ensure_ascii=False)), record


def _run_outputs(view: H.RunView, session: Session) -> tuple:
    """Everything a finished run shows, in run_out order (the session state last)."""
    csv, data, record = _run_files(view)
    charts = f"Charts of program `{view.stamp.program}` on this prompt ({view.edited.steps} steps)."
    return (H.answer_heading("Full program", view.full, view.rule_text), view.full.spans,
            H.answer_heading("Edited program", view.edited, view.rule_text), view.edited.spans,
            view.summary, charts, *(_plot(view.figures[name], name) for name in PLOTS),
            csv, data, record, session)


def _pending_outputs(program_text: str, answers: dict[str, str] | None = None) -> tuple:
    """While a run goes: headings say what runs, answers show as they grow; charts stay, marked as old."""
    out = [gr.skip() for _ in range(RUN_OUTPUTS + 1)]
    shown = code_md(str(program_text)[: H.MAX_PROGRAM_CHARS])
    for which, title, column in (("full", "Full program", 0), ("edited", f"Edited program `{shown}`", 2)):
        if answers is None or which in answers:
            out[column] = f"{title} · " + ("running…" if answers is None else "generating…")
            out[column + 1] = [((answers or {}).get(which) or "…", None)]
    if answers is None:
        out[5] = f"Charts below are of the previous run; running `{shown}`…"
    return tuple(out)


@gpu
def _run_model(*args, **kwargs) -> H.RunView:
    return H.run(*args, **kwargs)


def _stream_run(prompt, program_text, expected, exact, model, session, should_stop, on_final=None):
    """Run the edited and the full program, streaming the answers as they grow, then everything.

    Yields run_out tuples; ends with nothing drawn (all skips) when
    `should_stop` turned true (the page moved on). `on_final` gets the
    finished outputs before they are sent.
    """
    session = session if isinstance(session, Session) else Session()
    closed = threading.Event()  # Gradio closed this generator: the client left or the event was cancelled
    lm = get_model(model)
    updates: queue.SimpleQueue = queue.SimpleQueue()
    outcome: dict = {}

    def work():  # the model runs here; the generator below only relays what it reports
        try:
            outcome["view"] = _run_model(lm, session, prompt, program_text, expected,
                                         lambda: closed.is_set() or should_stop(),
                                         lambda which, text: updates.put((which, text)), exact=bool(exact))
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
                yield _pending_outputs(program_text, answers)
    finally:
        closed.set()  # stops the model at its next token if we leave before it finished
    error = outcome.get("error")
    if isinstance(error, H.Superseded) or (error is None and should_stop()):
        yield tuple(gr.skip() for _ in range(RUN_OUTPUTS + 1))  # stale: the newer run draws
        return
    if error is not None:
        raise error
    outputs = _run_outputs(outcome["view"], session)
    if on_final is not None:
        on_final(outputs)
    yield outputs


@_guard
def api_run(prompt, program_text, expected, model, exact=False, session=None):
    """`/run` for API clients: one complete answer per call, whatever else the client runs."""
    yield from _stream_run(prompt, program_text, expected, exact, model, session, lambda: False)


@_guard
def page_run(auto, prompt, program_text, expected, exact, model, session, request: gr.Request = None,
             claim: bool = False):
    """The page's run after an edit (when auto-run is on): says what it runs
    at once, and stops, drawing nothing, when a newer edit or run of the page
    comes (RunTickets). `claim`: the user asked for it (Run), so its program
    is the page's even if typed without Enter."""
    if not auto or not (prompt or "").strip():
        yield tuple(gr.skip() for _ in range(RUN_OUTPUTS + 1))
        return
    page = _page(request)
    session = session if isinstance(session, Session) else Session()
    program = H.parse_program(program_text, get_model(model).num_layers).format()
    key = (prompt, program, H.check_expected(expected), bool(exact), model)
    should_stop = RUN_TICKETS.start(page, program, claim=claim) if page else (lambda: False)
    if should_stop is None:  # the editor moved on before this run began: its own run follows
        yield tuple(gr.skip() for _ in range(RUN_OUTPUTS + 1))
        return
    if not claim and session.shown is not None and session.shown[0] == key:
        yield (*session.shown[1], session)  # already drawn: show it again, nothing to run
        return

    def remember(outputs):
        session.shown = (key, outputs[:-1])

    yield _pending_outputs(program)
    yield from _stream_run(prompt, program, expected, exact, model, session, should_stop, remember)


def run_now(prompt, program_text, expected, exact, model, session, request: gr.Request = None):
    """Run, a lesson, a new expected answer: a page run whether or not auto-run is on."""
    yield from page_run(True, prompt, program_text, expected, exact, model, session, request, claim=True)


@_guard
def on_load(session, request: gr.Request):
    """Restore prompt, expected answer, program and model from the page URL;
    without a prompt there, open on lesson 1 (loaded, then run)."""
    state = H.decode_url_state(dict(request.query_params) if request else {})
    model = state.get("model") or default_model()
    try:
        lm = get_model(model)
    except InputError as exc:
        _warn(f"{exc} Using {default_model()}.")
        model, lm = default_model(), get_model(default_model())
    card = gr.update(value="", visible=False)
    lessons = H.learn_examples(model)
    if "prompt" not in state and lessons:
        state = {"prompt": lessons[0]["prompt"], "expected": lessons[0]["expected"], "program": lessons[0]["program"]}
        card = gr.update(value=H.lesson_card(lessons[0], 1), visible=True)
    try:
        program = H.parse_program(state.get("program", "full"), lm.num_layers)
    except InputError as exc:
        _warn(f"The link's program was ignored: {exc}")
        program = H.Program.full(lm.num_layers)
    return (model, state.get("prompt", ""), state.get("expected", ""), H.model_status(lm), card,
            *_editor_outputs(program, request), session if isinstance(session, Session) else Session())


# ----------------------------------------------------------------- layout
def _model_row():
    with gr.Row(equal_height=True):
        with gr.Column(scale=2, min_width=240):
            model = gr.Dropdown(allowed_models(), value=default_model(), label="Model",
                                allow_custom_value=any_model_allowed())
        with gr.Column(scale=3, min_width=300):
            status = gr.Markdown("Loading the model…", elem_id="status")
    return model, status


def _prompt_column():
    with gr.Column(scale=5, min_width=300):
        example = gr.Dropdown(EXAMPLE_LABELS, value=None, label="Examples (few-shot task items, or free text)")
        prompt = gr.Textbox(label="Prompt", lines=4, max_lines=12, elem_id="prompt",
                            placeholder="Ask anything, or pick an example. Few-shot prompts end with 'A:'.")
        with gr.Row(equal_height=True):
            expected = gr.Textbox(label="Expected answer (optional: marks answers ✓/✗; Enter to re-mark)",
                                  elem_id="expected", scale=4, min_width=200)
            exact = gr.Checkbox(False, label="exact match", info="free text: the answer must be it, not contain it",
                                elem_id="exact", scale=2, min_width=200)
        with gr.Row():
            predict = gr.Button("Predict program", elem_id="predict", min_width=120)
            run = gr.Button("Run", variant="primary", elem_id="run", min_width=80)
            auto = gr.Checkbox(True, label="auto-run after each edit", elem_id="auto", min_width=120)
            copy = gr.Button("Copy link", elem_id="copy-link", size="sm", min_width=100)
    return example, prompt, expected, exact, predict, run, auto, copy


def _side_column():
    """The loaded lesson's card (hidden when none is loaded), the router's ranking and the suggestions."""
    with gr.Column(scale=4, min_width=300):
        lesson = gr.Markdown(visible=False, elem_id="lesson")
        gr.Markdown("#### Router's ranked programs, then suggestions")
        table = gr.Dataframe(headers=H.PREDICT_COLUMNS, datatype=["number", "str", "number", "number", "str"],
                             interactive=False, type="array", max_height=220, elem_id="predictions")
        message = gr.Markdown("Press **Predict program** to ask the router; its score is the log-probability it "
                              "gives a program (≤ 0, higher = more confident). Programs marked *suggested* need no "
                              "router and are verified to keep the full program's answer.", elem_id="predict-message")
    return lesson, table, message


def _editor():
    gr.Markdown("### Program editor")
    with gr.Row(equal_height=True):
        preset = gr.Dropdown([(label, key) for key, label in H.PRESETS.items()], value="full", label="Preset",
                             scale=3, min_width=220, elem_id="preset")
        n = gr.Number(4, label="n", precision=0, minimum=1, scale=1, min_width=90, visible=False, elem_id="preset-n")
        a = gr.Number(20, label="a", precision=0, minimum=0, scale=1, min_width=90, visible=False, elem_id="preset-a")
        b = gr.Number(29, label="b", precision=0, minimum=0, scale=1, min_width=90, visible=False, elem_id="preset-b")
        r = gr.Number(2, label="r", precision=0, minimum=1, scale=1, min_width=90, visible=False, elem_id="preset-r")
        apply = gr.Button("Apply preset", scale=1, min_width=110, elem_id="apply-preset")
    with gr.Row(equal_height=True):
        text = gr.Textbox(label="Program (text form, e.g. 0-11, 12-15x2, 16-29 — press Enter to apply)",
                          scale=5, min_width=240, elem_id="program-text")
        download = gr.DownloadButton("⬇ Program JSON", scale=1, size="md", min_width=120)
        upload = gr.UploadButton("⬆ Upload JSON", file_types=[".json"], type="binary", scale=1, size="md",
                                 min_width=120)
    with gr.Row():
        with gr.Column(scale=2, min_width=240):
            grid = gr.Dataframe(headers=H.GRID_HEADERS, datatype=["number", "bool", "number"], type="array",
                                interactive=True, static_columns=[0], max_height=2000, label="Layer grid",
                                elem_id="grid")
            note = gr.Markdown(elem_id="grid-note")
        with gr.Column(scale=3, min_width=300):
            roll = gr.Plot(label="Program: steps × layers", elem_id="roll", show_label=False)
            gr.Markdown(figures.CAPTIONS["program"], elem_classes="caption")
    return preset, n, a, b, r, apply, text, download, upload, grid, note, roll


def _answers():
    """Both answers side by side, changed words highlighted, and the cost summary with the stamp."""
    with gr.Row():
        with gr.Column(min_width=280):
            full_head = gr.Markdown("Full program", elem_classes="answer-head", elem_id="head-full")
            full = gr.HighlightedText(label="Full program's answer (words the edit changes in grey)",
                                      color_map={"differs": "#C8C8C8"}, combine_adjacent=True, show_legend=False,
                                      show_inline_category=False, elem_id="answer-full")
        with gr.Column(min_width=280):
            edited_head = gr.Markdown("Edited program", elem_classes="answer-head", elem_id="head-edited")
            edited = gr.HighlightedText(label="Edited program's answer (changed words highlighted)",
                                        color_map={"changed": "#F58518"}, combine_adjacent=True,
                                        show_legend=False, show_inline_category=False, elem_id="answer-edited")
    summary = gr.Markdown("Press **Run** to answer the prompt under the full and the edited program.",
                          elem_id="summary")
    return full_head, full, edited_head, edited, summary


TAB_NAMES = {"similarity": "Similarity", "logit_lens": "Logit lens", "answer_probability": "Answer probability",
             "block_influence": "Block influence", "alignment": "Alignment"}


def _analysis_tabs():
    gr.Markdown("### What happens inside")
    gr.Markdown("Step labels read **s12·L15**: step 12 of the program runs layer 15 (a looped layer appears at "
                "several steps); **emb** is the embeddings, before any layer. *Layer calls/token* counts the "
                "steps, each looped run included. The camera icon on a chart saves it as PNG.",
                elem_id="labels-note")
    charts = gr.Markdown(elem_id="charts-head", elem_classes="caption")
    plots = []
    with gr.Tabs(overflow_behavior="wrap"):
        for name in PLOTS:
            with gr.Tab(TAB_NAMES[name]):
                gr.Markdown(figures.CAPTIONS[name], elem_classes="caption")
                plots.append(gr.Plot(elem_id=f"plot-{name.replace('_', '-')}", show_label=False))
    with gr.Row():
        csv = gr.DownloadButton("⬇ Per-step data (CSV)", size="sm", elem_id="download-csv", min_width=160)
        data = gr.DownloadButton("⬇ Whole run (JSON)", size="sm", elem_id="download-json", min_width=160)
    with gr.Accordion("Raw numbers (the JSON download)", open=False):
        details = gr.JSON(show_label=False, elem_id="details")
    return charts, plots, csv, data, details


def _search_tab():
    with gr.Tab("Search", id="search"):
        gr.Markdown("Find **shorter programs** that still give the expected answer for the prompt on the Explore "
                    "tab (checked as the marks there are). Greedy drops blocks of layers one edit at a time; MCTS "
                    "explores skip / keep / repeat segments as in the PoLar paper. Programs are checked by teacher "
                    "forcing or decoding, then by decoding.")
        with gr.Row(equal_height=True):
            method = gr.Radio(list(H.SEARCH_METHODS), value="greedy", label="Method", scale=2, min_width=160)
            budget = gr.Slider(10, 400, value=120, step=10, label="Budget (programs scored)", scale=3, min_width=200,
                               elem_id="search-budget")
            go_ = gr.Button("Find shorter programs", variant="primary", scale=2, min_width=160,
                            elem_id="search-button")
            stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="search-stop")
        message = gr.Markdown(f"A search stops after {Limits.from_env().job_seconds:g} s at the latest and shows "
                              "what it found.")
        table = gr.Dataframe(headers=H.SEARCH_COLUMNS, type="array",
                             datatype=["number", "str", "number", "str", "str"], interactive=False,
                             max_height=360, elem_id="search-results")
    return method, budget, go_, stop, message, table


def _evaluate_tab():
    with gr.Tab("Evaluate", id="evaluate"):
        gr.Markdown("Accuracy against layer calls per token over a task family. **Top-1** is what a deployed "
                    "router would run; best-of-k needs the answer to choose, so it is an *oracle* (hollow markers).")
        with gr.Row(equal_height=True):
            family = gr.Dropdown(list(FAMILIES), value="capitals", label="Task family", scale=2, min_width=160)
            n_items = gr.Slider(5, 100, value=20, step=5, label="Items (test split)", scale=2, min_width=160,
                                elem_id="eval-items")
            drop = gr.Slider(0, 20, value=3, step=1, scale=2, min_width=200,
                             label="Layers dropped by static baselines (when there is no router, or it keeps "
                                   "every layer)")
            go_ = gr.Button("Evaluate", variant="primary", scale=1, min_width=100, elem_id="evaluate-button")
            stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="evaluate-stop")
        notes = gr.Markdown(elem_id="eval-notes")
        table = gr.Dataframe(headers=H.EVAL_COLUMNS, type="array", interactive=False, wrap=True, elem_id="eval-table")
        plot = gr.Plot(show_label=False, elem_id="eval-plot")
        gr.Markdown(figures.CAPTIONS["accuracy"], elem_classes="caption")
        with gr.Accordion("Markdown report", open=False):
            report = gr.Markdown()
    return family, n_items, drop, go_, stop, table, report, plot, notes


def _learn_tab():
    """Per model, one card per curated lesson, each with a button that loads it (and its model)."""
    with gr.Tab("Learn", id="learn"):
        gr.Markdown("A short tour for teaching **layer redundancy**. Each lesson was chosen by measurement "
                    "(`python -m app.curate_examples`), on each model, on the same question where the model "
                    "answers it: compare how many layers each model can spare, and where its answer appears. "
                    "Load one: the Explore tab opens with its card beside the answers and figures.")
        buttons = []
        models = [m for m in H.lesson_models() if m in allowed_models()]
        if not models:
            gr.Markdown("_No curated lessons found (app/learn/)._")
        for model in models:
            gr.Markdown(f"### On {model}")
            for i, ex in enumerate(H.learn_examples(model)):
                key = f"{i}" if model == DEFAULT_MODEL else f"{_slug(model)}-{i}"
                with gr.Group():
                    gr.Markdown(H.lesson_card(ex, i + 1), elem_classes="learn-card")
                    buttons.append((model, i, key, gr.Button(f"Load lesson {i + 1}", size="sm", elem_id=f"learn-{key}")))
    return buttons


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def build_demo() -> gr.Blocks:
    """The whole page. Builds components only: the model loads on first use."""
    with gr.Blocks(title="PoLar Explorer", delete_cache=gradio_cache()) as demo:
        # A page's memory (its last run, to redraw it) is dropped after SESSION_SECONDS without a change,
        # so sessions that are never closed (API clients, a client opening many) do not pile up.
        session = gr.State(Session(), time_to_live=SESSION_SECONDS)
        gr.Markdown("# PoLar Explorer\nSee how a language model spends its layers: skip them, loop them, "
                    "and watch the answer change. ([PoLar](https://arxiv.org/abs/2606.06574))", elem_id="title")
        model, status = _model_row()
        with gr.Tabs(selected="explore", overflow_behavior="wrap", elem_id="main-tabs") as tabs:
            with gr.Tab("Explore", id="explore"):
                with gr.Row():
                    example, prompt, expected, exact, predict, run, auto, copy = _prompt_column()
                    lesson, table, message = _side_column()
                answers = _answers()
                preset, n, a, b, r, apply, text, download, upload, grid, note, roll = _editor()
                charts, plots, csv, data, details = _analysis_tabs()
            s_method, s_budget, s_go, s_stop, s_message, s_table = _search_tab()
            e_family, e_items, e_drop, e_go, e_stop, e_table, e_report, e_plot, e_notes = _evaluate_tab()
            learn_buttons = _learn_tab()
        # Not shown: the API's twins of page events (see api_twin), and the row a click picked.
        api_buttons = [gr.Button(visible=False) for _ in range(3)]
        pred_row, search_row = gr.Number(visible=False, precision=0), gr.Number(visible=False, precision=0)

        editor = [text, grid, note, roll, download]
        run_in = [prompt, text, expected, exact, model, session]
        run_out = [*answers, charts, *plots, csv, data, details, session]
        summary, edited_head, edited = answers[-1], answers[2], answers[3]
        runs = dict(concurrency_id="run", trigger_mode="always_last", api_visibility="private",
                    show_progress_on=summary)

        def then_run(dep, wait=True):
            """After an editor change: say at once what will run, then run it (when auto-run is on)."""
            if wait:
                dep.success(None, [auto, text], [edited_head, edited], js=PENDING_JS)
            return dep.success(page_run, [auto, *run_in], run_out, **runs)

        def edit_event(trigger, fn, inputs, api_name, outputs=editor):
            private = {} if api_name else {"api_visibility": "private"}
            return then_run(trigger(fn, inputs, outputs, api_name=api_name, trigger_mode="always_last",
                                    show_progress_on=text, **private))

        then_run(demo.load(on_load, [session], [model, prompt, expected, status, lesson, *editor, session],
                           api_name="load_view"), wait=False)
        for box in (prompt, text, expected, model):  # the address bar follows every change, so a link reproduces it
            box.change(None, [prompt, text, expected, model], None, js=URL_JS)
        copy.click(None, None, None, js=COPY_JS)
        then_run(model.input(on_model, [model], [status, *editor], api_name="model_status"))  # not .change: the URL sets it
        then_run(example.input(on_example, [example], [prompt, expected, lesson], api_name="example"), wait=False)
        # The page's text and grid events leave the box being edited alone; API
        # clients get every view back from twins of the same handlers.
        edit_event(text.submit, on_text_page, [text, model], None)
        edit_event(grid.input, on_grid_page, [grid, text, model], None)
        api_buttons[0].click(on_text, [text, model], editor, api_name="set_program_text")
        api_buttons[1].click(on_grid, [grid, text, model], editor, api_name="set_program_grid")
        edit_event(apply.click, on_preset, [preset, n, a, b, r, model], "apply_preset")
        preset.change(on_preset_choice, [preset], [n, a, b, r], api_visibility="private", queue=False)
        edit_event(upload.upload, on_upload, [upload, model], "upload_program")
        for trigger in (expected.submit, exact.input):  # a new expected answer or rule re-marks the answers
            trigger(run_now, run_in, run_out, **runs)
        then_run(table.select(clicked_row, None, pred_row, api_visibility="private")
                 .success(on_pick_row, [table, pred_row, model], editor, api_name="pick_prediction",
                          show_progress_on=text))
        then_run(predict.click(on_predict, [prompt, model], [table, message, *editor], api_name="predict",
                               show_progress_on=[table, text]))
        # Searches and evaluations run minutes: one at a time, beside the runs' own slots.
        jobs = dict(concurrency_id="job", concurrency_limit=1)
        searching = s_go.click(on_search, [prompt, expected, s_method, s_budget, model, exact], [s_table, s_message],
                               api_name="search", **jobs)
        s_stop.click(None, None, None, cancels=[searching], api_visibility="private")
        then_run(s_table.select(clicked_row, None, search_row, api_visibility="private")
                 .success(on_pick_row, [s_table, search_row, model], editor, api_name="pick_search_result",
                          show_progress_on=text)
                 .success(lambda: gr.Tabs(selected="explore"), None, tabs, api_visibility="private"))
        evaluating = e_go.click(on_evaluate, [e_family, e_items, e_drop, model], [e_table, e_report, e_plot, e_notes],
                                api_name="evaluate", **jobs)
        e_stop.click(None, None, None, cancels=[evaluating], api_visibility="private")
        for lesson_model, i, key, button in learn_buttons:
            loaded = button.click(functools.partial(on_learn, lesson_model, i), None,
                                  [model, status, prompt, expected, *editor, lesson, tabs],
                                  api_name=f"learn_example_{key.replace('-', '_')}")
            loaded.success(None, None, None, js=SCROLL_JS)  # the card and the answers in view
            loaded.success(run_now, run_in, run_out, **runs)
        run.click(run_now, run_in, run_out, **runs)
        api_buttons[2].click(api_run, [prompt, text, expected, model, exact, session], run_out, api_name="run",
                             concurrency_id="run")
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
