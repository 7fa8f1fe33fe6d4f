"""Router checkpoints: a folder with config.json (RouterConfig) and
model.safetensors, never pickle; the shipped ones live in polar_core/assets/router/."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from polar_core.assets import asset_path
from polar_core.engine.models import LoadedModel
from polar_core.study.router.config import FORMAT, RouterConfig, RouterError
from polar_core.study.router.network import Router

ASSET_ROOT = asset_path("router")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MAX_CONFIG_BYTES = 65536


def save_router(router: Router, directory: str | os.PathLike) -> Path:
    """Write config.json and model.safetensors into directory (replaced atomically)."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(router.config.to_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in router.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        # mkdtemp makes a private folder; give it the usual umask permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_router(directory: str | os.PathLike, lm: LoadedModel | None = None) -> Router:
    """Read a router checkpoint; with lm, check that it was made for that model.

    Raises:
        RouterError: missing or corrupted files, or a checkpoint for another model.
    """
    folder = Path(directory)
    try:
        with open(folder / CONFIG_FILE, "rb") as f:  # a byte cap: a config is a few hundred bytes
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"more than {MAX_CONFIG_BYTES} bytes")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise RouterError(f"cannot read router config {folder / CONFIG_FILE}: {err}") from err
    config = RouterConfig.from_dict(data)
    if lm is not None:
        check_compatible(config, lm)
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise RouterError(f"cannot read router weights {folder / WEIGHTS_FILE}: {err}") from err
    try:  # the config's sizes are bounded (RouterConfig), but memory may still run out
        router = Router(config)
    except (RuntimeError, MemoryError, ValueError) as err:
        raise RouterError(f"cannot build the router of {folder / CONFIG_FILE}: {err}") from err
    expected = {k: tuple(v.shape) for k, v in router.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise RouterError(f"router weights in {folder} do not match its config.json (first differences: {diff})")
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise RouterError(f"router weights in {folder} hold NaN or infinite values")
    router.load_state_dict(state)
    return router.eval()


def check_compatible(config: RouterConfig, lm: LoadedModel) -> None:
    """Raise RouterError unless a router with this config can route lm."""
    if config.num_layers != lm.num_layers or config.feature_size != lm.adapter.hidden_size:
        raise RouterError(
            f"router was trained for {config.model_name!r} ({config.num_layers} layers, hidden size "
            f"{config.feature_size}); {lm.name!r} has {lm.num_layers} layers, hidden size {lm.adapter.hidden_size}"
        )
    if config.model_name != lm.name:
        warnings.warn(f"router was trained for {config.model_name!r}, used with {lm.name!r} (same shape)", stacklevel=3)


def default_router_path(model_name: str) -> Path:
    """Where the shipped router for a model lives: polar_core/assets/router/<model>/."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", model_name).strip(".-") or "model"
    return ASSET_ROOT / safe


def load_default_router(lm: LoadedModel) -> Router | None:
    """The shipped router for lm, or None when none ships for it."""
    folder = default_router_path(lm.name)
    if not (folder / CONFIG_FILE).is_file():
        return None
    return load_router(folder, lm)
