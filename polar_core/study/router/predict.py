"""Reading programs off the router's heads: a beam search over segmentations
and ops that always yields valid Programs, ranked by log-probability."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from polar_core.engine.models import LoadedModel
from polar_core.program import OPS, Program, Segment
from polar_core.study.router.checkpoint import check_compatible
from polar_core.study.router.config import REPEATS, RouterError
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
    start = F.logsigmoid(boundary_logits.float()).tolist()
    start[0] = 0.0
    cont = torch.cat([torch.zeros(1), F.logsigmoid(-boundary_logits.float()).cumsum(0)]).tolist()  # prefix sums
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


def _path(segs) -> tuple[int, ...]:
    return tuple(layer for a, b, op in segs for _ in range(REPEATS[op]) for layer in range(a, b + 1))


@torch.inference_mode()
def predict_batch(
    lm: LoadedModel, router: Router, prompts: Sequence[str | Sequence[int]], k: int = 5, *, chat: bool | None = None
) -> list[list[tuple[Program, float]]]:
    """Top-k programs with their log-probabilities for each prompt, best first."""
    if not 1 <= k <= 64:
        raise RouterError(f"k must be in 1..64, got {k}")
    config = router.config
    check_compatible(config, lm)
    batch = encode(lm, prompts, config.chat if chat is None else chat)
    feats, mask = router_features(lm, config, batch)
    router.eval()
    b_logits, o_logits = router(feats, mask)
    out = []
    for b, o in zip(b_logits, o_logits):
        found = beam_search(b, o, k=k, width=config.beam_width, max_segment=config.max_segment)
        out.append([(Program.from_ops(segs, config.num_layers), score) for segs, score in found])
    return out


def predict_programs(
    lm: LoadedModel, router: Router, prompt_or_ids: str | Sequence[int], k: int = 5, *, chat: bool | None = None
) -> list[tuple[Program, float]]:
    """Top-k programs for one prompt (text or token ids), best first, with log-probabilities."""
    return predict_batch(lm, router, [prompt_or_ids], k, chat=chat)[0]
