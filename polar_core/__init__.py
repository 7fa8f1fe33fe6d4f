"""polar_core: run, study and predict programs of layers (PoLar).

The library behind PoLar Explorer; it never imports the UI. Its public API:

    lm = polar_core.load_model()                       # the embedded SmolLM2-135M-Instruct
    program = polar_core.Program.parse("0-11, 12-15x2, 16-29", lm.num_layers)
    trace = polar_core.generate(lm, ["What is the capital of France?"], program, capture="last")[0]
    base = polar_core.generate(lm, ["What is the capital of France?"], None, capture="last")[0]
    result = polar_core.analyze(lm, trace, base)       # similarity, logit lens, answer change
    found = polar_core.find_programs(lm, prompt, "Paris")   # shorter valid programs, verified
    router = polar_core.load_default_router(lm)
    ranked = polar_core.predict_programs(lm, router, prompt)   # the full program first for an unfamiliar prompt
    routed = polar_core.route_batch(lm, router, [prompt])[0]  # .ranked, .familiarity, .threshold, .gated

Packages: polar_core.engine runs programs, polar_core.study studies them
(docs/ARCHITECTURE.md). Names are imported on first use, so importing
polar_core.program alone stays light.
"""
from __future__ import annotations

import importlib

_API = {
    "Program": "polar_core.program",
    "ProgramError": "polar_core.program",
    "load_model": "polar_core.engine.models",
    "LoadedModel": "polar_core.engine.models",
    "generate": "polar_core.engine.generate",
    "Trace": "polar_core.engine.generate",
    "Sampling": "polar_core.engine.generate",
    "Stopping": "polar_core.engine.generate",
    "analyze": "polar_core.study.analysis",
    "find_programs": "polar_core.study.find",
    "search_task_items": "polar_core.study.find",
    "make_search": "polar_core.study.search",
    "load_default_router": "polar_core.study.router",
    "load_router": "polar_core.study.router",
    "predict_programs": "polar_core.study.router",
    "route_batch": "polar_core.study.router",
    "train_router": "polar_core.study.router",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'polar_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
