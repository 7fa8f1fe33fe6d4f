"""Loading is per model (issue 14): a loaded model is served without waiting on
any lock, a load in progress blocks only requests for that model, and a failed
load is answered from memory for a while.

Regression: one global lock around every `load_model` call made a cheap edit
on the loaded model wait 21.7 s while another user's hub id failed to load.
"""
from __future__ import annotations

import threading
import time

import pytest
from tiny import build_tiny

from polar_core.engine import models


@pytest.fixture
def fake_loader(monkeypatch):
    """`_load` replaced: "slow" hangs until released, "bad" fails, anything else is a tiny model."""
    release, started, calls = threading.Event(), threading.Event(), []
    tiny = build_tiny("llama")

    def load(spec, dtype):
        calls.append(spec)
        if spec == "slow":
            started.set()
            assert release.wait(30), "the test never released the slow load"
        if spec == "bad":
            raise OSError("no such model")
        return tiny.model, None

    monkeypatch.setattr(models, "_load", load)
    monkeypatch.setattr(models, "_speed_up_on_cpu", lambda model, dtype: ({}, None))
    monkeypatch.setattr(models, "_registry", models._Registry())  # nothing loaded yet
    yield release, started, calls
    release.set()


def _in_thread(spec):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", models.load_model(spec, device="cpu")),
                              daemon=True)
    thread.start()
    return thread, out


def test_a_hanging_load_blocks_no_other_model(fake_loader):
    release, started, calls = fake_loader
    loaded = models.load_model("fast", device="cpu")
    slow, out = _in_thread("slow")
    assert started.wait(10)
    t0 = time.perf_counter()
    assert models.load_model("fast", device="cpu") is loaded  # already loaded: no lock at all
    other = models.load_model("other", device="cpu")  # a first load of another model proceeds too
    assert time.perf_counter() - t0 < 5 and other.name == "other"
    assert slow.is_alive()  # while the slow load still hangs
    second, out2 = _in_thread("slow")  # waits for the same load, starts no other
    release.set()
    slow.join(10), second.join(10)
    assert out["value"] is out2["value"] and calls.count("slow") == 1


def test_a_failed_load_is_remembered_briefly(fake_loader, monkeypatch):
    _, _, calls = fake_loader
    for _ in range(3):
        with pytest.raises(models.ModelLoadError, match="no such model"):
            models.load_model("bad", device="cpu")
    assert calls.count("bad") == 1  # the second and third answers came from memory
    clock = time.monotonic() + models.FAILED_LOAD_SECONDS + 1
    monkeypatch.setattr(models.time, "monotonic", lambda: clock)
    with pytest.raises(models.ModelLoadError):
        models.load_model("bad", device="cpu")
    assert calls.count("bad") == 2  # retried once the memory expired
