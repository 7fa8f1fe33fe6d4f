"""Analyses of a trace against the full program's trace: fast enough to rerun on
every edit of a program.

Steps are numbered from 1: step k runs layer ``program.path[k - 1]`` and its
output is ``trace.step_hidden[k]`` (row 0 holds the embeddings). Every per-step
array below has one entry per step, index k - 1 for step k.

- Block influence (ShortGPT, arXiv 2403.03853): BI_k = 1 - cos(h_{k-1}, h_k).
- Angular distance (Gromov et al., arXiv 2403.17887): arccos(cos) / pi in [0, 1].
- Alignment: the edited trajectory after step k against the full program's
  state after the same layer, and against its final state.
- Logit lens: final norm + LM head on each step's state (``kernels.fused_logit_lens``),
  with the rank of chosen tokens counted in vocabulary chunks, never
  materializing steps x vocab logits.
- Answer change: token-level diff of two answers (difflib opcodes).
- Model-level redundancy over a set of prompts, the ShortGPT and Gromov
  presets built from it, and the shipped measurements (``load_redundancy``).

``analyze`` bundles everything the UI draws into one ``Analysis``.
"""
from __future__ import annotations

import difflib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polar_core.assets import asset_path
from polar_core.models import LoadedModel
from polar_core.program import Program

REDUNDANCY_DIR = asset_path("redundancy")
# Vocabulary columns per matmul when counting ranks: a (rows, 8192) fp32 tile.
RANK_VOCAB_CHUNK = 8192


# ---------------------------------------------------------------- helpers


def step_labels(path: Sequence[int]) -> list[str]:
    """'s1·L0', 's2·L1', ...: step number (1-based, after the embeddings) and its layer."""
    return [f"s{k + 1}·L{layer}" for k, layer in enumerate(path)]


def step_ops(path: Sequence[int]) -> list[str]:
    """Per step "keep" for a layer's first visit and "repeat" for later visits (loops)."""
    seen: set[int] = set()
    ops = []
    for layer in path:
        ops.append("repeat" if layer in seen else "keep")
        seen.add(layer)
    return ops


def _last_token(step_hidden: torch.Tensor) -> torch.Tensor:
    """(K+1, d) from a trajectory captured as (K+1, d) or (K+1, T, d)."""
    return step_hidden if step_hidden.dim() == 2 else step_hidden[:, -1]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def angular_distance(cos: torch.Tensor) -> torch.Tensor:
    """Gromov et al.'s angular distance arccos(cos) / pi, in [0, 1]."""
    return torch.arccos(cos.float().clamp(-1.0, 1.0)) / math.pi


# ---------------------------------------------------------------- 1. block influence


def block_influence(step_hidden: torch.Tensor) -> torch.Tensor:
    """BI per step, 1 - cos(input, output), per token.

    Args:
        step_hidden: (K+1, d) or (K+1, T, d); row 0 = embeddings.
    Returns:
        (K,) or (K, T) float32; 0 where a step left the state's direction unchanged.
    """
    u = _unit(step_hidden)
    return 1.0 - (u[:-1] * u[1:]).sum(-1)


# ---------------------------------------------------------------- 2. step x step similarity


def similarity_matrix(step_hidden: torch.Tensor, *, tokens: str = "last") -> torch.Tensor:
    """Cosine similarity between every pair of trajectory states, embeddings included.

    Args:
        step_hidden: (K+1, d) or (K+1, T, d).
        tokens: "last" (the last prompt token) or "mean" (the per-token cosine
            matrices averaged over tokens; needs (K+1, T, d)).
    Returns:
        (K+1, K+1) float32, diagonal 1.
    """
    from kernels import cosine_similarity_matrix

    if tokens == "last":
        return cosine_similarity_matrix(_last_token(step_hidden)[None])[0]
    if tokens != "mean":
        raise ValueError(f"tokens must be 'last' or 'mean', got {tokens!r}")
    if step_hidden.dim() != 3:
        raise ValueError("tokens='mean' needs every token's states: generate with capture='all'")
    return cosine_similarity_matrix(step_hidden.transpose(0, 1)).mean(0)  # (T, K+1, K+1) -> mean


# ---------------------------------------------------------------- 3. alignment


def _check_baseline(baseline, num_layers: int) -> None:
    if not baseline.program.is_full:
        raise ValueError(f"the baseline must be the full program, got [{baseline.program.format()}]")
    if baseline.program.num_layers != num_layers:
        raise ValueError(f"baseline has {baseline.program.num_layers} layers, the program {num_layers}")
    if baseline.step_hidden is None:
        raise ValueError("the baseline trace has no captured states: generate it with capture='last' or 'all'")


def alignment(trace, baseline) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of the edited trajectory to the full program's, at the last prompt token.

    Returns:
        to_same_layer (K,): after step k (running layer i), cos to the full
            program's state after layer i; to_final (K,): cos to its final state.
    """
    program = trace.program
    _check_baseline(baseline, program.num_layers)
    edited = _unit(_last_token(trace.step_hidden)[1:])  # (K, d)
    full = _unit(_last_token(baseline.step_hidden)[1:])  # (D, d): row i = after layer i
    same = full[torch.tensor(program.path, device=full.device)]  # (K, d)
    return (edited * same).sum(-1), edited @ full[-1]


# ---------------------------------------------------------------- 4. logit lens


@dataclass
class TokenTrack:
    """One token followed through the steps of the lens.

    ``rank`` is 1-based (1 = top-1); steps are 1-based step numbers.
    """

    name: str  # "answer" | "expected"
    token_id: int
    token: str
    prob: torch.Tensor  # (K,)
    rank: torch.Tensor  # (K,) int64
    first_top1: int | None  # first step where the token is top-1
    top1_from: int | None  # first step from which it stays top-1 to the end


@dataclass
class Lens:
    """Logit lens over the steps of one trajectory (the embeddings row left out)."""

    top_ids: torch.Tensor  # (K, k) int64, best first
    top_probs: torch.Tensor  # (K, k)
    top_tokens: list[list[str]]  # (K, k) decoded
    entropy: torch.Tensor  # (K,) nats
    tracks: dict[str, TokenTrack] = field(default_factory=dict)


# Lens logits up to this size are computed in one matmul (see logit_lens).
MATERIALIZE_LENS_BYTES = 64 << 20


def _lens_params(adapter) -> dict:
    return dict(eps=adapter.norm_eps, norm_offset=adapter.norm_offset, softcap=adapter.final_logit_softcap)


def target_logits_and_ranks(
    hidden: torch.Tensor, norm_weight, lm_head_weight, target_ids: torch.Tensor, *,
    eps: float, norm_offset: float = 0.0, softcap: float | None = None, chunk: int = RANK_VOCAB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lens logit and rank of T target tokens per row, vocabulary chunk by chunk.

    Args:
        hidden: (N, d) states before the final norm.
        target_ids: (N, T) token ids.
    Returns:
        logits (N, T) float32 and ranks (N, T) int64, 1-based: 1 + the number
        of *other* tokens with a strictly larger logit. The target's own
        column is left out of the count, so rounding cannot rank a token
        below itself.
    """
    from kernels.logit_lens import normalized_rows

    w = lm_head_weight
    # Rounded to W's dtype first, as the lens kernel does, so that probabilities
    # from its log-sum-exp and our target logits agree for bf16 models too.
    x = normalized_rows(hidden, norm_weight, eps, norm_offset, w.dtype).float()  # (N, d)
    cap = (lambda z: z) if softcap is None else (lambda z: torch.tanh(z / softcap) * softcap)
    tgt = target_ids.to(device=x.device, dtype=torch.long)
    z_t = cap(torch.einsum("nd,ntd->nt", x, w[tgt].float()))  # (N, T)
    above = torch.zeros_like(tgt)
    for v0 in range(0, w.shape[0], chunk):
        z = cap(x @ w[v0 : v0 + chunk].float().T)  # (N, C)
        above += (z[:, None, :] > z_t[:, :, None]).sum(-1)
        # Take back the target's own column, as this matmul computed it (masked,
        # not branched on, so a GPU never waits for the host).
        inside = (tgt >= v0) & (tgt < v0 + z.shape[1])
        own = z.gather(1, (tgt - v0).clamp(0, z.shape[1] - 1))
        above -= (inside & (own > z_t)).long()
    return z_t, above + 1


def _first_top1(rank: torch.Tensor) -> tuple[int | None, int | None]:
    """(first step at rank 1, first step from which rank stays 1), 1-based."""
    top = (rank == 1).tolist()
    first = next((k + 1 for k, t in enumerate(top) if t), None)
    stays = None
    for k in range(len(top), 0, -1):
        if not top[k - 1]:
            break
        stays = k
    return first, stays


def decode_tokens(lm: LoadedModel, ids: Sequence[int]) -> list[str]:
    """Each id decoded alone; "<id>" when the model has no tokenizer (tiny test models)."""
    tok = lm.tokenizer
    if tok is None:
        return [f"<{i}>" for i in ids]
    return tok.batch_decode([[int(i)] for i in ids], skip_special_tokens=False)


def logit_lens(
    lm: LoadedModel, step_hidden: torch.Tensor, *, k: int = 5, targets: dict[str, int] | None = None
) -> Lens:
    """Final norm + LM head on each step's state at the last prompt token.

    Args:
        step_hidden: (K+1, d) or (K+1, T, d); row 0 (embeddings) is left out.
        targets: name -> token id to track (probability, rank, first top-1 step).
    """
    from kernels import fused_logit_lens
    from kernels.logit_lens import lens_from_logits, lens_logits

    a = lm.adapter
    h = _last_token(step_hidden)[1:]  # (K, d)
    norm_w, head_w = a.norm.weight, a.lm_head.weight
    h = h.to(head_w.device)
    k = min(k, head_w.shape[0])
    names = list(targets or {})
    ids = torch.tensor([targets[n] for n in names], device=h.device, dtype=torch.long).expand(h.shape[0], -1)  # (K, T)
    # A program's last-token lens has few rows (K x V logits: 6 MB for 31 steps
    # of SmolLM2): one matmul then serves the statistics and the target ranks.
    # Many rows (every token) stream through the fused kernel, then a second,
    # chunked pass ranks the targets, so memory stays bounded.
    if h.shape[0] * head_w.shape[0] * 4 <= MATERIALIZE_LENS_BYTES:
        logits = lens_logits(h, norm_w, head_w, **_lens_params(a))  # (K, V) fp32
        res = lens_from_logits(logits, k=k)
        z_t = logits.gather(1, ids)  # (K, T)
        ranks = (logits[:, None, :] > z_t[:, :, None]).sum(-1) + 1
    else:
        res = fused_logit_lens(h, norm_w, head_w, k=k, **_lens_params(a))
        z_t, ranks = target_logits_and_ranks(h, norm_w, head_w, ids, **_lens_params(a)) if names else (None, None)
    top_ids = res.top_ids.cpu()
    flat = decode_tokens(lm, top_ids.flatten().tolist())
    width = top_ids.shape[1]
    lens = Lens(top_ids, res.top_logprobs.exp().cpu(), [flat[i : i + width] for i in range(0, len(flat), width)],
                res.entropy.cpu())
    if names:
        probs = (z_t - res.logsumexp[:, None]).exp().cpu()
        for j, name in enumerate(names):
            token_id = int(targets[name])
            rank = ranks[:, j].cpu()
            lens.tracks[name] = TokenTrack(name, token_id, decode_tokens(lm, [token_id])[0], probs[:, j], rank,
                                           *_first_top1(rank))
    return lens


def expected_token_ids(lm: LoadedModel, prompt_ids: Sequence[int], expected: str) -> list[int]:
    """Token ids of `expected` as the model would emit them right after the prompt.

    The choice: when the prompt ends in whitespace (a chat template's
    "assistant\\n") the answer starts a new word, so it is tokenized as is;
    otherwise (a few-shot "...\\nA:") it follows a space, so " " + expected.
    Tokenizing separately rather than prompt + answer keeps BPE merges across
    the boundary from changing the prompt's own tokens.
    """
    tok = lm.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer: pass the expected answer as token ids")
    text = expected.strip()
    if not text:
        raise ValueError("the expected answer is empty")
    tail = tok.decode(list(prompt_ids[-1:])) if prompt_ids else "\n"
    ends_in_space = not tail or tail[-1].isspace()
    return list(tok(text if ends_in_space else " " + text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- 5. answer change


@dataclass(frozen=True)
class DiffSpan:
    """One changed span between answers a and b: difflib's op and token ranges."""

    op: str  # "replace" | "delete" | "insert"
    a_start: int
    a_end: int
    b_start: int
    b_end: int
    a_text: str
    b_text: str


@dataclass(frozen=True)
class AnswerDiff:
    """Token-level difference of answer b (e.g. edited) against answer a (e.g. full)."""

    identical: bool
    first_divergence: int | None  # first token position where they differ; None if identical
    spans: tuple[DiffSpan, ...]  # changed spans only, in order

    def marked(self, b_tokens: Sequence[str]) -> list[tuple[str, str | None]]:
        """b's tokens grouped as (text, "changed" | None), for a highlighted-text view."""
        out: list[tuple[str, str | None]] = []
        pos = 0
        for s in self.spans:
            if s.b_start > pos:
                out.append(("".join(b_tokens[pos : s.b_start]), None))
            if s.b_end > s.b_start:
                out.append(("".join(b_tokens[s.b_start : s.b_end]), "changed"))
            pos = s.b_end
        if pos < len(b_tokens):
            out.append(("".join(b_tokens[pos:]), None))
        return out


def answer_diff(a: Sequence[int], b: Sequence[int], decode=None) -> AnswerDiff:
    """Diff two answers' token ids.

    Args:
        a, b: token ids (a = reference, b = new).
        decode: ids -> text for the spans' text (default: the ids written out).
    """
    a, b = [int(t) for t in a], [int(t) for t in b]
    decode = decode or (lambda ids: " ".join(map(str, ids)))
    if a == b:
        return AnswerDiff(True, None, ())
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    spans = tuple(
        DiffSpan(op, i1, i2, j1, j2, decode(a[i1:i2]), decode(b[j1:j2]))
        for op, i1, i2, j1, j2 in matcher.get_opcodes()
        if op != "equal"
    )
    return AnswerDiff(False, first, spans)


def expected_met(answer_text: str, expected: str | None) -> bool | None:
    """Whether the answer is right (polar_core.tasks.check_answer); None without an expected answer."""
    if not expected:
        return None
    try:
        from polar_core.tasks import check_answer
    except ImportError:  # task suite missing: a plain normalized comparison
        return answer_text.strip().casefold() == expected.strip().casefold()
    return check_answer(answer_text, expected)


# ---------------------------------------------------------------- 7. the bundle


@dataclass
class Analysis:
    """Everything the UI draws for one run, as plain tensors and lists.

    Per-step arrays have K entries (steps 1..K); matrices include the
    embeddings as row/column 0 (``similarity_labels``). Token ranks are 1-based.
    """

    program: Program
    labels: list[str]  # (K,) "s3·L2"
    ops: list[str]  # (K,) "keep" | "repeat"
    block_influence: torch.Tensor  # (K,) at the last prompt token
    block_influence_mean: torch.Tensor | None  # (K,) mean over prompt tokens (capture="all" only)
    similarity_labels: list[str]  # (K+1,) "emb" + labels
    similarity: torch.Tensor  # (K+1, K+1) cosine, last token
    angular: torch.Tensor  # (K+1, K+1) arccos(cos)/pi
    similarity_mean: torch.Tensor | None  # (K+1, K+1) cosine averaged over tokens (capture="all" only)
    cos_to_baseline: torch.Tensor  # (K,) vs the full program after the same layer
    cos_to_final: torch.Tensor  # (K,) vs the full program's final state
    lens: Lens  # this program's logit lens (tracks: "answer", "expected")
    baseline_labels: list[str]  # (D,)
    baseline_lens: Lens  # the full program's lens, same tracked tokens
    answer_diff: AnswerDiff  # this program's answer vs the full program's
    answer_text: str
    baseline_text: str
    expected: str | None
    expected_met: bool | None
    baseline_expected_met: bool | None
    seconds: float  # time analyze took
    # Answer tokens before the lens position: 1 when the answer opens with a
    # bare space and the lens looks where its first content token is chosen.
    lens_offset: int = 0
    baseline_lens_offset: int = 0

    def answer_probability_series(self, name: str = "answer") -> dict[str, tuple[list[str], list[float]]]:
        """{"full program": ..., "edited program": ...} for figures.answer_probability_curve."""
        series = {}
        if name in self.baseline_lens.tracks:
            series["full program"] = (self.baseline_labels, self.baseline_lens.tracks[name].prob.tolist())
        if name in self.lens.tracks and not self.program.is_full:
            series["edited program"] = (self.labels, self.lens.tracks[name].prob.tolist())
        return series


def _is_blank(lm: LoadedModel, token_id: int) -> bool:
    return not decode_tokens(lm, [token_id])[0].strip()


def _first_content(lm: LoadedModel, ids: Sequence[int]) -> int | None:
    """The first id that is not whitespace alone (else the first id)."""
    for i in ids:
        if not _is_blank(lm, i):
            return int(i)
    return int(ids[0]) if ids else None


def lens_states(lm: LoadedModel, trace) -> tuple[torch.Tensor, int]:
    """Where a trace's logit lens looks: (per-step states, answer tokens before it).

    At the last prompt token, where the answer's first token is chosen, unless
    that token is whitespace alone (SmolLM2 writes " 7" as " ", "7"): a lens
    of the space says nothing, so it looks one token on, where the first
    digit or word is chosen.
    """
    ids = trace.token_ids
    if trace.answer_step_hidden is not None and len(ids) >= 2 and _is_blank(lm, ids[0]):
        return trace.answer_step_hidden, 1
    return trace.step_hidden, 0


def _targets(lm: LoadedModel, trace, baseline, expected) -> dict[str, int]:
    """Tokens to track: the answer's first content token (this program's, else
    the full program's when this one answered nothing), and the expected answer's."""
    targets = {}
    answer = _first_content(lm, trace.token_ids) if trace.token_ids else _first_content(lm, baseline.token_ids)
    if answer is not None:
        targets["answer"] = answer
    if expected is not None and not isinstance(expected, str):
        ids = [int(i) for i in expected]
    elif expected:
        ids = expected_token_ids(lm, trace.prompt_ids, expected)
    else:
        ids = []
    if ids:
        targets["expected"] = _first_content(lm, ids)
    return targets


@torch.inference_mode()
def analyze(lm: LoadedModel, trace, baseline, *, expected: str | Sequence[int] | None = None, k: int = 5) -> Analysis:
    """All analyses of `trace` against `baseline` (the full program on the same prompt).

    Args:
        trace, baseline: Traces generated with capture="last" or "all".
        expected: the expected answer as text (see ``expected_token_ids``) or
            token ids; None when unknown.
        k: top-k tokens of the lens.
    """
    started = time.perf_counter()
    if trace.step_hidden is None:
        raise ValueError("the trace has no captured states: generate it with capture='last' or 'all'")
    _check_baseline(baseline, trace.program.num_layers)
    if list(trace.prompt_ids) != list(baseline.prompt_ids):
        raise ValueError("trace and baseline were run on different prompts")
    program, hidden = trace.program, trace.step_hidden
    labels = step_labels(program.path)
    bi = block_influence(hidden)
    many = hidden.dim() == 3
    targets = _targets(lm, trace, baseline, expected)
    lens_hidden, lens_offset = lens_states(lm, trace)
    baseline_lens_hidden, baseline_lens_offset = lens_states(lm, baseline)
    sim = similarity_matrix(hidden)
    to_same, to_final = alignment(trace, baseline)
    text = expected if isinstance(expected, str) else None
    decode = lambda ids: "".join(decode_tokens(lm, ids))  # noqa: E731
    return Analysis(
        program=program,
        labels=labels,
        ops=step_ops(program.path),
        block_influence=bi[:, -1].cpu() if many else bi.cpu(),
        block_influence_mean=bi.mean(-1).cpu() if many else None,
        similarity_labels=["emb"] + labels,
        similarity=sim.cpu(),
        angular=angular_distance(sim).cpu(),
        similarity_mean=similarity_matrix(hidden, tokens="mean").cpu() if many else None,
        cos_to_baseline=to_same.cpu(),
        cos_to_final=to_final.cpu(),
        lens=logit_lens(lm, lens_hidden, k=k, targets=targets),
        baseline_labels=step_labels(baseline.program.path),
        baseline_lens=logit_lens(lm, baseline_lens_hidden, k=k, targets=targets),
        answer_diff=answer_diff(baseline.token_ids, trace.token_ids, decode),
        answer_text=trace.text,
        baseline_text=baseline.text,
        expected=text,
        expected_met=expected_met(trace.text, text),
        baseline_expected_met=expected_met(baseline.text, text),
        seconds=time.perf_counter() - started,
        lens_offset=lens_offset,
        baseline_lens_offset=baseline_lens_offset,
    )


# ---------------------------------------------------------------- 6. model-level redundancy


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
    from polar_core.executor import encode_prompts, prefill

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
