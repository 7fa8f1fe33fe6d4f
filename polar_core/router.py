"""The router: predict a program of layers for a prompt (PoLar's predictor).

Shape of the network, after the paper (arXiv 2606.06574, section 4):

    prompt tokens -> frozen features of the base model (T, F)
      -> LayerNorm, linear to d=256, + a position embedding counted from the
         prompt's end                                              # (T, d)
      -> D learned per-layer queries cross-attend to the tokens     # (D, d)
      -> 2 transformer blocks over the layer axis                  # (D, d)
      -> boundary head (D logits: "a segment starts at layer i")
         and op head (D x 3: skip / keep / repeat for the segment
         starting at layer i)

The frozen features are the base model's own hidden states over the prompt
at an early depth (``RouterConfig.feature_layer``: 0 = the token embeddings,
k = after layers 0..k-1), so nothing beyond the model itself is needed offline.

A program is read off the heads as a segmentation of the D layers into
segments of at most ``max_segment`` layers, each skipped, kept or repeated
(run twice). Decoding is a beam search over segmentations and ops and always
yields valid Programs (``Program.from_ops``), ranked by their log-probability.

Checkpoints are a folder with ``config.json`` (RouterConfig) and
``model.safetensors``; never pickle.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from polar_core.executor import EncodedBatch, encode_prompts, pad_left, prefill
from polar_core.assets import asset_path
from polar_core.models import LoadedModel
from polar_core.program import OPS, Program, Segment
from polar_core.supervision import SupervisionSample

ASSET_ROOT = asset_path("router")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "polar-router/1"

REPEATS = {"skip": 0, "keep": 1, "repeat": 2}  # "repeat" = the segment runs twice
IGNORE = -100  # op target at layers where no segment starts


class RouterError(ValueError):
    """A router config or checkpoint that cannot be used (message says why)."""


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

    def __post_init__(self) -> None:
        ints = ("num_layers", "feature_size", "d_model", "num_heads", "num_blocks", "mlp_ratio", "max_tokens",
                "max_segment", "beam_width")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RouterError(f"router config: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise RouterError("router config: model_name must be a non-empty string")
        if isinstance(self.feature_layer, bool) or not isinstance(self.feature_layer, int):
            raise RouterError(f"router config: feature_layer must be an integer, got {self.feature_layer!r}")
        if not 0 <= self.feature_layer < self.num_layers:
            raise RouterError(f"router config: feature_layer must be in 0..{self.num_layers - 1}, got {self.feature_layer}")
        if self.d_model % self.num_heads:
            raise RouterError(f"router config: d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.full_path_weight <= 1.0:
            raise RouterError("router config: dropout must be in [0, 1) and full_path_weight in [0, 1]")

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


# --------------------------------------------------------------------------
# network


class Block(nn.Module):
    """Pre-norm transformer block over the layer axis."""

    def __init__(self, d: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D, d)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Router(nn.Module):
    """Per-layer queries over frozen prompt features -> boundary and op logits."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        c = self.config = config
        d = c.d_model
        self.in_norm = nn.LayerNorm(c.feature_size)
        self.proj = nn.Linear(c.feature_size, d)
        self.token_pos = nn.Parameter(torch.zeros(c.max_tokens, d))  # index = distance from the prompt's end
        self.queries = nn.Parameter(torch.randn(c.num_layers, d) * 0.02)
        self.cross_norm = nn.LayerNorm(d)
        self.cross = nn.MultiheadAttention(d, c.num_heads, dropout=c.dropout, batch_first=True)
        self.blocks = nn.ModuleList(Block(d, c.num_heads, c.mlp_ratio, c.dropout) for _ in range(c.num_blocks))
        self.out_norm = nn.LayerNorm(d)
        self.boundary_head = nn.Linear(d, 1)
        self.op_head = nn.Linear(d, len(OPS))
        self.loss_history: list[float] = []  # mean training loss per epoch (not saved)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for features (B, T, F) with mask (B, T) (True = real token, left padding).

        Returns:
            boundary (B, D) and ops (B, D, 3) logits.
        """
        batch, length, _ = features.shape
        if length > self.config.max_tokens:
            features, mask = features[:, -self.config.max_tokens :], mask[:, -self.config.max_tokens :]
            length = self.config.max_tokens
        tokens = self.proj(self.in_norm(features))  # (B, T, d)
        tokens = tokens + self.token_pos[:length].flip(0)  # the last token gets position 0
        q = self.queries.expand(batch, -1, -1)  # (B, D, d)
        x = q + self.cross(self.cross_norm(q), tokens, tokens, key_padding_mask=~mask, need_weights=False)[0]
        for block in self.blocks:
            x = block(x)
        x = self.out_norm(x)
        return self.boundary_head(x).squeeze(-1), self.op_head(x)

    def num_parameters(self) -> int:
        """Trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors into directory (replaced atomically)."""
        from safetensors.torch import save_file

        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
            # mkdtemp makes a private folder; give it the usual umask permissions.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            for f in tmp.iterdir():
                os.chmod(f, 0o666 & ~umask)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


def load_router(directory: str | os.PathLike, lm: LoadedModel | None = None) -> Router:
    """Read a router checkpoint; with lm, check that it was made for that model.

    Raises:
        RouterError: missing or corrupted files, or a checkpoint for another model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(directory)
    try:
        data = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RouterError(f"cannot read router config {folder / CONFIG_FILE}: {err}") from err
    config = RouterConfig.from_dict(data)
    if lm is not None:
        check_compatible(config, lm)
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise RouterError(f"cannot read router weights {folder / WEIGHTS_FILE}: {err}") from err
    router = Router(config)
    expected = {k: tuple(v.shape) for k, v in router.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise RouterError(f"router weights in {folder} do not match its config.json (first differences: {diff})")
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise RouterError(f"router weights in {folder} hold NaN or infinite values")
    router.load_state_dict(state)
    return router.eval()


def check_compatible(config: RouterConfig, lm: LoadedModel) -> None:
    """Raise RouterError unless a router with this config can route lm."""
    if config.num_layers != lm.num_layers or config.feature_size != lm.adapter.hidden_size:
        raise RouterError(
            f"router was trained for {config.model_name!r} ({config.num_layers} layers, hidden size "
            f"{config.feature_size}); {lm.name!r} has {lm.num_layers} layers, hidden size {lm.adapter.hidden_size}"
        )
    if config.model_name != lm.name:
        warnings.warn(f"router was trained for {config.model_name!r}, used with {lm.name!r} (same shape)", stacklevel=3)


def default_router_path(model_name: str) -> Path:
    """Where the shipped router for a model lives: polar_core/assets/router/<model>/."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", model_name).strip(".-") or "model"
    return ASSET_ROOT / safe


def load_default_router(lm: LoadedModel) -> Router | None:
    """The shipped router for lm, or None when none ships for it."""
    folder = default_router_path(lm.name)
    if not (folder / CONFIG_FILE).is_file():
        return None
    return load_router(folder, lm)


# --------------------------------------------------------------------------
# features


def encode(lm: LoadedModel, prompts: Sequence[str | Sequence[int]], chat: bool = False) -> EncodedBatch:
    """Prompts as text (tokenized like the executor does) or as token ids -> one batch."""
    if all(isinstance(p, str) for p in prompts):
        return encode_prompts(lm, list(prompts), chat=chat)
    if any(isinstance(p, str) for p in prompts):
        raise RouterError("pass prompts either all as text or all as token ids")
    pad = getattr(lm.tokenizer, "pad_token_id", None) or 0
    return pad_left([list(map(int, p)) for p in prompts], pad, lm.device)


@torch.inference_mode()
def _frozen_features(lm: LoadedModel, config: RouterConfig, batch: EncodedBatch) -> torch.Tensor:
    ids = batch.input_ids[:, -config.max_tokens :]
    if config.feature_layer == 0:
        return lm.adapter.embed(ids).float()  # (B, T, F)
    # Run the whole prompt so attention sees every token, keep the last max_tokens.
    prefix = Program.early_exit(lm.num_layers, config.feature_layer - 1)
    hidden = prefill(lm, batch, [prefix] * len(batch.lengths)).hidden
    return hidden[:, -config.max_tokens :].float()


def router_features(lm: LoadedModel, config: RouterConfig, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (B, T, F) float32 on the CPU and their mask (B, T) for a batch."""
    feats = _frozen_features(lm, config, batch)
    mask = batch.attention_mask[:, -config.max_tokens :].bool()
    # clone() outside inference mode: autograd may then save them for backward.
    return feats.cpu().clone(), mask.cpu().clone()


# --------------------------------------------------------------------------
# targets


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
    shortest = min(p.num_steps for p in usable)
    targets = {p: 1.0 for p in usable if p.num_steps == shortest}
    full = Program.full(depth)
    full_valid = full in sample.valid_programs or (sample.initial_score or 0.0) > 0.0
    if full_valid and shortest < depth:
        targets[full] = config.full_path_weight
    return list(targets.items())


# --------------------------------------------------------------------------
# loss and training


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
    from polar_core.tasks import build_prompt, load_suite

    by_question = {}
    for item in sorted(load_suite() if items is None else items, key=lambda it: it.id):
        by_question.setdefault(item.question, item)
    return [build_prompt(by_question[s.question]) if s.question in by_question else s.question for s in samples]


def _examples(lm, samples, prompts, config, batch_size, progress) -> list[_Example]:
    from tqdm.auto import tqdm

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
) -> Router:
    """Train a router on supervision samples (on the CPU; the base model stays frozen).

    Args:
        samples: questions with their valid programs (``load_supervision``).
        config: default ``RouterConfig.for_model(lm)``.
        prompts: the model's input per sample; default ``prompts_for(samples)``.
        max_steps: stop after this many optimizer steps (tests).
    Returns:
        The trained router in eval mode; ``router.loss_history`` holds the mean
        loss of each epoch.
    """
    from tqdm.auto import tqdm

    config = config or RouterConfig.for_model(lm)
    check_compatible(config, lm)
    prompts = prompts_for(samples) if prompts is None else prompts
    if len(prompts) != len(samples):
        raise RouterError(f"got {len(prompts)} prompts for {len(samples)} samples")
    examples = _examples(lm, samples, prompts, config, 16, progress)
    if not examples:
        raise RouterError("no sample has a valid program the router can express: nothing to train on")
    torch.manual_seed(seed)
    router = Router(config)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * math.ceil(len(examples) / batch_size)
    if max_steps is not None:
        total = min(total, max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.1)
    order = random.Random(seed)  # a private RNG: the global one stays untouched
    router.train()
    step = 0
    bar = tqdm(total=total, desc="router training", unit="step", disable=not progress)
    for _ in range(epochs):
        shuffled = order.sample(examples, len(examples))
        losses = []
        for i in range(0, len(shuffled), batch_size):
            if step >= total:
                break
            feats, mask, owner, boundary, ops, weight = _collate(shuffled[i : i + batch_size])
            b_logits, o_logits = router(feats, mask)
            loss = router_loss(b_logits[owner], o_logits[owner], boundary, ops, weight)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(router.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if losses:
            router.loss_history.append(sum(losses) / len(losses))
    bar.close()
    return router.eval()


@torch.no_grad()
def evaluate_loss(router: Router, lm: LoadedModel, samples, prompts=None) -> float:
    """Mean training loss of a router on samples (no update): for validation."""
    prompts = prompts_for(samples) if prompts is None else prompts
    examples = _examples(lm, samples, prompts, router.config, 16, False)
    router.eval()
    total, weight = 0.0, 0
    for i in range(0, len(examples), 64):
        feats, mask, owner, boundary, ops, w = _collate(examples[i : i + 64])
        b_logits, o_logits = router(feats, mask)
        n = len(examples[i : i + 64])
        total += router_loss(b_logits[owner], o_logits[owner], boundary, ops, w).item() * n
        weight += n
    return total / max(weight, 1)


# --------------------------------------------------------------------------
# decoding


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


def rigged_router(config: RouterConfig, op: str = "keep") -> Router:
    """A router that always prefers one op everywhere ("keep" = the full program).

    For tests and as a sanity baseline: its top-1 must reproduce the full
    program's results exactly.
    """
    router = Router(config)
    with torch.no_grad():
        router.op_head.weight.zero_()
        router.op_head.bias.fill_(-50.0)
        router.op_head.bias[OPS.index(op)] = 50.0
    return router.eval()

