"""The app served on a free loopback port, shared by the client and browser tests."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUR_CODE = (str(ROOT / "app") + os.sep, str(ROOT / "polar_core") + os.sep)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _handler_still_running() -> bool:
    """Whether another thread is inside the app or the library.

    A cancelled event leaves the queue at once, but its handler runs on in
    its worker thread until it returns: the queue alone does not show it.
    """
    me = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        while frame is not None:
            if frame.f_code.co_filename.startswith(OUR_CODE):
                return True
            frame = frame.f_back
    return False


def _wait_until_idle(demo, timeout_s: float = 120.0) -> None:
    """Wait for running events (and handlers of cancelled ones) to finish.

    A test may end while an event it triggered (an auto-rerun after an edit)
    still runs; the interpreter exiting under a thread that is inside torch
    aborts the process, so the server is closed only once it is idle.
    """
    queue = getattr(demo, "_queue", None)
    deadline = time.monotonic() + timeout_s
    while queue is not None and time.monotonic() < deadline:
        queued = any(len(q.queue) for q in queue.event_queue_per_concurrency_id.values())
        if not any(queue.active_jobs) and not queued and not _handler_still_running():
            return
        time.sleep(0.2)


@pytest.fixture(scope="session")
def app_url(real_lm):
    """The default app on a free 127.0.0.1 port, launched once; closed when idle."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.ui import build_demo, launch_kwargs

    demo = build_demo()
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                **launch_kwargs())
    try:
        yield demo.local_url
    finally:
        time.sleep(0.5)  # let a debounced event triggered at the very end reach the queue
        _wait_until_idle(demo)
        demo.close()


# The browser tests' Chromium: the system's (Playwright's own download does not work here).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per browser-test module (skips where it is not installed)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install -y chromium` (Playwright's own browser "
                    "download does not work here)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
