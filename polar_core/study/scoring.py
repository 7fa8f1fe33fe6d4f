"""Score programs of layers on one question: is the program *valid*?

A program is valid for (question, answer) when greedy decoding under it gives
an answer the task checker accepts. Two ways to tell:

- ``decode_valid``: the exact definition. Many programs of one prompt run as
  the rows of one ``generate`` batch for a few new tokens, and each text goes
  through ``extract_answer`` and ``check_answer``.
- ``teacher_forced_scores``: one forward pass per program over the prompt
  followed by a *reference continuation*, checking that every continuation
  token is the greedy choice. The reference continuation (a ``Target``) is

      tokens(" " + answer)  then  any "line end" token

  where a line-end token is one whose text starts with a newline (SmolLM2's
  "\\n" and "\\n\\n" are different tokens, and the few-shot prompt makes the
  model emit either), or an end-of-sequence token. If the teacher-forced check
  passes, greedy decoding produces exactly " answer" and then a line end, so the
  checker sees ``answer``: teacher-forced valid implies decoding valid (up to
  float noise between batch shapes). The converse can fail: the model may write
  an accepted alias ("300 cm" for "300") or another tokenization of the same
  text. ``reference_target`` therefore takes the answer text as an argument:
  the search CLI passes the full program's own greedy answer when the checker
  accepts it, so the full program scores the same both ways.

Prefix sharing: the programs of one batch are put in a trie of their paths.
Each unique prefix is computed once, over all tokens, level by level; the nodes
of a level are batched per layer (``Adapter.run_layer`` with the rows of their
targets' masks and rotary tables), across programs *and* across questions.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from polar_core.engine.forward import forward_logits
from polar_core.engine.generate import PromptPassStopped, Stopping, generate
from polar_core.engine.inputs import eos_token_ids, pad_id, pad_left, resolve_programs
from polar_core.engine.models import LoadedModel
from polar_core.limits import Stopped
from polar_core.program import Program
from polar_core.study.checker import check_answer, extract_answer
from polar_core.study.tasks import STOP_TEXT, TaskItem, build_prompt

Scorer = Callable[[Sequence[Program]], list[bool]]


@dataclass(frozen=True)
class Target:
    """A prompt and the continuation a valid program must greedily produce."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # must be produced token by token
    stop_ids: frozenset[int]  # one of these must follow the answer

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(int(i) for i in self.prompt_ids))
        object.__setattr__(self, "answer_ids", tuple(int(i) for i in self.answer_ids))
        object.__setattr__(self, "stop_ids", frozenset(int(i) for i in self.stop_ids))
        if not self.prompt_ids:
            raise ValueError("a target needs at least one prompt token")
        if not self.answer_ids:
            raise ValueError("a target needs at least one answer token")
        if not self.stop_ids:
            raise ValueError("a target needs at least one stop token")

    @property
    def input_ids(self) -> tuple[int, ...]:
        """What is fed in teacher forcing: prompt then answer."""
        return self.prompt_ids + self.answer_ids


@dataclass(frozen=True)
class TFScore:
    """Teacher-forced result of one program: valid, and by how much.

    margin: over the answer positions, the smallest gap between the wanted
    logit and the best other one (for the stop position: best stop token minus
    best other token). Positive exactly when every greedy choice is right,
    barring exact ties.
    """

    valid: bool
    margin: float


# ---------------------------------------------------------------- targets


@functools.lru_cache(maxsize=8)
def line_end_ids(tokenizer) -> frozenset[int]:
    """Ids of tokens whose text starts with a newline (they end an answer)."""
    vocab = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab)])
    return frozenset(i for i, t in enumerate(texts) if t.startswith(STOP_TEXT))


def reference_target(lm: LoadedModel, item: TaskItem, *, answer: str | None = None, shots: int = 3) -> Target:
    """The teacher-forcing target of a task item (see the module docstring).

    Args:
        answer: the answer text to force; default the item's answer. It must be
            accepted by the item's checker.
    """
    tok = lm.tokenizer
    if tok is None:
        raise ValueError("reference_target needs a model with a tokenizer")
    text = item.answer if answer is None else answer
    if not check_answer(text, item):
        raise ValueError(f"answer {text!r} is not accepted for item {item.id!r}")
    prompt_ids = tok(build_prompt(item, shots))["input_ids"]
    answer_ids = tok(" " + text.strip(), add_special_tokens=False)["input_ids"]
    return Target(prompt_ids, answer_ids, line_end_ids(tok) | eos_token_ids(lm))


# ---------------------------------------------------------------- the trie


@dataclass
class _Trie:
    """Prefix tree over the paths of (target, program) pairs; node 0.. are roots."""

    layer: list[int]
    target: list[int]
    children: list[dict[int, int]]
    ends: dict[int, list[tuple[int, int]]]  # node -> [(job, program index)]

    @classmethod
    def build(cls, paths_per_job: Sequence[Sequence[tuple[int, ...]]]) -> "_Trie":
        n = len(paths_per_job)
        trie = cls(layer=[-1] * n, target=list(range(n)), children=[{} for _ in range(n)], ends={})
        for job, paths in enumerate(paths_per_job):
            for index, path in enumerate(paths):
                node = job
                for layer in path:
                    child = trie.children[node].get(layer)
                    if child is None:
                        child = len(trie.layer)
                        trie.layer.append(layer)
                        trie.target.append(job)
                        trie.children.append({})
                        trie.children[node][layer] = child
                    node = child
                trie.ends.setdefault(node, []).append((job, index))
        return trie


def count_layer_calls(programs: Sequence[Program], share_prefixes: bool = True) -> int:
    """Layer applications needed to score programs of one prompt (a cost model)."""
    if not share_prefixes:
        return sum(p.layer_calls for p in programs)
    trie = _Trie.build([[p.path for p in programs]])
    return len(trie.layer) - 1


# ---------------------------------------------------------------- teacher forcing


def _check_jobs(lm: LoadedModel, jobs) -> None:
    for job, (target, programs) in enumerate(jobs):
        if not isinstance(target, Target):
            raise TypeError(f"job {job}: expected a Target, got {type(target).__name__}")
        resolve_programs(lm, list(programs), len(programs))


def _judge(logits: torch.Tensor, target: Target, stop_mask: torch.Tensor) -> list[TFScore]:
    """Scores from logits (n, m+1, V) at the answer positions and the stop position."""
    m = len(target.answer_ids)
    wanted = torch.tensor(target.answer_ids, device=logits.device)  # (m,)
    answer_logits = logits[:, :m]  # (n, m, V)
    best = answer_logits.argmax(-1)  # (n, m)
    wanted_logit = answer_logits.gather(-1, wanted.expand(len(logits), m)[..., None])[..., 0]
    others = answer_logits.scatter(-1, wanted.expand(len(logits), m)[..., None], float("-inf")).amax(-1)
    answer_ok = (best == wanted).all(-1)
    answer_margin = (wanted_logit - others).amin(-1)
    last = logits[:, m]  # (n, V)
    stop_ok = stop_mask[last.argmax(-1)]
    stop_margin = last.masked_fill(~stop_mask, float("-inf")).amax(-1) - last.masked_fill(stop_mask, float("-inf")).amax(-1)
    valid = (answer_ok & stop_ok).tolist()
    margin = torch.minimum(answer_margin, stop_margin).tolist()
    return [TFScore(bool(v), float(g)) for v, g in zip(valid, margin)]


def _stop_mask(target: Target, vocab: int, device) -> torch.Tensor:
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    ids = [i for i in target.stop_ids if i < vocab]
    mask[ids] = True
    return mask


def _default_max_rows(lm: LoadedModel) -> int:
    # Rows per layer call: big on a GPU (launch overhead dominates), modest on
    # CPU where a bigger batch only costs memory.
    return 1024 if lm.device.type == "cuda" else 64


@torch.inference_mode()
def teacher_forced_scores(
    lm: LoadedModel,
    jobs: Sequence[tuple[Target, Sequence[Program]]],
    *,
    max_rows: int | None = None,
) -> list[list[TFScore]]:
    """Teacher-forced scores of many programs on many targets, prefixes shared.

    Args:
        jobs: (target, programs) pairs; targets may differ in length (they are
            left-padded into one batch, each row with its own mask).
        max_rows: most rows per layer call (default: 1024 on CUDA, 64 on CPU).
    Returns:
        Per job, one TFScore per program, in order.
    """
    jobs = [(t, list(ps)) for t, ps in jobs]
    _check_jobs(lm, jobs)
    out: list[list[TFScore | None]] = [[None] * len(ps) for _, ps in jobs]
    if not any(ps for _, ps in jobs):
        return out  # type: ignore[return-value]
    adapter = lm.adapter
    max_rows = max_rows or _default_max_rows(lm)
    targets = [t for t, _ in jobs]
    batch = pad_left([t.input_ids for t in targets], pad_id(lm), lm.device)
    hidden = adapter.embed(batch.input_ids)  # (J, T, d): level 0, one row per root
    pos = adapter.positions(hidden, batch.attention_mask, 0)
    trie = _Trie.build([[p.path for p in ps] for _, ps in jobs])
    frontier = list(range(len(jobs)))  # node ids; row r of `hidden` is frontier[r]
    masks: dict[int, torch.Tensor] = {}
    while frontier:
        hidden, frontier = _next_level(adapter, trie, frontier, hidden, pos, max_rows)
        _score_ends(adapter, trie, frontier, hidden, targets, masks, out, max_rows)
    return out  # type: ignore[return-value]


def _next_level(adapter, trie: _Trie, frontier: list[int], hidden: torch.Tensor, pos, max_rows: int):
    """Apply each child's layer to its parent's hidden state, batched per layer."""
    groups: dict[int, list[tuple[int, int]]] = {}  # layer -> [(parent row, child node)]
    for row, node in enumerate(frontier):
        for layer, child in trie.children[node].items():
            groups.setdefault(layer, []).append((row, child))
    children = [child for entries in groups.values() for _, child in entries]
    if not children:
        return hidden[:0], []
    new_hidden = hidden.new_empty((len(children),) + tuple(hidden.shape[1:]))  # (N_next, T, d)
    start = 0
    device = hidden.device
    for layer, entries in groups.items():
        for lo in range(0, len(entries), max_rows):
            chunk = entries[lo : lo + max_rows]
            parents = torch.tensor([r for r, _ in chunk], device=device)
            targets = torch.tensor([trie.target[c] for _, c in chunk], device=device)
            out = adapter.run_layer(layer, hidden[parents], pos, rows=targets)
            new_hidden[start : start + len(chunk)] = out
            start += len(chunk)
    return new_hidden, children


def _score_ends(adapter, trie, frontier, hidden, targets, masks, out, max_rows) -> None:
    """Score the programs that end at this level's nodes."""
    by_job: dict[int, list[tuple[int, int]]] = {}  # job -> [(row, program index)]
    for row, node in enumerate(frontier):
        for job, index in trie.ends.get(node, ()):
            by_job.setdefault(job, []).append((row, index))
    for job, entries in by_job.items():
        target = targets[job]
        width = len(target.answer_ids) + 1  # answer positions and the stop position
        for lo in range(0, len(entries), max_rows):
            chunk = entries[lo : lo + max_rows]
            rows = torch.tensor([r for r, _ in chunk], device=hidden.device)
            # Left padding puts every target's answer at the end of its row; the
            # last m+1 positions predict the m answer tokens and the stop token.
            logits = adapter.logits(hidden[rows, -width:]).float()  # (n, m+1, V)
            if job not in masks:
                masks[job] = _stop_mask(target, logits.shape[-1], logits.device)
            for (_, index), score in zip(chunk, _judge(logits, target, masks[job])):
                out[job][index] = score


def teacher_forced_valid(lm: LoadedModel, target: Target, programs: Sequence[Program], **kwargs) -> list[bool]:
    """Teacher-forced validity of programs on one target (prefixes shared)."""
    return [s.valid for s in teacher_forced_scores(lm, [(target, programs)], **kwargs)[0]]


@torch.inference_mode()
def teacher_forced_scores_unshared(lm: LoadedModel, target: Target, programs: Sequence[Program]) -> list[TFScore]:
    """The same scores, each program run alone through ``forward_logits``.

    The slow reference the shared path is tested (and benchmarked) against.
    """
    _check_jobs(lm, [(target, programs)])
    batch = pad_left([target.input_ids], pad_id(lm), lm.device)
    width = len(target.answer_ids) + 1
    mask = None
    scores = []
    for program in programs:
        logits = forward_logits(lm, batch, [program])[:, -width:]  # (1, m+1, V)
        if mask is None:
            mask = _stop_mask(target, logits.shape[-1], logits.device)
        scores.extend(_judge(logits, target, mask))
    return scores


# ---------------------------------------------------------------- decoding


def decode_programs(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    programs: Sequence[Program],
    *,
    max_new_tokens: int = 8,
    batch_size: int | None = None,
    stop_strings: Sequence[str] = (STOP_TEXT,),
    should_stop: Callable[[], bool] | None = None,
):
    """Greedy continuations of one prompt under many programs (rows of one batch).

    Args:
        should_stop: polled between tokens and program steps; when it turns
            true, `polar_core.limits.Stopped` is raised (a cut-short answer
            would be judged wrong, so none is returned).
    Returns:
        One executor Trace per program.
    """
    programs = list(programs)
    if not programs:
        return []
    resolve_programs(lm, programs, len(programs))
    batch_size = batch_size or (256 if lm.device.type == "cuda" else 32)
    traces = []
    for lo in range(0, len(programs), batch_size):
        chunk = programs[lo : lo + batch_size]
        batch = pad_left([list(prompt_ids)] * len(chunk), pad_id(lm), lm.device)
        stops = stop_strings if lm.tokenizer is not None else ()
        try:
            part = generate(lm, batch, chunk, max_new_tokens=max_new_tokens,
                            stopping=Stopping(strings=stops, should_stop=should_stop))
        except PromptPassStopped:
            raise Stopped from None
        if any(t.finish_reason == "cancelled" for t in part):
            raise Stopped
        traces += part
    return traces


def decode_valid(
    lm: LoadedModel,
    item: TaskItem,
    programs: Sequence[Program],
    *,
    shots: int = 3,
    max_new_tokens: int = 8,
    batch_size: int | None = None,
) -> list[bool]:
    """Exact validity: greedy decoding under each program, then the task checker."""
    texts = decode_texts(lm, item, programs, shots=shots, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [check_answer(extract_answer(t), item) for t in texts]


def decode_texts(
    lm: LoadedModel,
    item: TaskItem,
    programs: Sequence[Program],
    *,
    shots: int = 3,
    max_new_tokens: int = 8,
    batch_size: int | None = None,
) -> list[str]:
    """Greedy answer texts (cut at the first newline) of an item under each program."""
    if lm.tokenizer is None:
        raise ValueError("decode_texts needs a model with a tokenizer")
    prompt_ids = lm.tokenizer(build_prompt(item, shots))["input_ids"]
    traces = decode_programs(lm, prompt_ids, programs, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [t.text for t in traces]


def decode_many(
    lm: LoadedModel,
    pairs: Sequence[tuple[TaskItem, Program]],
    *,
    shots: int = 3,
    max_new_tokens: int = 8,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[bool]:
    """Exact validity of many (item, program) pairs, rows of mixed prompts batched.
    `progress(done, total)` is called after each batch."""
    if lm.tokenizer is None:
        raise ValueError("decode_many needs a model with a tokenizer")
    pairs = list(pairs)
    resolve_programs(lm, [p for _, p in pairs], len(pairs))
    batch_size = batch_size or (256 if lm.device.type == "cuda" else 32)
    prompt_ids: dict[str, list[int]] = {}
    for item, _ in pairs:
        if item.id not in prompt_ids:
            prompt_ids[item.id] = lm.tokenizer(build_prompt(item, shots))["input_ids"]
    order = sorted(range(len(pairs)), key=lambda i: len(prompt_ids[pairs[i][0].id]))  # less padding
    verdicts = [False] * len(pairs)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        batch = pad_left([prompt_ids[pairs[i][0].id] for i in chunk], pad_id(lm), lm.device)
        traces = generate(lm, batch, [pairs[i][1] for i in chunk], max_new_tokens=max_new_tokens, stopping=Stopping(strings=(STOP_TEXT,)))
        for i, trace in zip(chunk, traces):
            verdicts[i] = check_answer(extract_answer(trace.text), pairs[i][0])
        if progress is not None:
            progress(lo + len(chunk), len(order))
    return verdicts


def ids_valid(tokens: Sequence[int], finish_reason: str, target: Target) -> bool:
    """Token-level validity of a greedy continuation against a target.

    Valid when the continuation starts with the answer tokens and the next
    token is a stop token (or generation ended at an end-of-sequence token
    that the target counts as a stop).
    """
    m = len(target.answer_ids)
    if tuple(tokens[:m]) != target.answer_ids:
        return False
    if len(tokens) > m:
        return tokens[m] in target.stop_ids
    return finish_reason == "eos"


# ---------------------------------------------------------------- scorers for search


def make_scorer(lm: LoadedModel, target: Target, **kwargs) -> Scorer:
    """A search scorer (programs -> list[bool]) by teacher forcing on one target."""

    def score(programs: Sequence[Program]) -> list[bool]:
        return teacher_forced_valid(lm, target, programs, **kwargs)

    return score


__all__ = [
    "Scorer",
    "Target",
    "TFScore",
    "count_layer_calls",
    "decode_many",
    "decode_programs",
    "decode_texts",
    "decode_valid",
    "ids_valid",
    "line_end_ids",
    "make_scorer",
    "reference_target",
    "teacher_forced_scores",
    "teacher_forced_scores_unshared",
    "teacher_forced_valid",
]
