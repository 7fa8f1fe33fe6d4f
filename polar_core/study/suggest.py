"""Training-free program suggestions for any model and any prompt.

No router, no checkpoint, no search budget: from the full program's own run
on *this* prompt,

1. measure each layer's influence on this input (ShortGPT's block influence,
   1 - cos(h_l, h_{l+1}) averaged over the prompt's tokens, and Gromov's
   angular distance between a block's input and output at the last token);
2. propose candidates: skip this input's k least influential layers, skip its
   most redundant block of n, skip single quiet layers, loop its most
   influential layer or block once more;
3. verify every candidate in one batched teacher-forced pass
   (``polar_core.study.scoring``) against the full program's own answer: a
   candidate is kept when each answer token is its greedy choice and the
   full program's next token follows (then greedy decoding under it gives
   the same answer tokens);
4. rank the kept ones by compute (layer calls per token), then by margin.

What this is and is not: a suggestion is *verified to keep the full
program's answer* (its first ``answer_tokens`` tokens for free text), so its
accuracy is the full program's; it never corrects a wrong answer. Finding it
costs the full program's run plus one pass per candidate, so it saves nothing
on this input: it shows which layers this input can spare. It works for every
supported family (tests run it on a tiny random model of each).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from polar_core.engine.forward import prefill
from polar_core.engine.generate import Stopping, generate
from polar_core.engine.inputs import encode_prompts, eos_token_ids, pad_id, pad_left
from polar_core.engine.models import LoadedModel
from polar_core.program import Program
from polar_core.study.prompts import prompt_style
from polar_core.study.redundancy import gromov_program, layer_redundancy, shortgpt_program
from polar_core.study.scoring import Target, line_end_ids, teacher_forced_scores

ANSWER_TOKENS = 8  # answer tokens a suggestion must reproduce (few-shot answers end sooner, at the newline)
MAX_CANDIDATES = 24  # programs verified per prompt: one teacher-forced pass


@dataclass(frozen=True)
class Suggestion:
    """A program verified to keep the full program's answer on one prompt."""

    program: Program
    margin: float  # teacher-forced margin over the answer tokens (> 0: every greedy choice kept)
    how: str  # how the candidate was made, e.g. "skip the 3 least influential layers"


@dataclass
class Suggestions:
    """What ``suggest_programs`` found for one prompt."""

    answer_ids: list[int]  # the full program's answer tokens every suggestion reproduces
    answer_text: str
    influence: list[float]  # (D,) block influence per layer on this input
    suggestions: list[Suggestion]  # verified, cheapest first
    candidates: int  # programs verified
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def programs(self) -> list[Program]:
        return [s.program for s in self.suggestions]


def candidate_programs(influence: torch.Tensor, distances: torch.Tensor, *, max_candidates: int = MAX_CANDIDATES,
                       ) -> list[tuple[Program, str]]:
    """Skip and loop candidates from one input's per-layer influence (D,) and
    block distances (D, D) [n - 1, l], most promising first, no duplicates."""
    depth = influence.shape[0]
    order = torch.argsort(influence, stable=True).tolist()  # least influential first
    found: dict[tuple[int, ...], tuple[Program, str]] = {}

    def add(program: Program, how: str) -> None:
        if not program.is_full and program.path not in found:
            found[program.path] = (program, how)

    most = max(1, depth // 3)
    for n in range(1, most + 1):  # ShortGPT on this input, and Gromov on it, interleaved
        add(shortgpt_program(influence, n), f"skip the {n} least influential layer{'s' * (n > 1)} on this prompt")
        if n <= min(6, depth - 1):
            add(gromov_program(distances, n), f"skip the most redundant block of {n} on this prompt")
    for layer in order[: min(6, depth)]:
        add(Program.skip(depth, layer, layer), f"skip layer {layer} (influence rank {order.index(layer) + 1})")
    loud = order[::-1]
    for layer in loud[:3]:
        add(Program.loop(depth, layer, layer, 2), f"run layer {layer} twice (the most influential here)")
    start = int(torch.stack([influence[i: i + 2].sum() for i in range(depth - 1)]).argmax()) if depth > 1 else 0
    if depth > 1:
        add(Program.loop(depth, start, start + 1, 2), f"run the most influential pair {start}-{start + 1} twice")
    if depth > 2 and order[0] != loud[0]:  # a quiet layer dropped, a loud one looped: same depth, another path
        path = tuple(layer for layer in range(depth) if layer != order[0])
        i = path.index(loud[0])
        add(Program(path[: i + 1] + path[i:], depth), f"skip layer {order[0]}, run layer {loud[0]} twice")
    return list(found.values())[:max_candidates]


def _influence_candidates(step_hidden: torch.Tensor, max_candidates: int):
    """One full-program trajectory -> this input's block influence (D,) and its candidates."""
    influence, _, distances = layer_redundancy(step_hidden)  # per layer, this input
    influence = torch.nan_to_num(influence.double(), nan=0.0)
    return influence, candidate_programs(influence, distances, max_candidates=max_candidates)


@torch.inference_mode()
def influence_plans(lm: LoadedModel, prompts: Sequence[Sequence[int]], *, max_candidates: int = MAX_CANDIDATES,
                    batch_size: int = 16) -> list[tuple[list[Program], list[int]]]:
    """Per prompt (token ids): this input's candidate programs and its layers,
    least influential first, from the full program's pass over the prompt.
    What ``polar_core.study.search.InfluenceSearch`` starts from."""
    full = Program.full(lm.num_layers)
    plans = []
    for lo in range(0, len(prompts), batch_size):
        batch = pad_left([list(p) for p in prompts[lo : lo + batch_size]], pad_id(lm), lm.device)
        pre = prefill(lm, batch, [full] * len(batch.lengths), capture="all")
        for hidden in pre.step_hidden:
            influence, cands = _influence_candidates(hidden, max_candidates)
            plans.append(([p for p, _ in cands], torch.argsort(influence, stable=True).tolist()))
    return plans


def _encode(lm: LoadedModel, prompt: str | Sequence[int]) -> tuple[list[int], bool]:
    """(token ids, few-shot?) of a prompt, styled as the explorer runs it."""
    if isinstance(prompt, str):
        style = prompt_style(lm, prompt)
        return encode_prompts(lm, [prompt], chat=style.chat).input_ids[0].tolist(), style.few_shot
    return [int(i) for i in prompt], False


def _answer_target(lm: LoadedModel, prompt_ids: list[int], trace, few_shot: bool, answer_tokens: int) -> Target | None:
    """The full program's answer as a teacher-forcing target: its first tokens
    (up to the newline for a few-shot answer, at most `answer_tokens`), then
    the token it wrote next: any line end for a few-shot answer, any
    end-of-sequence when it stopped there. None when it wrote nothing."""
    tokens = list(trace.token_ids)  # answer_tokens + 1 of them unless it stopped at end-of-sequence
    if few_shot and lm.tokenizer is not None:
        ends = line_end_ids(lm.tokenizer)
        cut = next((i for i, t in enumerate(tokens) if t in ends), None)
        if cut == 0:  # an empty answer: the line end itself must come first, then what followed it
            return Target(prompt_ids, tokens[:1], set(tokens[1:2]) or eos_token_ids(lm) or {tokens[0]})
        if cut is not None and cut <= answer_tokens:
            return Target(prompt_ids, tokens[:cut], ends | eos_token_ids(lm))
    if len(tokens) > answer_tokens:
        return Target(prompt_ids, tokens[:answer_tokens], {tokens[answer_tokens]})
    if tokens and eos_token_ids(lm):
        return Target(prompt_ids, tokens, eos_token_ids(lm))
    return None


@torch.inference_mode()
def suggest_programs(lm: LoadedModel, prompt: str | Sequence[int], *, k: int = 5, answer_tokens: int = ANSWER_TOKENS,
                     max_candidates: int = MAX_CANDIDATES) -> Suggestions:
    """Up to k programs, cheapest first, verified to keep the full program's answer on this prompt.

    Args:
        prompt: text (styled as the explorer runs it: few-shot or chat) or token ids.
        answer_tokens: how many of the full answer's tokens a suggestion must keep.
        max_candidates: programs verified in the one teacher-forced pass.
    """
    return suggest_many(lm, [prompt], k=k, answer_tokens=answer_tokens, max_candidates=max_candidates)[0]


@torch.inference_mode()
def suggest_many(lm: LoadedModel, prompts: Sequence[str | Sequence[int]], *, k: int = 5,
                 answer_tokens: int = ANSWER_TOKENS, max_candidates: int = MAX_CANDIDATES,
                 batch_size: int = 16) -> list[Suggestions]:
    """``suggest_programs`` for many prompts: full runs batched, every
    prompt's candidates verified in one teacher-forced call per batch."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = []
    for lo in range(0, len(prompts), batch_size):
        started = time.perf_counter()
        encoded = [_encode(lm, p) for p in prompts[lo : lo + batch_size]]
        batch = pad_left([ids for ids, _ in encoded], pad_id(lm), lm.device)
        # No stop strings: the continuation past the answer gives the token that must follow it.
        traces = generate(lm, batch, None, max_new_tokens=answer_tokens + 1, capture="all",
                          stopping=Stopping(strings=()))
        found = []
        for (ids, few_shot), trace in zip(encoded, traces):
            influence, cands = _influence_candidates(trace.step_hidden, max_candidates)
            found.append((influence, cands, _answer_target(lm, ids, trace, few_shot, answer_tokens)))
        jobs = [(target, [p for p, _ in cands]) for _, cands, target in found if target is not None and cands]
        scores = iter(teacher_forced_scores(lm, jobs))
        seconds = (time.perf_counter() - started) / len(found)  # the batch's time, shared out
        for influence, cands, target in found:
            if target is None or not cands:
                why = "the full program wrote no answer to keep" if target is None else "no candidate programs"
                out.append(Suggestions([], "", influence.tolist(), [], 0, seconds, [why]))
                continue
            kept = [Suggestion(p, s.margin, how) for (p, how), s in zip(cands, next(scores)) if s.valid]
            kept.sort(key=lambda s: (s.program.layer_calls, -s.margin))
            text = lm.tokenizer.decode(list(target.answer_ids)) if lm.tokenizer is not None else ""
            m = len(target.answer_ids)
            notes = [f"verified by teacher forcing: each keeps the full program's first {m} answer "
                     f"token{'s' * (m > 1)} and the token after them"]
            out.append(Suggestions(list(target.answer_ids), text, influence.tolist(), kept[:k], len(cands),
                                   seconds, notes))
    return out


__all__ = ["ANSWER_TOKENS", "Suggestion", "Suggestions", "candidate_programs", "influence_plans", "suggest_many",
           "suggest_programs"]
