"""Which models the app may load, and what one browser session remembers.

The loaded model is shared read-only by every user (``load_model`` caches it
per spec); what differs per user (the baseline trace of their prompt) lives in
a ``Session`` kept in ``gr.State``, never in a module variable, since module
variables are shared by all users.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from polar_core.engine.adapter import UnsupportedModelError
from polar_core.engine.generate import Trace
from polar_core.engine.models import DEFAULT_MODEL, LoadedModel, installed_models, load_model

MODELS_ENV = "POLAR_MODELS"  # comma-separated allow-list of model specs
ANY_MODEL_ENV = "POLAR_ALLOW_ANY_MODEL"  # "1": any hub id may be typed in
MAX_SPEC_CHARS = 200


class InputError(ValueError):
    """Bad input from the page (or an API client); its message is shown to the user."""


def allowed_models() -> list[str]:
    """The allow-list from $POLAR_MODELS (default: the embedded models installed here, SmolLM2 first)."""
    raw = os.environ.get(MODELS_ENV, "")
    specs = [s.strip() for s in raw.split(",") if s.strip()]
    return list(dict.fromkeys(specs)) or installed_models() or [DEFAULT_MODEL]


def any_model_allowed() -> bool:
    """Whether arbitrary hub ids may be loaded ($POLAR_ALLOW_ANY_MODEL=1)."""
    return os.environ.get(ANY_MODEL_ENV, "").strip() == "1"


def default_model() -> str:
    return allowed_models()[0]


def check_model_spec(spec: str | None) -> str:
    """Return the spec if the page may load it, else raise InputError.

    Without $POLAR_ALLOW_ANY_MODEL only the allow-list is accepted; with it, a
    hub id ``org/name`` is accepted too, but never a local path: a page must
    not make the server read files it names.
    """
    spec = (spec or "").strip() or default_model()
    if spec in allowed_models():
        return spec
    if not any_model_allowed():
        raise InputError(f"model {spec!r} is not offered here; choose one of: {', '.join(allowed_models())}")
    is_hub_id = (
        len(spec) <= MAX_SPEC_CHARS and spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
        and ".." not in spec and all(c.isalnum() or c in "-_./" for c in spec)
    )
    if not is_hub_id:
        raise InputError(f"{spec[:60]!r} is not a hub id of the form org/name")
    return spec


def get_model(spec: str | None) -> LoadedModel:
    """The shared, cached model for an allowed spec (InputError for a refused one)."""
    spec = check_model_spec(spec)
    try:
        return load_model(spec)
    # ModelLoadError is a RuntimeError (as is running out of memory moving it to
    # the device); an architecture we cannot run layer by layer is refused by the
    # adapter. Either way: show it, keep the page alive.
    except (RuntimeError, UnsupportedModelError) as exc:
        raise InputError(str(exc)) from exc


@dataclass
class Session:
    """Per-user memory: the full-program trace of the last prompt, so an edit
    reruns only the edited program (half the work of rerunning both), the
    last edit's answer on it, a draft for the next edit (edits come in small
    steps), and what the page shows."""

    baseline_key: tuple | None = None
    baseline: Trace | None = None
    last_edit_tokens: list[int] = field(default_factory=list)
    # What the page shows now: (what it was run from, the outputs it drew). A
    # second auto-run of the same thing (two edits of a burst that both end on
    # the last program) redraws these instead of running and flickering again.
    shown: tuple | None = None

    def cached_baseline(self, key: tuple):
        return self.baseline if self.baseline_key == key else None

    def remember_baseline(self, key: tuple, trace) -> None:
        self.baseline_key, self.baseline, self.last_edit_tokens = key, trace, []


class RunTickets:
    """Which run of each browser page may draw: the latest, of the program its editor holds.

    An editor change records the page's program (`edited`) and stops the
    run in progress. A run of the page (`start`) takes a ticket; it stops
    (its `should_stop` turns true, so a stale generation ends at its next
    token instead of holding a model slot for seconds, and its result is
    never drawn) once a newer run of the page starts or the editor holds
    another program. A run that starts with a program the editor no longer
    holds gets no ticket at all: it must not stop the newer one. Only small
    values live here, keyed by Gradio's session hash; the oldest pages are
    forgotten past `capacity`. API calls (`/run` from gradio_client) take no
    ticket: concurrent jobs of one client each get their whole answer.
    """

    def __init__(self, capacity: int = 4096):
        self._latest: OrderedDict[str, tuple[int, str | None]] = OrderedDict()  # page -> (ticket, program)
        self._lock = threading.Lock()
        self.capacity = capacity

    def _set(self, page: str, program: str | None) -> int:
        ticket = self._latest.get(page, (0, None))[0] + 1
        self._latest[page] = (ticket, program)
        self._latest.move_to_end(page)
        while len(self._latest) > self.capacity:
            self._latest.popitem(last=False)
        return ticket

    def edited(self, page: str | None, program: str) -> None:
        """The page's editor now holds `program` (canonical text): what runs now is stale."""
        if page:
            with self._lock:
                self._set(page, program)

    def start(self, page: str, program: str, *, claim: bool = False) -> Callable[[], bool] | None:
        """A run of `program` on the page: its should_stop, or None when the
        editor already holds another program. `claim`: the user asked for
        this run (Run, a lesson), so its program becomes the page's."""
        with self._lock:
            held = self._latest.get(page, (0, None))[1]
            if not claim and held is not None and held != program:
                return None
            ticket = self._set(page, program if claim else held)
        return lambda: self._latest.get(page, (None, None))[0] != ticket


RUN_TICKETS = RunTickets()
