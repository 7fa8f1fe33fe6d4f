"""The router's configuration: everything needed to rebuild one, saved as config.json."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from polar_core.engine.models import LoadedModel

FORMAT = "polar-router/1"
REPEATS = {"skip": 0, "keep": 1, "repeat": 2}  # "repeat" = the segment runs twice


class RouterError(ValueError):
    """A router config or checkpoint that cannot be used (message says why)."""


# Upper bounds on every size in a config, checked before anything is
# allocated: a config.json with "max_tokens": 10000000000 must be refused
# with a message, not reach torch and fail to allocate. Generous: the
# paper's router is d_model 256, 4 heads, 2 blocks.
MAX_SIZES = {"num_layers": 1024, "feature_size": 65536, "d_model": 8192, "num_heads": 128, "num_blocks": 64,
             "mlp_ratio": 16, "max_tokens": 65536, "max_segment": 64, "beam_width": 64, "familiar_bank": 1_000_000}
MAX_PARAMETERS = 500_000_000  # a router is a few million; this refuses one that cannot fit in memory


# --------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class RouterConfig:
    """Everything needed to rebuild a router; saved as config.json.

    Args:
        model_name: the base model the router was trained for.
        num_layers: its depth D (one query per layer).
        feature_size: its hidden size F (the width of the frozen features).
        feature_layer: 0 = token embeddings; k = hidden state after layers 0..k-1.
        max_tokens: the router reads the last max_tokens tokens of a prompt.
        chat: whether prompts go through the chat template (the task suite's
            few-shot prompts do not).
        pooled: also give every layer query the prompt's mean feature (one
            vector summing up the input), besides cross-attention to its tokens.
        familiar_bank: how many training prompts the router keeps a summary of
            to tell familiar prompts from unfamiliar ones (0 = no gate; see
            ``polar_core.study.router.familiarity``).
        familiar_threshold: a prompt whose summary is less similar than this
            (cosine) to every kept training prompt is unfamiliar: the router
            predicts the full program for it (None = no gate).
    """

    model_name: str
    num_layers: int
    feature_size: int
    feature_layer: int = 0
    d_model: int = 256
    num_heads: int = 4
    num_blocks: int = 2
    mlp_ratio: int = 4
    dropout: float = 0.1
    max_tokens: int = 128
    max_segment: int = 4
    beam_width: int = 5
    full_path_weight: float = 0.3
    chat: bool = False
    pooled: bool = False
    familiar_bank: int = 0
    familiar_threshold: float | None = None

    def __post_init__(self) -> None:
        ints = ("num_layers", "feature_size", "d_model", "num_heads", "num_blocks", "mlp_ratio", "max_tokens",
                "max_segment", "beam_width", "familiar_bank")
        for name in ints:
            value = getattr(self, name)
            least = 0 if name == "familiar_bank" else 1  # 0 rows = no familiarity gate
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise RouterError(f"router config: {name} must be an integer >= {least}, got {str(value)[:40]!r}")
            if value > MAX_SIZES[name]:
                raise RouterError(f"router config: {name} is {value}; at most {MAX_SIZES[name]} is accepted")
        if not isinstance(self.model_name, str) or not self.model_name or len(self.model_name) > 300:
            raise RouterError("router config: model_name must be a non-empty string (at most 300 characters)")
        if isinstance(self.feature_layer, bool) or not isinstance(self.feature_layer, int):
            raise RouterError(f"router config: feature_layer must be an integer, got {self.feature_layer!r}")
        if not 0 <= self.feature_layer < self.num_layers:
            raise RouterError(f"router config: feature_layer must be in 0..{self.num_layers - 1}, got {self.feature_layer}")
        if self.d_model % self.num_heads:
            raise RouterError(f"router config: d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.full_path_weight <= 1.0:
            raise RouterError("router config: dropout must be in [0, 1) and full_path_weight in [0, 1]")
        threshold = self.familiar_threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not math.isfinite(threshold) or not -1.0 <= threshold <= 1.0):
            raise RouterError(f"router config: familiar_threshold must be null or a cosine in [-1, 1], got "
                              f"{str(threshold)[:40]!r}")
        if (threshold is None) != (self.familiar_bank == 0):
            raise RouterError("router config: familiar_bank and familiar_threshold go together (both set or neither)")
        if self.num_values() > MAX_PARAMETERS:
            raise RouterError(f"router config describes {self.num_values():,} values; at most "
                              f"{MAX_PARAMETERS:,} are accepted")

    def num_parameters(self) -> int:
        """Parameters of the network this config builds (polar_core.study.router.network), from sizes alone."""
        d, f, mlp = self.d_model, self.feature_size, self.mlp_ratio * self.d_model
        attention = 4 * d * d + 4 * d  # in-projection (3 d x d) and out-projection, with biases
        block = attention + 2 * d * mlp + mlp + d + 4 * d  # + MLP and two layer norms
        return (2 * f + f * d + d + self.max_tokens * d + self.num_layers * d + 2 * d + attention
                + self.num_blocks * block + 2 * d + (d + 1) + (3 * d + 3))

    def num_values(self) -> int:
        """Everything its weights file holds: the parameters plus the familiarity bank (kept, not trained)."""
        bank = (self.familiar_bank + 1) * self.d_model if self.familiar_bank else 0  # the rows and their centre
        return self.num_parameters() + bank

    @classmethod
    def for_model(cls, lm: LoadedModel, **overrides) -> RouterConfig:
        """The default config for a loaded model."""
        return cls(model_name=lm.name, num_layers=lm.num_layers, feature_size=lm.adapter.hidden_size, **overrides)

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> RouterConfig:
        if not isinstance(data, dict):
            raise RouterError(f"router config must be a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise RouterError(f"router config has format {data.get('format')!r}; expected {FORMAT!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format"})
        if unknown:
            raise RouterError(f"router config has unknown keys: {', '.join(unknown)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:  # a required key is missing
            raise RouterError(f"router config is incomplete: {err}") from None
