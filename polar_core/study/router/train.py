"""Training the router on supervision (searched valid programs per question).

Targets: a sample's shortest valid programs the router can express (weight 1
each), plus the full program at ``full_path_weight`` when it is valid and a
shorter valid one exists. Loss: BCE on segment boundaries + CE on ops at
segment starts, after the paper.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from polar_core.engine.models import LoadedModel
from polar_core.program import OPS, Program, Segment
from polar_core.study.router.checkpoint import check_compatible
from polar_core.study.router.config import REPEATS, RouterConfig, RouterError
from polar_core.study.router.familiarity import DEFAULT_QUANTILE, fit_familiarity, summaries
from polar_core.study.router.features import encode, router_features
from polar_core.study.router.network import Router
from polar_core.study.supervision import SupervisionSample
from polar_core.study.tasks import build_prompt, load_suite

IGNORE = -100  # op target at layers where no segment starts


def router_segments(program: Program, max_segment: int = 4) -> tuple[Segment, ...] | None:
    """The program's op view cut into segments of at most max_segment layers.

    Long keep and skip segments split freely (keep 0-9 = keep 0-3, 4-7, 8-9). A
    loop of a longer block, or a block run more than twice, has no such form
    (two short loops are a different program), so it gives None.
    """
    view = program.op_view()
    if view is None:
        return None
    out = []
    for seg in view:
        if seg.op == "repeat" and (seg.repeats != REPEATS["repeat"] or seg.length > max_segment):
            return None
        for start in range(seg.start, seg.end + 1, max_segment):
            out.append(Segment(start, min(start + max_segment - 1, seg.end), seg.op, seg.repeats))
    return tuple(out)


def encode_target(segments: Sequence[Segment], num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundary targets (D,) in {0, 1} and op targets (D,) (IGNORE where no segment starts)."""
    boundary = torch.zeros(num_layers)
    ops = torch.full((num_layers,), IGNORE, dtype=torch.long)
    for seg in segments:
        boundary[seg.start] = 1.0
        ops[seg.start] = OPS.index(seg.op)
    return boundary, ops


def sample_targets(sample: SupervisionSample, config: RouterConfig) -> list[tuple[Program, float]]:
    """Weighted target programs of one sample: its shortest valid programs the
    router can express (weight 1 each), plus the full program at
    ``full_path_weight`` when it is valid and a shorter valid one exists.

    Returns [] when no valid program is expressible (nothing to learn from).
    """
    depth = config.num_layers
    usable = [p for p in sample.valid_programs if router_segments(p, config.max_segment) is not None]
    if not usable:
        return []
    shortest = min(p.layer_calls for p in usable)
    targets = {p: 1.0 for p in usable if p.layer_calls == shortest}
    full = Program.full(depth)
    full_valid = full in sample.valid_programs or (sample.initial_score or 0.0) > 0.0
    if full_valid and shortest < depth:
        targets[full] = config.full_path_weight
    return list(targets.items())


def router_loss(
    boundary_logits: torch.Tensor, op_logits: torch.Tensor, boundary: torch.Tensor, ops: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Weighted BCE on boundaries + CE on ops at segment starts.

    Args:
        boundary_logits (N, D), op_logits (N, D, 3): one row per target program.
        boundary (N, D) in {0, 1}, ops (N, D) with IGNORE off segment starts.
        weight (N,): each target's weight (a sample's targets share its rows).
    """
    bce = F.binary_cross_entropy_with_logits(boundary_logits, boundary, reduction="none").mean(-1)  # (N,)
    ce = F.cross_entropy(op_logits.transpose(1, 2), ops, ignore_index=IGNORE, reduction="none")  # (N, D)
    starts = (ops != IGNORE).float()
    ce = (ce * starts).sum(-1) / starts.sum(-1).clamp(min=1)
    return ((bce + ce) * weight).sum() / weight.sum()


@dataclass
class _Example:
    features: torch.Tensor  # (T, F) bfloat16: halves the memory of a few thousand prompts
    boundary: torch.Tensor  # (n, D)
    ops: torch.Tensor  # (n, D)
    weight: torch.Tensor  # (n,)


def _collate(examples: Sequence[_Example]) -> tuple[torch.Tensor, ...]:
    """Left-pad features into (B, T, F) and repeat them once per target program."""
    width = max(e.features.shape[0] for e in examples)
    size = examples[0].features.shape[1]
    feats = torch.zeros(len(examples), width, size)
    mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        feats[i, width - e.features.shape[0] :] = e.features.float()
        mask[i, width - e.features.shape[0] :] = True
    owner = torch.cat([torch.full((e.weight.shape[0],), i) for i, e in enumerate(examples)])
    boundary = torch.cat([e.boundary for e in examples])
    ops = torch.cat([e.ops for e in examples])
    weight = torch.cat([e.weight for e in examples])
    return feats, mask, owner, boundary, ops, weight


def prompts_for(samples: Sequence[SupervisionSample], items=None) -> list[str]:
    """The prompt the model sees for each sample.

    A sample whose question is a task-suite question gets that item's few-shot
    prompt (``tasks.build_prompt``); any other question (e.g. the reference
    implementation's own files) is used as it is.
    """
    by_question = {}
    for item in sorted(load_suite() if items is None else items, key=lambda it: it.id):
        by_question.setdefault(item.question, item)
    return [build_prompt(by_question[s.question]) if s.question in by_question else s.question for s in samples]


def _examples(lm, samples, prompts, config, batch_size, progress) -> list[_Example]:
    chosen = []
    for sample, prompt in zip(samples, prompts):
        targets = sample_targets(sample, config)
        if targets:
            chosen.append((prompt, targets))
    examples = []
    bar = tqdm(total=len(chosen), desc="router features", unit="prompt", disable=not progress)
    for i in range(0, len(chosen), batch_size):
        part = chosen[i : i + batch_size]
        feats, mask = router_features(lm, config, encode(lm, [p for p, _ in part], config.chat))
        for row, (_, targets) in enumerate(part):
            encoded = [encode_target(router_segments(p, config.max_segment), config.num_layers) for p, _ in targets]
            examples.append(
                _Example(
                    features=feats[row][mask[row]].to(torch.bfloat16),
                    boundary=torch.stack([b for b, _ in encoded]),
                    ops=torch.stack([o for _, o in encoded]),
                    weight=torch.tensor([w for _, w in targets]),
                )
            )
        bar.update(len(part))
    bar.close()
    return examples


def train_router(
    lm: LoadedModel,
    samples: Sequence[SupervisionSample],
    config: RouterConfig | None = None,
    *,
    epochs: int = 40,
    seed: int = 0,
    progress: bool = True,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    batch_size: int = 32,
    prompts: Sequence[str | Sequence[int]] | None = None,
    max_steps: int | None = None,
    familiar_quantile: float | None = DEFAULT_QUANTILE,
) -> Router:
    """Train a router on supervision samples (on the CPU; the base model stays frozen).

    Args:
        samples: questions with their valid programs (``load_supervision``).
        config: default ``RouterConfig.for_model(lm)``.
        prompts: the model's input per sample; default ``prompts_for(samples)``.
        max_steps: stop after this many optimizer steps (tests).
        familiar_quantile: after training, keep a summary of every sample's
            prompt and gate out prompts less similar to all of them than this
            fraction of the training prompts are to each other
            (``familiarity.fit_familiarity``); None = no gate.
    Returns:
        The trained router in eval mode; ``router.loss_history`` holds the mean
        loss of each epoch.
    """
    if familiar_quantile is not None and not 0.0 <= familiar_quantile < 1.0:  # refused before, not after, training
        raise RouterError(f"familiar_quantile must be in [0, 1), got {familiar_quantile}")
    # A trained router's config (e.g. to repeat its recipe) carries its own gate: a new one is fitted below.
    config = dataclasses.replace(config or RouterConfig.for_model(lm), familiar_bank=0, familiar_threshold=None)
    check_compatible(config, lm)
    prompts = prompts_for(samples) if prompts is None else prompts
    if len(prompts) != len(samples):
        raise RouterError(f"got {len(prompts)} prompts for {len(samples)} samples")
    examples = _examples(lm, samples, prompts, config, 16, progress)
    if not examples:
        raise RouterError("no sample has a valid program the router can express: nothing to train on")
    torch.manual_seed(seed)
    router = Router(config)
    total = epochs * math.ceil(len(examples) / batch_size)
    if max_steps is not None:
        total = min(total, max_steps)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.1)
    _fit(router, examples, opt, sched, epochs=epochs, total=total, batch_size=batch_size, seed=seed,
         progress=progress)
    router.eval()
    # Each distinct prompt once: a repeated one would be its own nearest neighbour.
    distinct = list({p if isinstance(p, str) else tuple(p): p for p in prompts}.values())
    if familiar_quantile is not None and len(distinct) >= 2:
        fit_familiarity(router, _prompt_summaries(lm, router, distinct, 16), familiar_quantile)
    return router


def _prompt_summaries(lm: LoadedModel, router: Router, prompts, batch_size: int) -> torch.Tensor:
    """familiarity.summaries of every prompt (N, d), in batches."""
    out = []
    for i in range(0, len(prompts), batch_size):
        feats, mask = router_features(lm, router.config, encode(lm, prompts[i : i + batch_size], router.config.chat))
        out.append(summaries(router, feats, mask))
    return torch.cat(out)


def _step(router: Router, batch: Sequence[_Example], opt, sched) -> float:
    """One optimizer step on a batch of examples; returns its loss."""
    feats, mask, owner, boundary, ops, weight = _collate(batch)
    b_logits, o_logits = router(feats, mask)
    loss = router_loss(b_logits[owner], o_logits[owner], boundary, ops, weight)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(router.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()


def _fit(router: Router, examples: Sequence[_Example], opt, sched, *, epochs: int, total: int, batch_size: int,
         seed: int, progress: bool) -> None:
    """Epochs of shuffled batches (a private RNG: the global one stays untouched), at most `total` steps."""
    order = random.Random(seed)
    router.train()
    step = 0
    bar = tqdm(total=total, desc="router training", unit="step", disable=not progress)
    for _ in range(epochs):
        shuffled = order.sample(examples, len(examples))
        losses = []
        for i in range(0, len(shuffled), batch_size):
            if step >= total:
                break
            losses.append(_step(router, shuffled[i : i + batch_size], opt, sched))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if losses:
            router.loss_history.append(sum(losses) / len(losses))
    bar.close()
