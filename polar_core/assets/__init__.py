"""The data that ships with the library, found where the package is installed.

    tasks/        the task suite's word lists and its measured baseline accuracy
    router/       trained router checkpoints, one folder per model (config.json + safetensors)
    redundancy/   measured layer redundancy per model (block influence, Gromov blocks)
    supervision/  searched programs per task item (the routers' training data)
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path


def asset_path(*parts: str) -> Path:
    """The path of a shipped file or folder, e.g. ``asset_path("tasks", "capitals.json")``."""
    # The package is installed as plain files (never zipped: the C source is
    # compiled from it too), so the resource root is a real directory.
    return Path(str(importlib.resources.files(__name__))).joinpath(*parts)
