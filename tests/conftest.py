"""Shared fixtures: tiny random models of every supported family, and the real
default model (loaded once per session, only by tests marked real_model)."""
from __future__ import annotations

import os

import pytest
import torch

# Tests must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
# Triton kernels are interpreted on a CPU-only machine; triton decides when
# `kernels` is first imported (polar_core.study.analysis imports it), so this
# comes first. The torch paths serve CPU tensors either way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny import build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama():
    return build_tiny("llama")


def _embedded(name: str):
    """An embedded real model, loaded once per session; skipped where its package is missing."""
    from polar_core.engine.adapter import SeamError
    from polar_core.engine.models import installed_models, load_model

    if name not in installed_models():
        pytest.skip(f"the package of {name} is not installed (make setup installs it)")
    try:
        return load_model(name, device="cpu")
    except SeamError as exc:
        pytest.skip(f"seam to transformers broken (see test_seam.py): {exc}")


@pytest.fixture(scope="session")
def real_gemma():
    """Gemma 3 270M (base model, 18 layers), assembled from its PyPI chunk packages."""
    return _embedded("gemma3-270m")


@pytest.fixture(scope="session")
def real_lm():
    """The embedded default model (SmolLM2-135M-Instruct), loaded once."""
    from polar_core.engine.models import DEFAULT_MODEL

    return _embedded(DEFAULT_MODEL)
