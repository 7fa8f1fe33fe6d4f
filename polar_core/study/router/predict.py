"""Reading programs off the router's heads: a beam search over segmentations
and ops that always yields valid Programs, ranked by log-probability; the
full program first for a prompt unlike the training prompts (familiarity.py)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from polar_core.engine.models import LoadedModel
from polar_core.program import OPS, Program, Segment
from polar_core.study.router.checkpoint import check_compatible
from polar_core.study.router.config import REPEATS, RouterError
from polar_core.study.router.familiarity import nearest_similarity, summaries
from polar_core.study.router.features import encode, router_features
from polar_core.study.router.network import Router


def beam_search(
    boundary_logits: torch.Tensor, op_logits: torch.Tensor, k: int = 5, width: int = 5, max_segment: int = 4
) -> list[tuple[tuple[Segment, ...], float]]:
    """Top-k distinct programs (as segments) by log-probability.

    Args:
        boundary_logits (D,), op_logits (D, 3) for one prompt.
    Returns:
        Up to k (segments, log-prob) pairs, best first, with distinct programs
        and at least one layer run. A segment [i, j) with op o scores
        log p(boundary at i) + sum log p(no boundary at i+1..j-1) + log p(o | i);
        layer 0 always starts a segment. Partial segmentations are kept per
        position (a lattice beam of `width` entries each); a program reached by
        several segmentations keeps the best one's score.
    """
    depth = boundary_logits.shape[0]
    start, cont = _boundary_terms(boundary_logits)
    op_lp = F.log_softmax(op_logits.float(), -1).tolist()
    beams: list[list[tuple[float, tuple, bool]]] = [[] for _ in range(depth + 1)]  # (score, segments, runs any)
    beams[0] = [(0.0, (), False)]
    finals: dict[tuple[int, ...], tuple[float, tuple]] = {}
    for i in range(depth):
        beams[i].sort(key=lambda b: -b[0])
        for score, segs, runs in beams[i][:width]:
            for length in range(1, min(max_segment, depth - i) + 1):
                j = i + length
                seg_lp = start[i] + cont[j] - cont[i + 1]  # boundary at i, none at i+1..j-1
                for o, op in enumerate(OPS):
                    entry = (score + seg_lp + op_lp[i][o], segs + ((i, j - 1, op),), runs or op != "skip")
                    if j < depth:
                        beams[j].append(entry)
                    elif entry[2]:
                        path = _path(entry[1])
                        if path not in finals or finals[path][0] < entry[0]:
                            finals[path] = (entry[0], entry[1])
    best = sorted(finals.values(), key=lambda f: -f[0])[:k]
    return [(tuple(Segment(a, b, op, REPEATS[op]) for a, b, op in segs), score) for score, segs in best]


def _boundary_terms(boundary_logits: torch.Tensor) -> tuple[list[float], list[float]]:
    """log p(a segment starts at i) (layer 0 always does), and prefix sums of
    log p(no segment starts at i): a segment [i, j) scores
    start[i] + cont[j] - cont[i + 1] before its op."""
    start = F.logsigmoid(boundary_logits.float()).tolist()
    start[0] = 0.0
    cont = torch.cat([torch.zeros(1), F.logsigmoid(-boundary_logits.float()).cumsum(0)]).tolist()
    return start, cont


def _path(segs) -> tuple[int, ...]:
    return tuple(layer for a, b, op in segs for _ in range(REPEATS[op]) for layer in range(a, b + 1))


def full_program_log_prob(boundary_logits: torch.Tensor, op_logits: torch.Tensor, max_segment: int = 4) -> float:
    """The full program's log-probability as beam_search scores it: its best
    segmentation into kept segments of at most max_segment layers."""
    depth = boundary_logits.shape[0]
    start, cont = _boundary_terms(boundary_logits)
    keep = F.log_softmax(op_logits.float(), -1)[:, OPS.index("keep")].tolist()
    best = [0.0] + [float("-inf")] * depth  # best[j]: layers 0..j-1 covered
    for j in range(1, depth + 1):
        best[j] = max(best[i] + start[i] + cont[j] - cont[i + 1] + keep[i] for i in range(max(0, j - max_segment), j))
    return best[depth]


@dataclass(frozen=True)
class Routed:
    """What the router says about one prompt: its own top-k, and how familiar the prompt is."""

    ranked: list[tuple[Program, float]]  # the router's top-k (program, log-probability), best first
    full_log_prob: float  # the full program's log-probability under the same heads
    familiarity: float | None  # cosine similarity to the nearest training prompt; None: no familiarity bank
    threshold: float | None  # the router's familiarity threshold

    @property
    def familiar(self) -> bool:
        return self.familiarity is None or self.familiarity >= self.threshold

    @property
    def gated(self) -> list[tuple[Program, float]]:
        """The deployable ranking: the router's top-k, or for an unfamiliar
        prompt the full program first, then the router's own other picks."""
        if self.familiar:
            return self.ranked
        full = Program.full(self.ranked[0][0].num_layers)
        return [(full, self.full_log_prob), *[(p, s) for p, s in self.ranked if p != full][: len(self.ranked) - 1]]


@torch.inference_mode()
def route_batch(
    lm: LoadedModel, router: Router, prompts: Sequence[str | Sequence[int]], k: int = 5, *, chat: bool | None = None
) -> list[Routed]:
    """The router's top-k programs for each prompt, with the prompt's familiarity."""
    if not 1 <= k <= 64:
        raise RouterError(f"k must be in 1..64, got {k}")
    config = router.config
    check_compatible(config, lm)
    batch = encode(lm, prompts, config.chat if chat is None else chat)
    feats, mask = router_features(lm, config, batch)
    router.eval()
    b_logits, o_logits = router(feats, mask)
    similarity = nearest_similarity(router, summaries(router, feats, mask))
    out = []
    for i, (b, o) in enumerate(zip(b_logits, o_logits)):
        found = beam_search(b, o, k=k, width=config.beam_width, max_segment=config.max_segment)
        out.append(Routed([(Program.from_ops(segs, config.num_layers), score) for segs, score in found],
                          full_program_log_prob(b, o, config.max_segment),
                          None if similarity is None else round(float(similarity[i]), 6), config.familiar_threshold))
    return out


def predict_batch(
    lm: LoadedModel, router: Router, prompts: Sequence[str | Sequence[int]], k: int = 5, *,
    chat: bool | None = None, gate: bool = True,
) -> list[list[tuple[Program, float]]]:
    """Top-k programs with their log-probabilities for each prompt, best first
    (the full program first for an unfamiliar prompt, unless gate=False)."""
    return [r.gated if gate else r.ranked for r in route_batch(lm, router, prompts, k, chat=chat)]


def predict_programs(
    lm: LoadedModel, router: Router, prompt_or_ids: str | Sequence[int], k: int = 5, *,
    chat: bool | None = None, gate: bool = True,
) -> list[tuple[Program, float]]:
    """Top-k programs for one prompt (text or token ids), best first, with log-probabilities."""
    return predict_batch(lm, router, [prompt_or_ids], k, chat=chat, gate=gate)[0]
