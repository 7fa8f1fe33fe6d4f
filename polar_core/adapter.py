"""One adapter for every supported architecture: uniform access to the parts a
program of layers needs (embeddings, decoder layers, rotary embeddings, the
attention-mask rules, final norm, LM head).

The executor never touches a model's `forward`; it calls these parts in the
order a program says. Supported families are listed in one place,
`SUPPORTED_FAMILIES`; anything else gets an `UnsupportedModelError` naming it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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


class UnsupportedModelError(ValueError):
    """The model's architecture is not one we know how to run layer by layer."""


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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ Gemma's final soft-capping) on hidden states (..., d)."""
        logits = self.lm_head(self.norm(hidden))
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits


def _layer_types(config, num_layers: int) -> tuple[str, ...]:
    """Attention type per layer: the config's own list if it has one; otherwise
    sliding everywhere when a window is set (Mistral, Phi-3), else full."""
    types = getattr(config, "layer_types", None)
    if types:
        return tuple(types[:num_layers])
    if getattr(config, "sliding_window", None):
        return (SLIDING_ATTENTION,) * num_layers
    return (FULL_ATTENTION,) * num_layers


def get_adapter(model: nn.Module) -> Adapter:
    """Build the adapter for a loaded *ForCausalLM, or raise naming the unsupported type."""
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
    return Adapter(
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
    )
