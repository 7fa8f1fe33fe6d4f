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
Each unique prefix is computed once, over all tokens, across programs *and*
across questions; calls are batched per layer (see ``teacher_forced_scores``).

Float32 verdicts at bfloat16 speed (``cascade_scores``): on hardware that
multiplies bfloat16 natively, a bfloat16 pass rejects the programs it finds
clearly invalid and float32 scores the rest, so the verdicts are float32's.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from polar_core.engine.cpu.layout import cpuinfo_field
from polar_core.engine.cpu.packed import onednn_products
from polar_core.engine.forward import forward_logits
from polar_core.engine.generate import PromptPassStopped, Stopping, generate
from polar_core.engine.inputs import eos_token_ids, pad_id, pad_left, resolve_programs
from polar_core.engine.models import MODEL_ALIASES, LoadedModel, from_model, load_model
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
    """Prefix tree over the paths of (target, program) pairs; nodes 0..J-1 are
    the roots (one per job: its token embeddings)."""

    layer: list[int]
    target: list[int]
    parent: list[int]
    children: list[dict[int, int]]
    ends: dict[int, list[tuple[int, int]]]  # node -> [(job, program index)]

    @classmethod
    def build(cls, paths_per_job: Sequence[Sequence[tuple[int, ...]]]) -> "_Trie":
        n = len(paths_per_job)
        trie = cls(layer=[-1] * n, target=list(range(n)), parent=[-1] * n, children=[{} for _ in range(n)], ends={})
        for job, paths in enumerate(paths_per_job):
            for index, path in enumerate(paths):
                node = job
                for layer in path:
                    child = trie.children[node].get(layer)
                    if child is None:
                        child = len(trie.layer)
                        trie.layer.append(layer)
                        trie.target.append(job)
                        trie.parent.append(node)
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
    # Rows per layer call: big on a GPU (launch overhead dominates); on a CPU
    # a layer call is compute-bound from ~16 rows of ~60 tokens on.
    return 1024 if lm.device.type == "cuda" else 128


def _default_call_cost(lm: LoadedModel) -> int:
    # What one more layer call costs, in row-tokens of work. Measured on a CPU
    # (SmolLM2-135M, 1 thread): a call's fixed cost is ~0.5 ms in bfloat16 and
    # ~1.7 ms in float32, a row-token ~22 and ~72 us, so ~22 row-tokens either
    # way; 32 leans towards fewer calls. On a GPU a call costs far more than
    # padding: one call, as before.
    return 1 << 40 if lm.device.type == "cuda" else 32


def width_groups(widths: Sequence[int], call_cost: int) -> list[list[int]]:
    """Split row indices into groups, each run as calls of its longest width.

    Rows are right-padded, so a row may run at any width >= its own; this
    picks the cut of the rows sorted by width that minimises padded
    row-tokens + call_cost per group (a small dynamic programme over the
    distinct widths). call_cost 0 gives one group per width, a huge one a
    single group (every row at the widest).
    """
    distinct = sorted(set(widths))
    count = [sum(1 for w in widths if w == d) for d in distinct]
    best = [0] + [None] * len(distinct)  # best[j]: cost of the first j widths
    cut = [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        rows = 0
        for i in range(j - 1, -1, -1):  # group = widths i..j-1, run at distinct[j-1]
            rows += count[i]
            cost = best[i] + rows * distinct[j - 1] + call_cost
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(distinct)
    while j:
        bounds.append((distinct[cut[j]], distinct[j - 1]))
        j = cut[j]
    return [[r for r, w in enumerate(widths) if lo <= w <= hi] for lo, hi in reversed(bounds)]


def pad_right(rows: Sequence[Sequence[int]], pad: int, device) -> torch.Tensor:
    """Right-pad token-id lists into (B, T): pads after every real token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return ids.to(device)


@torch.inference_mode()
def teacher_forced_scores(
    lm: LoadedModel,
    jobs: Sequence[tuple[Target, Sequence[Program]]],
    *,
    max_rows: int | None = None,
    call_cost: int | None = None,
) -> list[list[TFScore]]:
    """Teacher-forced scores of many programs on many targets, prefixes shared.

    All targets' tries are one batch. Targets are right-padded (see
    ``Adapter.causal_positions``: each row computes what it would alone) and
    the trie is run layer by layer rather than level by level: of the nodes
    whose parent is computed, all that call the lowest-numbered layer go in
    one call. Programs that skip or loop then wait for each other at the
    layers they share, so most calls hold every program that runs that layer
    (a level would hold a few: after a skip, programs sit at different
    layers at the same step).

    Right padding also lets a call stop at its longest row: a layer's rows
    are cut into groups of similar lengths (``width_groups``), each run only
    as wide as it needs, so a short prompt does not pay for a long one's
    tokens (3-shot prompts here are 58-133 tokens).

    Args:
        jobs: (target, programs) pairs; targets may differ in length.
        max_rows: most rows per layer call (default: 1024 on CUDA, 128 on CPU).
        call_cost: one more layer call's cost in row-tokens, which sets how
            finely rows are grouped by length (default: 32 on CPU, one group
            on CUDA).
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
    call_cost = _default_call_cost(lm) if call_cost is None else call_cost
    targets = [t for t, _ in jobs]
    lengths = [len(t.input_ids) for t in targets]
    embedded = adapter.embed(pad_right([t.input_ids for t in targets], pad_id(lm), lm.device))  # (J, T, d)
    positions = _Positions(adapter, embedded)
    trie = _Trie.build([[p.path for p in ps] for _, ps in jobs])
    states = {job: (embedded, job) for job in range(len(jobs))}  # node -> (tensor, row), while a child needs it
    waiting = [len(c) for c in trie.children]  # children not computed yet, per node
    ready: dict[int, list[int]] = {}  # layer -> nodes whose parent is computed
    for job in range(len(jobs)):
        for layer, child in trie.children[job].items():
            ready.setdefault(layer, []).append(child)
    masks: dict[int, torch.Tensor] = {}
    with onednn_products():  # float32 on a CPU: oneDNN's products, ~2x MKL's here (engine.cpu.packed)
        while ready:
            layer = min(ready)
            nodes = ready.pop(layer)
            groups = width_groups([lengths[trie.target[c]] for c in nodes], call_cost)
            for group in ([nodes[i] for i in g] for g in groups):
                for lo in range(0, len(group), max_rows):
                    chunk = group[lo : lo + max_rows]
                    width = max(lengths[trie.target[c]] for c in chunk)
                    hidden, ended = _run_call(adapter, trie, layer, chunk, width, positions, states, waiting, ready)
                    _score_ends(adapter, trie, ended, hidden, targets, masks, out)
    return out  # type: ignore[return-value]


def _run_call(adapter, trie: _Trie, layer: int, chunk: list[int], width: int, positions, states, waiting, ready):
    """One layer call on the rows of `chunk` (trie nodes) at `width`; updates
    the states, frees parents no child needs any more, queues the children.
    Returns the output (n, width, d) and [(row, node)] of the nodes where
    programs end."""
    # Rows that come from the same earlier output go together, in its order: fewer copies.
    first_seen: dict[int, int] = {}
    for c in chunk:
        first_seen.setdefault(id(states[trie.parent[c]][0]), len(first_seen))
    chunk.sort(key=lambda c: (first_seen[id(states[trie.parent[c]][0])], states[trie.parent[c]][1]))
    hidden = adapter.run_layer(layer, _gather([states[trie.parent[c]] for c in chunk], width), positions.get(width))
    ended = []
    for row, node in enumerate(chunk):
        parent = trie.parent[node]
        waiting[parent] -= 1
        if not waiting[parent]:
            del states[parent]
        if trie.children[node]:
            states[node] = (hidden, row)
            for next_layer, child in trie.children[node].items():
                ready.setdefault(next_layer, []).append(child)
        if node in trie.ends:
            ended.append((row, node))
    return hidden, ended


class _Positions:
    """Causal position tables of right-padded rows, one per call width (made once each)."""

    def __init__(self, adapter, embedded: torch.Tensor):
        self.adapter, self.embedded, self.tables = adapter, embedded, {}

    def get(self, width: int):
        if width not in self.tables:
            self.tables[width] = self.adapter.causal_positions(self.embedded[:1, :width])
        return self.tables[width]


def _gather(sources: list[tuple[torch.Tensor, int]], width: int) -> torch.Tensor:
    """Rows of earlier outputs stacked (n, width, d), with as few copies as possible:
    none when they are one earlier output whole and in order at this width (a
    chain of layers), else one index_select per earlier output (rows sorted by
    source first). An output narrower than `width` is zero-padded on the right
    (past its rows' real tokens: no real token attends there), a wider one cut."""
    pieces, start = [], 0
    while start < len(sources):
        tensor = sources[start][0]
        end = start
        while end < len(sources) and sources[end][0] is tensor:
            end += 1
        rows = [r for _, r in sources[start:end]]
        if rows != list(range(tensor.shape[0])):
            tensor = tensor.index_select(0, torch.tensor(rows, device=tensor.device))
        if tensor.shape[1] > width:
            tensor = tensor[:, :width]
        elif tensor.shape[1] < width:
            tensor = torch.nn.functional.pad(tensor, (0, 0, 0, width - tensor.shape[1]))
        pieces.append(tensor)
        start = end
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _score_ends(adapter, trie: _Trie, ended, hidden: torch.Tensor, targets, masks, out) -> None:
    """Score the programs that end at these just-computed nodes (rows of hidden)."""
    by_job: dict[int, list[tuple[int, int]]] = {}  # job -> [(row, program index)]
    for row, node in ended:
        for job, index in trie.ends[node]:
            by_job.setdefault(job, []).append((row, index))
    for job, entries in by_job.items():
        target = targets[job]
        # Right padding: the m answer tokens are predicted from the positions
        # just before them, the stop token from the last answer position.
        first = len(target.prompt_ids) - 1
        width = len(target.answer_ids) + 1
        rows = torch.tensor([r for r, _ in entries], device=hidden.device)
        logits = adapter.logits(hidden[rows, first : first + width]).float()  # (n, m+1, V)
        if job not in masks:
            masks[job] = _stop_mask(target, logits.shape[-1], logits.device)
        for (_, index), score in zip(entries, _judge(logits, target, masks[job])):
            out[job][index] = score


# ---------------------------------------------------------------- the cascade

# A program the bfloat16 pass scores at a margin at or below -CASCADE_MARGIN is
# taken as invalid; every other program is scored again in float32, whose
# verdict counts. Measured on SmolLM2-135M (bench/results/cascade_margins.md,
# 868 programs of 32 train items, and search_throughput.md): float32-valid
# programs fell by at most ~0.35 logits under bfloat16, so none came near -2.0,
# while ~85% of invalid ones fall below it. Invalid programs moved by up to
# ~14 (their margins are large) and, near the boundary, by up to 2.7: the
# sample of valid programs (34) is small, so 2.0 is supported, not proven.
CASCADE_MARGIN = 2.0


@dataclass
class CascadeStats:
    """What a cascade did: programs scored by the fast pass, and again in float32."""

    programs: int = 0
    rescored: int = 0
    # Over rescored programs valid in float32: the largest |fast margin - exact
    # margin|. CASCADE_MARGIN is safe while this stays well below it.
    max_valid_shift: float = 0.0


def native_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 products are fast here: a CUDA device, or a CPU with
    bfloat16 instructions (AVX512-BF16 or AMX), where oneDNN multiplies them
    2-3x faster than float32. Elsewhere a CPU converts and is slower."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    flags = set((cpuinfo_field("flags") or "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def bfloat16_twin(lm: LoadedModel) -> LoadedModel:
    """The same model with bfloat16 weights (a second copy; the first is untouched)."""
    if lm.dtype == torch.bfloat16:
        return lm
    if lm.name in MODEL_ALIASES or Path(lm.name).exists():
        return load_model(lm.name, device=str(lm.device), dtype="bfloat16")
    model = copy.deepcopy(lm.model).to(torch.bfloat16)  # a model built in memory (tests)
    return from_model(model, lm.tokenizer, name=lm.name)


def cascade_scores(
    exact: LoadedModel,
    fast: LoadedModel | None,
    jobs: Sequence[tuple[Target, Sequence[Program]]],
    *,
    margin: float = CASCADE_MARGIN,
    stats: CascadeStats | None = None,
    max_rows: int | None = None,
) -> list[list[TFScore]]:
    """Teacher-forced scores with a fast first pass: every program on `fast`
    (bfloat16), then those it does not clearly reject (margin > -margin) on
    `exact`, whose scores replace the fast ones. Without `fast`, plain
    ``teacher_forced_scores`` on `exact`.

    A program's verdict is the exact model's unless the fast pass put it at
    or below -margin (see CASCADE_MARGIN for why that is safe), so verdicts
    match an all-float32 run; margins of rejected programs are the fast ones.
    """
    jobs = [(t, list(ps)) for t, ps in jobs]
    if fast is None:
        scores = teacher_forced_scores(exact, jobs, max_rows=max_rows)
        if stats is not None:
            n = sum(len(ps) for _, ps in jobs)
            stats.programs += n
            stats.rescored += n
        return scores
    if fast.num_layers != exact.num_layers:
        raise ValueError("the fast model must be the same model (same depth)")
    first = teacher_forced_scores(fast, jobs, max_rows=max_rows)
    again = [[i for i, s in enumerate(scores) if s.margin > -margin] for scores in first]
    second = teacher_forced_scores(exact, [(t, [ps[i] for i in idx]) for (t, ps), idx in zip(jobs, again)],
                                   max_rows=max_rows)
    shift = 0.0
    for scores, idx, exact_scores in zip(first, again, second):
        for i, score in zip(idx, exact_scores):
            if score.valid:
                shift = max(shift, abs(scores[i].margin - score.margin))
            scores[i] = score
    if stats is not None:
        stats.programs += sum(len(ps) for _, ps in jobs)
        stats.rescored += sum(len(idx) for idx in again)
        stats.max_valid_shift = max(stats.max_valid_shift, shift)
    return first


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
        with onednn_products():  # the prompt pass's products (decoding steps keep the codes)
            traces = generate(lm, batch, [pairs[i][1] for i in chunk], max_new_tokens=max_new_tokens,
                              stopping=Stopping(strings=(STOP_TEXT,)))
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
    "CASCADE_MARGIN",
    "CascadeStats",
    "Scorer",
    "Target",
    "TFScore",
    "bfloat16_twin",
    "cascade_scores",
    "count_layer_calls",
    "decode_many",
    "decode_programs",
    "decode_texts",
    "decode_valid",
    "ids_valid",
    "line_end_ids",
    "make_scorer",
    "native_bfloat16",
    "pad_right",
    "reference_target",
    "teacher_forced_scores",
    "teacher_forced_scores_unshared",
    "teacher_forced_valid",
    "width_groups",
]
