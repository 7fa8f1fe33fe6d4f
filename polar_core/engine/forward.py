"""Forward passes under a program: embed the tokens, call `layers[i]` for each
step i of each row's program, apply the final norm and LM head.

The model's own `forward` is never called or patched, and the program is an
argument of every call (nothing is stored on the model), so one loaded model
serves many threads at once. Rows of a batch may run different programs: per
step, the rows that run the same layer are one call (`schedule`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from polar_core.engine.adapter import Adapter, Positions
from polar_core.engine.cache import StepCache
from polar_core.engine.inputs import EncodedBatch
from polar_core.engine.models import LoadedModel
from polar_core.program import Program

CAPTURE_MODES = (None, "last", "all")

# Per program step, the (layer, rows) groups to run; rows None = every row.
Schedule = list[list[tuple[int, torch.Tensor | None]]]


def schedule(paths: Sequence[tuple[int, ...]], device: torch.device) -> Schedule:
    """Per step: the (layer, rows) groups to run. rows=None means every row.

    Rows whose program is shorter than the longest simply stop being scheduled;
    their hidden state stays at their last step.
    """
    batch = len(paths)
    steps = max(len(p) for p in paths)
    out: Schedule = []
    for k in range(steps):
        groups: dict[int, list[int]] = {}
        for row, path in enumerate(paths):
            if k < len(path):
                groups.setdefault(path[k], []).append(row)
        step = []
        for layer, rows in groups.items():
            all_rows = len(rows) == batch
            step.append((layer, None if all_rows else torch.tensor(rows, device=device)))
        out.append(step)
    return out


def run_steps(
    adapter: Adapter,
    steps: Schedule,
    hidden: torch.Tensor,
    pos: Positions,
    cache: StepCache | None,
    capture: str | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Apply every scheduled step to hidden (B, t, d). Returns the final hidden
    states and, if asked, the hidden state after each step (last token or all)."""
    batch = hidden.shape[0]
    snapshots = []
    for k, groups in enumerate(steps):
        if len(groups) == 1 and groups[0][1] is None:
            layer, _ = groups[0]
            view = cache.view(k, None, batch) if cache is not None else None
            hidden = adapter.run_layer(layer, hidden, pos, None, view)
        else:
            new_hidden = hidden.clone()  # groups read the pre-step state; rows are disjoint
            for layer, rows in groups:
                view = cache.view(k, rows, batch) if cache is not None else None
                new_hidden[rows] = adapter.run_layer(layer, hidden[rows], pos, rows, view)
            hidden = new_hidden
        if capture == "last":
            snapshots.append(hidden[:, -1].clone())
        elif capture == "all":
            snapshots.append(hidden.clone())
    if cache is not None:
        cache.length += hidden.shape[1]
    return hidden, snapshots


@dataclass
class PrefillResult:
    """The prompt pass of a batch: next-token logits, hidden states, the cache."""

    logits: torch.Tensor  # (B, V) float32, at the last prompt position
    hidden: torch.Tensor  # (B, T, d) final hidden states before the norm
    step_hidden: list[torch.Tensor] | None  # per row: (K_r + 1, d) or (K_r + 1, T_r, d); row 0 = embeddings
    cache: StepCache | None


@torch.inference_mode()
def prefill(
    lm: LoadedModel,
    batch: EncodedBatch,
    programs: Sequence[Program],
    *,
    capture: str | None = None,
    cache_capacity: int | None = None,
) -> PrefillResult:
    """Run each row's program over its prompt. With `cache_capacity` (total
    tokens incl. those to be generated) a step cache is filled for decoding."""
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
    adapter = lm.adapter
    paths = [p.path for p in programs]
    hidden = adapter.embed(batch.input_ids)  # (B, T, d)
    pos = adapter.positions(hidden, batch.attention_mask, 0)
    cache = StepCache(cache_capacity) if cache_capacity else None
    first = hidden[:, -1].clone() if capture == "last" else hidden.clone()
    hidden, snapshots = run_steps(adapter, schedule(paths, hidden.device), hidden, pos, cache, capture)
    logits = adapter.logits(hidden[:, -1]).float()
    step_hidden = None
    if capture:
        step_hidden = [row_trajectory(first, snapshots, row, len(path), batch.lengths[row]) for row, path in enumerate(paths)]
    return PrefillResult(logits, hidden, step_hidden, cache)


def row_trajectory(first, snapshots, row: int, steps: int, length: int) -> torch.Tensor:
    states = [first[row]] + [s[row] for s in snapshots[:steps]]
    stacked = torch.stack(states).float()  # (K+1, d) or (K+1, T, d)
    return stacked if stacked.dim() == 2 else stacked[:, -length:]  # drop left padding


@torch.inference_mode()
def forward_hidden(lm: LoadedModel, batch: EncodedBatch, programs: Sequence[Program]) -> torch.Tensor:
    """Final hidden states (B, T, d), before the norm, under each row's program, no cache."""
    adapter = lm.adapter
    hidden = adapter.embed(batch.input_ids)
    pos = adapter.positions(hidden, batch.attention_mask, 0)
    hidden, _ = run_steps(adapter, schedule([p.path for p in programs], hidden.device), hidden, pos, None, None)
    return hidden


def forward_logits(lm: LoadedModel, batch: EncodedBatch, programs: Sequence[Program]) -> torch.Tensor:
    """Logits at every position (B, T, V) under each row's program, no cache.

    The reference path: teacher forcing and the cache-equivalence tests use it.
    """
    with torch.inference_mode():
        return lm.adapter.logits(forward_hidden(lm, batch, programs)).float()


def forward_cached(lm: LoadedModel, tokens: torch.Tensor, key_mask: torch.Tensor, programs: Sequence[Program],
                    cache: StepCache, capture: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Feed new tokens (B, t) through the cached programs: the final hidden
    states (B, t, d) and, with capture="all", [embeddings, after step 1, ...]."""
    adapter = lm.adapter
    hidden = adapter.embed(tokens)  # (B, t, d)
    first = [hidden.clone()] if capture else []
    pos = adapter.positions(hidden, key_mask, cache.length)
    hidden, snapshots = run_steps(adapter, schedule([p.path for p in programs], hidden.device), hidden, pos, cache,
                                   capture)
    return hidden, first + snapshots
