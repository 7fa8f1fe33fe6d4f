"""Today's search scoring and checks, frozen for side-by-side benchmarks.

A verbatim copy of the teacher forcing (level-by-level trie, left padding)
of polar_core/study/scoring.py and of the search/verification loop of
polar_core/study/find.py as of commit a7d7db6 (before the faster search), so
that bench/bench_search.py can time the two in one run on the same items.
Only the imports differ. Not part of the library; do not use it elsewhere.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from polar_core.engine.generate import Stopping, generate
from polar_core.engine.inputs import pad_id, pad_left, resolve_programs
from polar_core.engine.models import LoadedModel
from polar_core.program import Program
from polar_core.study.checker import check_answer, extract_answer
from polar_core.study.find import ItemRecord, _Seen, full_program_answers
from polar_core.study.scoring import Target, TFScore, reference_target
from polar_core.study.search import SearchError, make_search, run_searches
from polar_core.study.tasks import STOP_TEXT, TaskItem, build_prompt

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


def _search_method(lm: LoadedModel, method: str, targets: Sequence[Target], seen: list[_Seen], *, budget: int,
                   seed: int, wave: int, group: int, progress: Callable[[int], None] | None) -> None:
    """One method's searches of every item, in lock-step groups; results go into `seen`."""
    options = {"wave": wave} if method == "mcts" else {}
    searches = [make_search(method, lm.num_layers, budget=budget, seed=seed, cache=s.verdicts, **options)
                for s in seen]

    def score_jobs(jobs, offset):  # jobs index their group; the group starts at item `offset`
        scores = teacher_forced_scores(lm, [(targets[offset + i], ps) for i, ps in jobs])
        return [[s.valid for s in job] for job in scores]

    # Finished groups show as progress (all at once would show nothing until
    # the very end on a CPU, where batching wider gains little).
    results = []
    for lo in range(0, len(searches), group):
        on_round = None if progress is None else (lambda done, _n, base=lo: progress(base + done))
        results += run_searches(searches[lo : lo + group], functools.partial(score_jobs, offset=lo), on_round)
        if progress is not None:  # a search may end at its last ask, after the last round
            progress(len(results))
    for record, result in zip(seen, results):
        record.scored += result.programs_scored
        looked_at = [p.path for p in (*result.valid, *result.invalid)]
        record.order.update(dict.fromkeys(looked_at))
        record.by_method[method] = set(looked_at)


def _verify(lm: LoadedModel, items, answers, right, seen: list[_Seen], shots: int, recheck_invalid: int, seed: int,
            check_progress) -> list[ItemRecord]:
    """Decode every teacher-forced valid program (and a sample of invalid ones) to keep only the truly valid."""
    rng = random.Random(seed)
    shortest_first = lambda p: (len(p), p)  # noqa: E731
    tf_valid = [sorted((p for p in s.order if s.verdicts[p]), key=shortest_first) for s in seen]
    tf_invalid = [sorted((p for p in s.order if not s.verdicts[p]), key=shortest_first) for s in seen]
    recheck = [rng.sample(bad, min(recheck_invalid, len(bad))) for bad in tf_invalid]
    depth = lm.num_layers
    pairs = [(i, p) for i in range(len(items)) for p in (*tf_valid[i], *recheck[i])]
    verdicts = decode_many(lm, [(items[i], Program(p, depth)) for i, p in pairs], shots=shots, progress=check_progress)
    decoded = dict(zip(pairs, verdicts))
    records = []
    for i, item in enumerate(items):
        ok = [decoded[i, p] for p in tf_valid[i]]
        records.append(ItemRecord(
            item_id=item.id, family=item.family, initial_right=right[i], initial_answer=answers[i],
            valid=[Program(p, depth) for p, good in zip(tf_valid[i], ok) if good],
            invalid=[Program(p, depth) for p in tf_invalid[i]], programs_scored=seen[i].scored,
            tf_valid_rejected=sum(not g for g in ok), tf_invalid_checked=len(recheck[i]),
            tf_invalid_accepted=sum(decoded[i, p] for p in recheck[i]), seen_by=seen[i].by_method))
    return records


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


def search_task_items_before(
    lm: LoadedModel,
    items: Sequence[TaskItem],
    *,
    methods: Sequence[str] = ("mcts",),
    budget: int = 200,
    seed: int = 0,
    wave: int = 8,
    shots: int = 3,
    recheck_invalid: int = 8,
    group: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    check_progress: Callable[[int, int], None] | None = None,
) -> list[ItemRecord]:
    """Search every item with teacher-forced scoring, then verify by decoding.

    The full program is decoded first (exact validity); its answer, when right,
    becomes the teacher-forcing target (see ``polar_core.study.scoring``).
    Searches of a group of items run in lock step, each round scored in one
    prefix-shared batch. Every teacher-forced valid program is then re-checked
    by greedy decoding (only those that pass are kept), and
    ``recheck_invalid`` teacher-forced invalid programs per item (a seeded
    sample) too, to measure agreement.

    Args:
        methods: "mcts" and/or "greedy"; several share one verdict cache per item.
        group: searches run in lock step together (default: 256 on CUDA, 8 on CPU).
        progress: called with (searches finished, searches in all).
        check_progress: called with (programs decoded, programs to decode) while
            the found programs are checked by decoding.
    """
    items = list(items)
    if not items:
        raise SearchError("no task items to search")
    answers = full_program_answers(lm, items, shots)
    right = [check_answer(a, it) for a, it in zip(answers, items)]
    targets = [reference_target(lm, it, answer=a if ok else None, shots=shots)
               for it, a, ok in zip(items, answers, right)]
    seen = [_Seen() for _ in items]
    group = group or (256 if lm.device.type == "cuda" else 8)
    for m_index, method in enumerate(methods):
        done_before = m_index * len(items)
        report = None if progress is None else (lambda done, base=done_before: progress(base + done, len(items) * len(methods)))
        _search_method(lm, method, targets, seen, budget=budget, seed=seed, wave=wave, group=group, progress=report)
    return _verify(lm, items, answers, right, seen, shots, recheck_invalid, seed, check_progress)
