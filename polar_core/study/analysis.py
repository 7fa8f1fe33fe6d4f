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
- Answer change: token-level diff of two answers (difflib opcodes), and a
  word-level one of their texts for the page (whole words marked).

Model-level redundancy over many prompts lives in polar_core.study.redundancy.

``analyze`` bundles everything the UI draws into one ``Analysis``.
"""
from __future__ import annotations

import difflib
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from kernels import cosine_similarity_matrix, fused_logit_lens
from kernels.logit_lens import lens_from_logits, lens_logits, normalized_rows
from polar_core.engine.models import LoadedModel
from polar_core.program import Program
from polar_core.study.checker import check_answer, same_answer

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


def word_marks(a: str, b: str) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """Two answer texts as runs of (text, changed), whole words marked.

    Words are runs of non-space characters, compared with difflib; a space
    between two changed words is marked too, so a changed phrase reads as
    one span. Texts are decoded whole, so emoji and multi-token numbers stay
    intact (decoding token by token splits them).
    """
    words_a, words_b = re.findall(r"\S+", a), re.findall(r"\S+", b)
    changed_a, changed_b = [False] * len(words_a), [False] * len(words_b)
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=words_a, b=words_b, autojunk=False).get_opcodes():
        if op != "equal":
            changed_a[i1:i2] = [True] * (i2 - i1)
            changed_b[j1:j2] = [True] * (j2 - j1)
    return _word_runs(a, changed_a), _word_runs(b, changed_b)


def _word_runs(text: str, changed: list[bool]) -> list[tuple[str, bool]]:
    runs: list[tuple[str, bool]] = []
    word = 0
    for piece in re.split(r"(\S+)", text):
        if not piece:
            continue
        if piece.isspace():
            mark = 0 < word < len(changed) and changed[word - 1] and changed[word]
        else:
            mark, word = changed[word], word + 1
        if runs and runs[-1][1] == mark:
            runs[-1] = (runs[-1][0] + piece, mark)
        else:
            runs.append((piece, mark))
    return runs


def expected_met(answer_text: str, expected: str | None, rule: str = "exact") -> bool | None:
    """Whether the answer is right (polar_core.study.checker.check_answer under
    `rule`); None without an expected answer."""
    if not expected:
        return None
    return check_answer(answer_text, expected, rule=rule)


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
    rule: str = "exact"  # how expected_met was checked (polar_core.study.checker)
    same_answer: bool = True  # the two answers read the same (checker.same_answer)
    # Answer tokens before the lens position: 1 when the answer opens with a
    # bare space and the lens looks where its first content token is chosen.
    lens_offset: int = 0
    baseline_lens_offset: int = 0

    def step_frame(self) -> pd.DataFrame:
        """One row per step of this program: where it runs, how much it changes
        the hidden state, how close it stays to the full program, what the
        lens reads there (top-k tokens with probabilities, tracked tokens'
        probability and rank). The data behind the per-step charts, ready for
        CSV or JSON."""
        path = self.program.path
        columns = {
            "step": list(range(1, len(path) + 1)), "layer": list(path), "label": self.labels, "op": self.ops,
            "block_influence": self.block_influence.tolist(),
            "cos_to_full_same_layer": self.cos_to_baseline.tolist(), "cos_to_full_final": self.cos_to_final.tolist(),
            "lens_entropy": self.lens.entropy.tolist(),
        }
        for j in range(self.lens.top_ids.shape[1]):
            columns[f"top{j + 1}_token"] = [row[j] for row in self.lens.top_tokens]
            columns[f"top{j + 1}_prob"] = self.lens.top_probs[:, j].tolist()
        for name, track in self.lens.tracks.items():
            columns[f"{name}_token_prob"] = track.prob.tolist()
            columns[f"{name}_token_rank"] = track.rank.tolist()
        return pd.DataFrame(columns)

    def similarity_frame(self) -> pd.DataFrame:
        """The step x step cosine similarity (last prompt token), labelled; row/column "emb" = the embeddings."""
        return pd.DataFrame(self.similarity.numpy(), index=self.similarity_labels, columns=self.similarity_labels)

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
def analyze(lm: LoadedModel, trace, baseline, *, expected: str | Sequence[int] | None = None, k: int = 5,
            rule: str = "exact") -> Analysis:
    """All analyses of `trace` against `baseline` (the full program on the same prompt).

    Args:
        trace, baseline: Traces generated with capture="last" or "all".
        expected: the expected answer as text (see ``expected_token_ids``) or
            token ids; None when unknown.
        k: top-k tokens of the lens.
        rule: how answers are checked against `expected` ("exact" or
            "contains"; ``PromptStyle.answer_rule`` picks it for a prompt).
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
        expected_met=expected_met(trace.text, text, rule),
        baseline_expected_met=expected_met(baseline.text, text, rule),
        seconds=time.perf_counter() - started,
        rule=rule,
        same_answer=same_answer(trace.text, baseline.text),
        lens_offset=lens_offset,
        baseline_lens_offset=baseline_lens_offset,
    )
