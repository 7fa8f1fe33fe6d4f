"""Does this prompt look like the ones the router learned from?

A router trained on eight question families has nothing to say about a
ninth: measured on the task suite, a router that never saw capitals skipped
layers there and lost 7 of 15 right answers. So the router keeps a summary
of every training prompt (the mean of its own projected token vectors,
centred on the training mean, unit length; float16) and a threshold: the
cosine similarity that all but a small fraction (``quantile``) of training
prompts reach to their nearest *other* training prompt. A prompt whose
nearest training prompt is less similar than that is unfamiliar, and the
router predicts the full program for it (``predict.route_batch``): no
skip is promised where nothing was learned.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from polar_core.study.router.network import Router

DEFAULT_QUANTILE = 0.01  # about 1 training prompt in 100 counts as unfamiliar to the rest
_CHUNK = 1024  # rows of the similarity matrix at a time: memory stays O(chunk x bank)


def summaries(router: Router, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean projected token vector of each prompt (B, d), float32, unnormalised."""
    with torch.no_grad():
        tokens = router.project(features.float())
        weights = mask.float()[..., None]
        return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


def nearest_similarity(router: Router, summary: torch.Tensor) -> torch.Tensor | None:
    """Cosine similarity (B,) of each summary to its nearest training prompt; None without a bank."""
    if not router.config.familiar_bank:
        return None
    bank = router.familiar_bank.float()
    unit = F.normalize(summary.float() - router.familiar_center, dim=-1)
    nearest = torch.cat([(part @ bank.T).max(1).values for part in unit.split(_CHUNK)])
    return nearest.clamp(-1.0, 1.0)  # the bank is float16: a copy of a training prompt can reach 1.00001


def fit_familiarity(router: Router, training: torch.Tensor, quantile: float = DEFAULT_QUANTILE) -> Router:
    """Give the router its bank and threshold from the summaries (N, d) of its training prompts.

    The threshold is the `quantile` of each training prompt's similarity to
    its nearest other one (leave one out), so about that fraction of
    in-distribution prompts falls back to the full program. Returns the
    router, changed in place (its config gains familiar_bank/threshold).
    """
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {quantile}")
    if training.shape[0] < 2:
        raise ValueError("a familiarity threshold needs at least 2 training prompts")
    center = training.float().mean(0)
    bank = F.normalize(training.float() - center, dim=-1)
    nearest = []
    for start in range(0, bank.shape[0], _CHUNK):
        sims = bank[start : start + _CHUNK] @ bank.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = -2.0  # not itself
        nearest.append(sims.max(1).values)
    threshold = float(torch.cat(nearest).quantile(quantile).clamp(-1.0, 1.0))
    # replace() checks the new config; the buffers then match what Router(config) registers on load.
    router.config = dataclasses.replace(router.config, familiar_bank=bank.shape[0],
                                        familiar_threshold=round(threshold, 6))
    router.register_buffer("familiar_center", center)
    router.register_buffer("familiar_bank", bank.to(torch.float16))
    return router
