"""Model-level redundancy: which layers barely change the hidden state, over a
set of prompts under the full program, and the static programs built from it
(the ShortGPT and Gromov presets and baselines). Measurements ship in
polar_core/assets/redundancy/ (``load_redundancy``).

- Block influence (ShortGPT, arXiv 2403.03853): BI_l = 1 - cos(h_l, h_{l+1}).
- Gromov et al. (arXiv 2403.17887): d(l, n), the angular distance between the
  input of layer l and the output of layer l + n - 1.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polar_core.assets import asset_path
from polar_core.engine.forward import prefill
from polar_core.engine.inputs import encode_prompts
from polar_core.engine.models import LoadedModel
from polar_core.program import Program
from polar_core.study.analysis import angular_distance, block_influence, similarity_matrix

REDUNDANCY_DIR = asset_path("redundancy")


@dataclass
class Redundancy:
    """Per-layer redundancy of a model measured over prompts under the full program.

    ``angular_distance[n - 1][l]`` is Gromov's d(l, n): the angular distance
    between the input of layer l and the output of layer l + n - 1 at the last
    prompt token, averaged over prompts; NaN where l + n > D.
    """

    model: str
    num_layers: int
    block_influence: torch.Tensor  # (D,) mean over prompts and tokens (ShortGPT)
    block_influence_last: torch.Tensor  # (D,) mean over prompts, last token only
    angular_distance: torch.Tensor  # (D, D): [n - 1, l]
    num_prompts: int
    meta: dict = field(default_factory=dict)  # command, prompt source, ids, ...

    def most_redundant_block(self, n: int) -> int:
        """argmin_l d(l, n): the first layer of the most redundant block of n layers."""
        return most_redundant_block(self.angular_distance, n)

    def to_dict(self) -> dict:
        nan_to_none = lambda row: [None if math.isnan(v) else round(v, 6) for v in row]  # noqa: E731
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "num_prompts": self.num_prompts,
            **self.meta,
            "block_influence": [round(v, 6) for v in self.block_influence.tolist()],
            "block_influence_last": [round(v, 6) for v in self.block_influence_last.tolist()],
            "angular_distance": [nan_to_none(row) for row in self.angular_distance.tolist()],
            "shortgpt_order": torch.argsort(self.block_influence, stable=True).tolist(),
            "gromov_best_start": {str(n): self.most_redundant_block(n) for n in range(1, self.num_layers)},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Redundancy:
        derived = {"model", "num_layers", "num_prompts", "block_influence", "block_influence_last",
                   "angular_distance", "shortgpt_order", "gromov_best_start"}
        dist = torch.tensor([[math.nan if v is None else v for v in row] for row in d["angular_distance"]])
        out = cls(d["model"], int(d["num_layers"]), torch.tensor(d["block_influence"]),
                  torch.tensor(d["block_influence_last"]), dist, int(d["num_prompts"]),
                  {k: v for k, v in d.items() if k not in derived})
        if out.block_influence.shape != (out.num_layers,) or dist.shape != (out.num_layers, out.num_layers):
            raise ValueError(f"redundancy file for {out.model!r} does not match its {out.num_layers} layers")
        return out


def layer_redundancy(step_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One full-program trajectory (D+1, T, d) -> BI mean over tokens (D,), BI at
    the last token (D,) and d(l, n) (D, D) [n - 1, l] at the last token."""
    bi = block_influence(step_hidden)  # (D, T)
    sim = similarity_matrix(step_hidden)  # (D+1, D+1)
    dist = angular_distance(sim)
    depth = step_hidden.shape[0] - 1
    out = torch.full((depth, depth), math.nan)
    for n in range(1, depth + 1):
        starts = torch.arange(depth - n + 1)
        out[n - 1, : depth - n + 1] = dist[starts, starts + n].cpu()
    return bi.mean(-1).cpu(), bi[:, -1].cpu(), out


@torch.inference_mode()
def measure_redundancy(lm: LoadedModel, prompts: Sequence[str], *, chat: bool = False, batch_size: int = 8,
                       meta: dict | None = None) -> Redundancy:
    """Mean BI per layer and Gromov distances over prompts, full program, every token."""
    if not prompts:
        raise ValueError("measure_redundancy needs at least one prompt")
    full = Program.full(lm.num_layers)
    rows = []
    for i in range(0, len(prompts), batch_size):
        batch = encode_prompts(lm, prompts[i : i + batch_size], chat=chat)
        pre = prefill(lm, batch, [full] * len(batch.lengths), capture="all")
        rows.extend(layer_redundancy(h) for h in pre.step_hidden)
    bi, bi_last, dist = (torch.stack(col).mean(0) for col in zip(*rows))
    return Redundancy(lm.name, lm.num_layers, bi, bi_last, dist, len(prompts), dict(meta or {}))


def _redundancy_path(model_name: str) -> Path:
    return REDUNDANCY_DIR / (model_name.replace("/", "__") + ".json")


def save_redundancy(red: Redundancy, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_compact_json(red.to_dict()))


def _compact_json(d: dict) -> str:
    """One key per line, one matrix row per line: readable in a diff, not 1,000 lines long."""
    lines = []
    for key, value in d.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            rows = ",\n  ".join(json.dumps(row) for row in value)
            lines.append(f" {json.dumps(key)}: [\n  {rows}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def load_redundancy(model_name: str, path: str | Path | None = None) -> Redundancy | None:
    """The shipped measurement for a model (polar_core/assets/redundancy/<name>.json), or None when absent."""
    path = Path(path) if path is not None else _redundancy_path(model_name)
    if not path.is_file():
        return None
    return Redundancy.from_dict(json.loads(path.read_text()))


def most_redundant_block(distances, n: int) -> int:
    """argmin over l of d(l, n) from a (N, D) array indexed [n - 1, l] (NaN = no block)."""
    dist = torch.as_tensor(distances, dtype=torch.float64)
    if dist.dim() != 2:
        raise ValueError(f"distances must be (N, D) indexed [n - 1, l], got shape {tuple(dist.shape)}")
    depth = dist.shape[1]
    if not 1 <= n <= min(dist.shape[0], depth):
        raise ValueError(f"block size n must be in 1..{min(dist.shape[0], depth)}, got {n}")
    row = dist[n - 1, : depth - n + 1]
    if torch.isnan(row).all():
        raise ValueError(f"no distances for blocks of {n} layers")
    return int(torch.nan_to_num(row, nan=math.inf).argmin())


def _scores(source, attr: str) -> torch.Tensor:
    """Scores from an array, a Redundancy, or a LoadedModel (its shipped measurement)."""
    if isinstance(source, LoadedModel):
        red = load_redundancy(source.name)
        if red is None:
            raise FileNotFoundError(
                f"no redundancy measured for {source.name!r}; run `python -m polar_core redundancy "
                f"--model {source.name} --out {_redundancy_path(source.name)}`")
        if red.num_layers != source.num_layers:
            raise ValueError(f"redundancy file has {red.num_layers} layers, {source.name} has {source.num_layers}")
        source = red
    if isinstance(source, Redundancy):
        return getattr(source, attr)
    return torch.as_tensor(source, dtype=torch.float64)


def shortgpt_program(bi, n: int) -> Program:
    """ShortGPT: the full program without the n layers of lowest block influence.

    Args:
        bi: (D,) BI per layer, a Redundancy, or a LoadedModel (its shipped
            measurement; FileNotFoundError when there is none).
        n: layers to drop, 0..D-1. Ties drop the earlier layer.
    """
    scores = _scores(bi, "block_influence").reshape(-1)
    depth = scores.shape[0]
    if not 0 <= n < depth:
        raise ValueError(f"ShortGPT can drop 0..{depth - 1} of {depth} layers, got n={n}")
    return Program.drop_layers(depth, torch.argsort(scores, stable=True)[:n].tolist())


def gromov_program(distances, n: int) -> Program:
    """Gromov et al.: the full program without the block of n layers l*..l*+n-1,
    l* = argmin_l d(l, n).

    Args:
        distances: (N, D) d(l, n) indexed [n - 1, l], a Redundancy, or a
            LoadedModel (its shipped measurement).
        n: block size, 1..D-1.
    """
    dist = _scores(distances, "angular_distance")
    depth = dist.shape[-1]
    if not 1 <= n < depth:
        raise ValueError(f"Gromov pruning drops a block of 1..{depth - 1} of {depth} layers, got n={n}")
    start = most_redundant_block(dist, n)
    return Program.skip(depth, start, start + n - 1)
