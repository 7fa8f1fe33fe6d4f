"""The one seam to transformers' internals: uniform access to the parts a
program of layers needs, for every supported architecture.

Everything that depends on transformers' private calling conventions lives
here and nowhere else: how a decoder layer is called (argument names, output
tuple), the cache object its attention writes into (`update`), rotary
embeddings, the attention-mask rules, the final norm and LM head, and the
attention-function registry (`register_attention`, `sdpa_attention`). The executor
and the scorers call `Adapter.positions` and `Adapter.run_layer` and never
touch a model's `forward`.

`check_seam` pins exactly what we rely on (one `update` per layer call with
keys and values of the expected shapes, nothing else read from the cache, a
hidden-state tensor back); `get_adapter` runs it on layer 0 of every model it
wraps, so an upstream change is one error naming what changed, not a
TypeError deep inside a generation. Supported families are listed in one
place, `SUPPORTED_FAMILIES`; anything else gets an `UnsupportedModelError`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import torch
import transformers
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# model_type -> whether its RMSNorm multiplies by (1 + weight) (Gemma) rather than weight.
SUPPORTED_FAMILIES: dict[str, dict] = {
    "llama": {"norm_offset": 0.0},  # SmolLM2, Llama 3.x
    "mistral": {"norm_offset": 0.0},
    "qwen2": {"norm_offset": 0.0},  # Qwen2, Qwen2.5
    "qwen3": {"norm_offset": 0.0},
    "gemma2": {"norm_offset": 1.0},
    "gemma3_text": {"norm_offset": 1.0},
    "phi3": {"norm_offset": 0.0},
}

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


# transformers' SDPA attention function (same signature as any registered one).
sdpa_attention = sdpa_attention_forward


def register_attention(name: str, function) -> str:
    """Make `function` an attention implementation transformers knows by
    `name`, with SDPA's masks (idempotent); returns the name."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


class UnsupportedModelError(ValueError):
    """The model's architecture is not one we know how to run layer by layer."""


class SeamError(UnsupportedModelError):
    """transformers no longer calls a decoder layer or its cache the way the seam relies on."""


class KVSlot(Protocol):
    """One program step's own KV-cache slot (the executor's `StepCache` gives one per step)."""

    def write(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (b, H_kv, t, Dh); return all cached ones (b, H_kv, L, Dh)."""
        ...


class _AttentionCache:
    """What a decoder layer's attention sees as its cache: one step's slot.

    transformers calls `update(key_states, value_states, layer_idx, ...)`; the
    extra arguments have changed between releases (`cache_kwargs`, then
    `kwargs=`), so everything after keys and values is accepted and ignored,
    the layer index above all: the slot belongs to the program step, not to
    the layer (a looped layer has one slot per visit).
    """

    __slots__ = ("slot",)

    def __init__(self, slot: KVSlot):
        self.slot = slot

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.slot.write(key_states, value_states)


@dataclass
class Positions:
    """Masks and rotary embeddings for one forward call, per attention type."""

    position_ids: torch.Tensor  # (B, t)
    masks: dict[str, torch.Tensor | None]  # type -> (B, 1, t, L) additive, or None (attend to all)
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # type -> (cos, sin), each (B, t, Dh)


@dataclass(frozen=True)
class Adapter:
    """Uniform, read-only handles on one loaded causal LM.

    Holds references to the model's own modules; it stores nothing on them.
    """

    family: str
    model: nn.Module  # the *ForCausalLM
    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    rotary_emb: nn.Module
    layer_types: tuple[str, ...]  # per layer: FULL_ATTENTION or SLIDING_ATTENTION
    sliding_window: int | None
    final_logit_softcap: float | None
    norm_offset: float
    rope_per_layer_type: bool  # Gemma 3: local and global layers use different RoPE bases
    cache_argument: str  # the decoder layer's name for its cache: "cache" (>= 5.24) or "past_key_values"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def norm_eps(self) -> float:
        norm = self.norm
        return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, including any family-specific scaling (Gemma's sqrt(d))."""
        return self.embed_tokens(input_ids)

    def position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) for each attention type the model uses, keyed by layer type."""
        types = sorted(set(self.layer_types))
        if self.rope_per_layer_type:
            return {t: self.rotary_emb(hidden, position_ids, t) for t in types}
        shared = self.rotary_emb(hidden, position_ids)
        return {t: shared for t in types}

    def positions(self, hidden: torch.Tensor, key_mask: torch.Tensor, q_start: int) -> Positions:
        """Positions, masks and rotary tables for queries hidden (B, t, d) that
        start at cache index `q_start`, over keys key_mask (B, L), 1 = real token."""
        batch, q_len, _ = hidden.shape
        # Left padding: a row's first real token is position 0, as in `generate`.
        all_positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        position_ids = all_positions[:, q_start : q_start + q_len]
        no_padding = bool(key_mask.all())
        masks = {}
        for layer_type in set(self.layer_types):
            window = self.sliding_window if layer_type == SLIDING_ATTENTION else None
            length = q_start + q_len
            if q_len == 1 and no_padding and (window is None or length <= window):
                masks[layer_type] = None  # one new token may attend to everything cached
            else:
                masks[layer_type] = _additive_mask(key_mask, q_start, q_len, window, hidden.dtype)
        return Positions(position_ids, masks, self.position_embeddings(hidden, position_ids))

    def causal_positions(self, hidden: torch.Tensor) -> Positions:
        """Positions for right-padded rows hidden (B, T, d) that start at
        position 0: one table of batch 1 that broadcasts over every row.

        Right padding puts pads after a row's real tokens, where causal
        attention never lets a real token see them, so each row computes
        exactly what it would alone: no per-row mask, no gathered rotary
        tables. With SDPA, full attention gets no mask at all (its causal
        kernel); eager attention and sliding windows get one shared mask.
        """
        length = hidden.shape[1]
        position_ids = torch.arange(length, device=hidden.device)[None]  # (1, T)
        key_mask = torch.ones(1, length, dtype=torch.long, device=hidden.device)
        sdpa = getattr(self.model.config, "_attn_implementation", "sdpa") == "sdpa"
        masks = {}
        for layer_type in set(self.layer_types):
            window = self.sliding_window if layer_type == SLIDING_ATTENTION else None
            if sdpa and (window is None or length <= window):
                masks[layer_type] = None  # SDPA is causal when it gets no mask
            else:
                masks[layer_type] = _additive_mask(key_mask, 0, length, window, hidden.dtype)  # (1, 1, T, T)
        return Positions(position_ids, masks, self.position_embeddings(hidden[:1], position_ids))

    def run_layer(
        self,
        layer: int,
        hidden: torch.Tensor,
        pos: Positions,
        rows: torch.Tensor | None = None,
        slot: KVSlot | None = None,
    ) -> torch.Tensor:
        """Decoder layer `layer` on hidden (b, t, d), for the given rows of the
        batch `pos` was made for (None = all); its attention reads and writes
        `slot` (None = no cache). Returns the new hidden states (b, t, d)."""
        return self._call_layer(layer, hidden, pos, rows, _AttentionCache(slot) if slot is not None else None)

    def _call_layer(self, layer, hidden, pos, rows, cache) -> torch.Tensor:
        layer_type = self.layer_types[layer]
        cos, sin = pos.rope[layer_type]
        out = self.layers[layer](
            hidden,
            attention_mask=_take(pos.masks[layer_type], rows),
            position_ids=_take(pos.position_ids, rows),
            position_embeddings=(_take(cos, rows), _take(sin, rows)),
            use_cache=cache is not None,
            **{self.cache_argument: cache},
        )
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ Gemma's final soft-capping) on hidden states (..., d)."""
        logits = self.lm_head(self.norm(hidden))
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits


def _take(x, rows):
    return x if rows is None or x is None else x[rows]


def _additive_mask(
    key_mask: torch.Tensor, q_start: int, q_len: int, window: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """(B, 1, q_len, L) additive mask: causal, padding, and the sliding window.

    Positions are cache indices, as in transformers, so padding counts in the
    window exactly as it does there. A large negative value (not -inf) keeps
    fully padded query rows finite.
    """
    length = key_mask.shape[1]
    device = key_mask.device
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None]  # (t, 1)
    k = torch.arange(length, device=device)[None, :]  # (1, L)
    allowed = (k <= q)[None] & key_mask[:, None, :].bool()  # (B, t, L)
    if window is not None:
        allowed &= (k > q - window)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _cache_argument(layer: nn.Module, family: str) -> str:
    """The keyword a decoder layer takes its cache by (renamed in transformers 5.24)."""
    names = inspect.signature(layer.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in names:
            return name
    raise SeamError(
        f"{type(layer).__name__} ({family}) takes neither `cache` nor `past_key_values`: "
        f"transformers changed how a decoder layer receives its KV cache; its arguments are {list(names)}"
    )


def _layer_types(config, num_layers: int) -> tuple[str, ...]:
    """Attention type per layer: the config's own list if it has one; otherwise
    sliding everywhere when a window is set (Mistral, Phi-3), else full."""
    types = getattr(config, "layer_types", None)
    if types:
        return tuple(types[:num_layers])
    if getattr(config, "sliding_window", None):
        return (SLIDING_ATTENTION,) * num_layers
    return (FULL_ATTENTION,) * num_layers


def get_adapter(model: nn.Module, *, check: bool = True) -> Adapter:
    """Build the adapter for a loaded *ForCausalLM, or raise naming the unsupported type.

    With `check` (always, but in the seam's own contract tests) one call of
    layer 0 proves the seam still holds for this transformers release.
    """
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    if family not in SUPPORTED_FAMILIES:
        supported = ", ".join(sorted(SUPPORTED_FAMILIES))
        raise UnsupportedModelError(
            f"unsupported model family {family!r} ({type(model).__name__}); supported: {supported}"
        )
    base = getattr(model, "model", None)
    for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if base is None or not hasattr(base, part):
            raise UnsupportedModelError(
                f"model {type(model).__name__} ({family}) has no `model.{part}`; cannot run it layer by layer"
            )
    num_layers = len(base.layers)
    layer_types = _layer_types(config, num_layers)
    window = getattr(config, "sliding_window", None) if SLIDING_ATTENTION in layer_types else None
    adapter = Adapter(
        family=family,
        model=model,
        embed_tokens=base.embed_tokens,
        layers=base.layers,
        norm=base.norm,
        lm_head=model.get_output_embeddings(),
        rotary_emb=base.rotary_emb,
        layer_types=layer_types,
        sliding_window=window,
        final_logit_softcap=getattr(config, "final_logit_softcapping", None),
        norm_offset=SUPPORTED_FAMILIES[family]["norm_offset"],
        rope_per_layer_type=family == "gemma3_text",
        cache_argument=_cache_argument(base.layers[0], family),
    )
    if check:
        check_seam(adapter)
    return adapter


# ---------------------------------------------------------------- the contract


class _RecordingSlot:
    """A slot that records what the attention writes, as if nothing were cached yet."""

    def __init__(self):
        self.writes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def write(self, key, value):
        self.writes.append((tuple(key.shape), tuple(value.shape)))
        return key, value


class _RecordingCache(_AttentionCache):
    """The attention's cache object in `check_seam`: also records any other attribute read."""

    __slots__ = ("reads",)

    def __init__(self, slot):
        super().__init__(slot)
        self.reads: list[str] = []

    def __getattr__(self, name):  # only called for attributes we do not have
        self.reads.append(name)
        raise AttributeError(name)


@dataclass(frozen=True)
class SeamReport:
    """What one decoder-layer call through the seam did (see `check_seam`)."""

    writes: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (key shape, value shape) per update
    cache_reads: tuple[str, ...]  # cache attributes read other than `update`
    output_shape: tuple[int, ...]


def probe_layer(adapter: Adapter, layer: int = 0, batch: int = 2, tokens: int = 3) -> SeamReport:
    """Call one decoder layer through the seam on an all-ones input of
    (batch, tokens) with a recording cache, and report what it did."""
    param = next(adapter.layers[layer].parameters())
    hidden = torch.ones(batch, tokens, adapter.hidden_size, dtype=param.dtype, device=param.device)
    key_mask = torch.ones(batch, tokens, dtype=torch.long, device=param.device)
    pos = adapter.positions(hidden, key_mask, 0)
    slot = _RecordingSlot()
    cache = _RecordingCache(slot)
    with torch.inference_mode():
        out = adapter._call_layer(layer, hidden, pos, None, cache)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
    return SeamReport(tuple(slot.writes), tuple(cache.reads), shape)


def expected_kv_shape(adapter: Adapter, batch: int, tokens: int) -> tuple[int, int, int, int]:
    """(b, H_kv, t, Dh): what one attention call writes into its slot."""
    config = adapter.model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (batch, kv_heads, tokens, head_dim)


def check_seam(adapter: Adapter) -> SeamReport:
    """Raise SeamError naming the cause unless a decoder layer called through
    the seam does exactly what the executor relies on."""
    where = f"{adapter.family} with transformers {transformers.__version__}"
    try:
        report = probe_layer(adapter, batch=2, tokens=3)
    except Exception as exc:
        raise SeamError(f"calling a decoder layer through the seam failed ({where}): "
                        f"{type(exc).__name__}: {exc}") from exc
    kv = expected_kv_shape(adapter, 2, 3)
    if len(report.writes) != 1:
        raise SeamError(f"the attention called cache.update {len(report.writes)} times in one layer call, "
                        f"expected once ({where})")
    if report.writes[0] != (kv, kv):
        raise SeamError(f"the attention wrote keys/values of shapes {report.writes[0]}, expected {kv} each ({where})")
    if report.cache_reads:
        raise SeamError(f"the attention read cache.{', cache.'.join(report.cache_reads)}; "
                        f"the step cache offers only `update` ({where})")
    if report.output_shape != (2, 3, adapter.hidden_size):
        raise SeamError(f"a decoder layer returned {report.output_shape or 'no tensor'}, "
                        f"expected hidden states {(2, 3, adapter.hidden_size)} ({where})")
    return report
