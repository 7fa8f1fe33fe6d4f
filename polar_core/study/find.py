"""Finding valid programs on a model: for task items (the router's supervision
and the paper's statistics) and for one typed prompt (the explorer's Search).

Programs are scored by teacher forcing (polar_core.study.scoring: fast,
prefixes shared) and every program reported valid is checked again by real
greedy decoding; only those that pass count.
"""
from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from polar_core.engine.generate import Stopping, generate
from polar_core.engine.inputs import encode_prompts, eos_token_ids
from polar_core.engine.models import LoadedModel
from polar_core.limits import Stopped
from polar_core.program import Program
from polar_core.study.analysis import expected_token_ids
from polar_core.study.checker import check_answer, extract_answer
from polar_core.study.prompts import prompt_style, shown_answer
from polar_core.study.scoring import (
    CascadeStats,
    Target,
    cascade_scores,
    decode_many,
    decode_programs,
    line_end_ids,
    make_scorer,
    reference_target,
)
from polar_core.study.search import LayerPath, SearchError, make_search, run_searches
from polar_core.study.suggest import influence_plans
from polar_core.study.tasks import STOP_TEXT, TaskItem, build_prompt

# ---------------------------------------------------------------- task items

MAX_NEW_TOKENS = 8  # tokens decoded per answer (the suite's answers are short)
# A teacher-forced valid program is decoded only when its margin (the wanted
# token's logit minus the best other's, at its closest position) is below this.
# Teacher forcing and cached decoding compute the same greedy choices; they
# differ by float rounding between batch shapes, measured ~1e-4 logits here.
DECODE_MARGIN = 0.5
# Invalid programs decoded per search run to measure teacher forcing against
# decoding on them (they disagree when the checker accepts another answer,
# ~1 in 1,000 before): a sample of this size is enough, and each costs a decode.
RECHECK_TOTAL = 64


@dataclass
class ItemRecord:
    """One task item's search outcome (decoding-verified)."""

    item_id: str
    family: str
    initial_right: bool  # the full program's greedy answer is accepted
    initial_answer: str
    valid: list[Program]  # decoding-verified, shortest first
    invalid: list[Program]  # teacher-forced invalid, shortest first
    programs_scored: int
    tf_valid_rejected: int  # teacher-forced valid but decoding wrong (dropped)
    tf_invalid_checked: int  # teacher-forced invalid programs re-checked by decoding
    tf_invalid_accepted: int  # ... that decoding accepts (the checker allows more)
    seen_by: dict[str, set[LayerPath]] = field(default_factory=dict)  # method -> paths it looked at
    # Teacher-forced valid programs checked by decoding (None: all of them); the rest had a clear margin.
    tf_valid_decoded: int | None = None

    @property
    def has_shorter(self) -> bool:
        return bool(self.valid) and self.valid[0].layer_calls < self.valid[0].num_layers


@dataclass
class _Seen:
    """What the searches of one item looked at: verdicts (shared by methods), order, cost."""

    verdicts: dict[LayerPath, bool] = field(default_factory=dict)
    margins: dict[LayerPath, float] = field(default_factory=dict)
    order: dict[LayerPath, None] = field(default_factory=dict)
    by_method: dict[str, set[LayerPath]] = field(default_factory=dict)
    scored: int = 0


def full_program_answers(lm: LoadedModel, items: Sequence[TaskItem], shots: int = 3) -> list[str]:
    """Each item's greedy answer under the full program (few-shot prompt, cut at the newline)."""
    step = 128 if lm.device.type == "cuda" else 16
    answers = []
    for lo in range(0, len(items), step):
        chunk = items[lo : lo + step]
        traces = generate(lm, [build_prompt(it, shots) for it in chunk], None, max_new_tokens=8, chat=False,
                          stopping=Stopping(strings=(STOP_TEXT,)))
        answers += [extract_answer(t.text) for t in traces]
    return answers


def search_task_items(
    lm: LoadedModel,
    items: Sequence[TaskItem],
    *,
    methods: Sequence[str] = ("mcts",),
    budget: int = 200,
    seed: int = 0,
    wave: int = 8,
    shots: int = 3,
    recheck_invalid: int = 1,
    recheck_total: int = RECHECK_TOTAL,
    group: int | None = None,
    fast: LoadedModel | None = None,
    decode_margin: float = DECODE_MARGIN,
    cascade: CascadeStats | None = None,
    progress: Callable[[int, int], None] | None = None,
    check_progress: Callable[[int, int], None] | None = None,
) -> list[ItemRecord]:
    """Search every item with teacher-forced scoring, then verify by decoding.

    The full program is decoded first (exact validity); its answer, when right,
    becomes the teacher-forcing target (see ``polar_core.study.scoring``).
    Searches of a group of items run in lock step, each round scored in one
    prefix-shared batch (with `fast`, a bfloat16 twin of `lm`, through
    ``cascade_scores``: float32 verdicts, most of the work in bfloat16).
    Teacher-forced valid programs are then checked by greedy decoding where
    their margin is below `decode_margin` (only those that pass are kept);
    above it, teacher forcing and decoding compute the same greedy tokens, so
    decoding could only disagree by float noise far smaller than the margin.
    ``recheck_invalid`` teacher-forced invalid programs per item, at most
    ``recheck_total`` in all (a seeded sample), are decoded too, to measure
    how often the checker accepts an answer other than the forced one.

    Args:
        methods: "mcts", "greedy" and/or "influence" (candidates from the full
            program's per-layer influence on the item, then shortened greedily);
            several share one verdict cache per item.
        group: searches run in lock step together (default: 256 on CUDA, 32 on CPU).
        decode_margin: 0 never decodes a valid program, infinity decodes all.
        cascade: counts the programs the fast pass scored and those rescored.
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
    group = group or (256 if lm.device.type == "cuda" else 32)
    for m_index, method in enumerate(methods):
        done_before = m_index * len(items)
        report = None if progress is None else (lambda done, base=done_before: progress(base + done, len(items) * len(methods)))
        _search_method(lm, method, targets, seen, budget=budget, seed=seed, wave=wave, group=group, progress=report,
                       fast=fast, cascade=cascade)
    return _verify(lm, items, answers, right, targets, seen, shots, recheck_invalid, recheck_total, seed,
                   decode_margin, check_progress)


def _search_method(lm: LoadedModel, method: str, targets: Sequence[Target], seen: list[_Seen], *, budget: int,
                   seed: int, wave: int, group: int, progress: Callable[[int], None] | None,
                   fast: LoadedModel | None = None, cascade: CascadeStats | None = None) -> None:
    """One method's searches of every item, in lock-step groups; results go into `seen`."""
    options = {"wave": wave} if method == "mcts" else {}
    if method == "influence":  # each item's own candidates, from the full program's pass over its prompt
        per_item = [{"candidates": cands, "order": order}
                    for cands, order in influence_plans(lm, [t.prompt_ids for t in targets])]
    else:
        per_item = [{}] * len(seen)
    searches = [make_search(method, lm.num_layers, budget=budget, seed=seed, cache=s.verdicts, **options, **extra)
                for s, extra in zip(seen, per_item)]

    # Groups of similar prompt lengths: a batch is padded to its longest prompt.
    order = sorted(range(len(seen)), key=lambda i: len(targets[i].input_ids))

    def score_jobs(jobs, members):  # jobs index `members`, the group's item indices
        scores = cascade_scores(lm, fast, [(targets[members[i]], ps) for i, ps in jobs], stats=cascade)
        for (i, programs), job in zip(jobs, scores):
            margins = seen[members[i]].margins
            for program, score in zip(programs, job):
                margins[program.path] = score.margin
        return [[s.valid for s in job] for job in scores]

    # Finished groups show as progress (all at once would show nothing until
    # the very end on a CPU, where batching wider gains little).
    results: dict[int, object] = {}
    for lo in range(0, len(order), group):
        members = order[lo : lo + group]
        on_round = None if progress is None else (lambda done, _n, base=lo: progress(base + done))
        found = run_searches([searches[i] for i in members], functools.partial(score_jobs, members=members), on_round)
        results.update(zip(members, found))
        if progress is not None:  # a search may end at its last ask, after the last round
            progress(len(results))
    results = [results[i] for i in range(len(seen))]
    for record, result in zip(seen, results):
        record.scored += result.programs_scored
        looked_at = [p.path for p in (*result.valid, *result.invalid)]
        record.order.update(dict.fromkeys(looked_at))
        record.by_method[method] = set(looked_at)


def _verify(lm: LoadedModel, items, answers, right, targets, seen: list[_Seen], shots: int, recheck_invalid: int,
            recheck_total: int, seed: int, decode_margin: float, check_progress) -> list[ItemRecord]:
    """Decode the teacher-forced valid programs whose margin is small (and a
    sample of invalid ones) to keep only the truly valid."""
    shortest_first = lambda p: (len(p), p)  # noqa: E731
    tf_valid = [sorted((p for p in s.order if s.verdicts[p]), key=shortest_first) for s in seen]
    tf_invalid = [sorted((p for p in s.order if not s.verdicts[p]), key=shortest_first) for s in seen]
    # One generator per item: an item's sample does not depend on the items searched with it.
    recheck = [random.Random(f"{seed}/{item.id}").sample(bad, min(recheck_invalid, len(bad)))
               for item, bad in zip(items, tf_invalid)]
    chosen = [(i, p) for i, ps in enumerate(recheck) for p in ps]
    if len(chosen) > recheck_total:  # a large search: the agreement statistic needs a sample, not every item
        keep = set(random.Random(seed).sample(chosen, recheck_total))
        recheck = [[p for p in ps if (i, p) in keep] for i, ps in enumerate(recheck)]
    depth = lm.num_layers
    # Decoding writes at most MAX_NEW_TOKENS tokens: a longer answer must be decoded to be judged.
    to_decode = [[p for p in tf_valid[i] if seen[i].margins.get(p, 0.0) < decode_margin
                  or len(targets[i].answer_ids) > MAX_NEW_TOKENS] for i in range(len(items))]
    pairs = [(i, p) for i in range(len(items)) for p in (*to_decode[i], *recheck[i])]
    verdicts = decode_many(lm, [(items[i], Program(p, depth)) for i, p in pairs], shots=shots,
                           max_new_tokens=MAX_NEW_TOKENS, progress=check_progress)
    decoded = dict(zip(pairs, verdicts))
    records = []
    for i, item in enumerate(items):
        ok = [decoded.get((i, p), True) for p in tf_valid[i]]
        records.append(ItemRecord(
            item_id=item.id, family=item.family, initial_right=right[i], initial_answer=answers[i],
            valid=[Program(p, depth) for p, good in zip(tf_valid[i], ok) if good],
            invalid=[Program(p, depth) for p in tf_invalid[i]], programs_scored=seen[i].scored,
            tf_valid_rejected=sum(not g for g in ok), tf_invalid_checked=len(recheck[i]),
            tf_invalid_accepted=sum(decoded[i, p] for p in recheck[i]), seen_by=seen[i].by_method,
            tf_valid_decoded=len(to_decode[i])))
    return records


def summarize(records: Sequence[ItemRecord], num_layers: int) -> dict:
    """The paper's statistics over searched items (see bench/results/search.md),
    for all methods together and, under "by_method", for each alone."""
    stats = _summary(records, num_layers)
    methods = sorted({m for r in records for m in r.seen_by})
    if len(methods) > 1:
        stats["by_method"] = {}
        for m in methods:
            only = [dataclasses.replace(r, valid=[p for p in r.valid if p.path in r.seen_by.get(m, ())],
                                        programs_scored=0) for r in records]
            sub = _summary(only, num_layers)
            stats["by_method"][m] = {k: sub[k] for k in (
                "right_with_shorter_valid", "wrong_corrected_by_any", "wrong_corrected_by_shorter",
                "mean_shortest_valid_steps", "mean_valid_programs")}
    return stats


def _summary(records: Sequence[ItemRecord], num_layers: int) -> dict:
    right = [r for r in records if r.initial_right]
    wrong = [r for r in records if not r.initial_right]
    found = [r for r in records if r.valid]

    def share(part, whole):
        return round(len(part) / len(whole), 4) if whole else None

    def mean(values):
        values = list(values)
        return round(sum(values) / len(values), 3) if values else None

    tf_valid_found = sum(len(r.valid) + r.tf_valid_rejected for r in records)
    tf_valid_checked = sum(len(r.valid) + r.tf_valid_rejected if r.tf_valid_decoded is None else r.tf_valid_decoded
                           for r in records)
    rejected = sum(r.tf_valid_rejected for r in records)
    checked_invalid = sum(r.tf_invalid_checked for r in records)
    accepted_invalid = sum(r.tf_invalid_accepted for r in records)
    families = {}
    for fam in sorted({r.family for r in records}):
        rs = [r for r in records if r.family == fam]
        families[fam] = {
            "n": len(rs),
            "right": sum(r.initial_right for r in rs),
            "right_with_shorter": sum(r.initial_right and r.has_shorter for r in rs),
            "wrong_corrected": sum((not r.initial_right) and bool(r.valid) for r in rs),
            "wrong_corrected_shorter": sum((not r.initial_right) and r.has_shorter for r in rs),
        }
    return {
        "items": len(records),
        "num_layers": num_layers,
        "right_under_full": len(right),
        "wrong_under_full": len(wrong),
        "right_with_shorter_valid": share([r for r in right if r.has_shorter], right),
        "wrong_corrected_by_any": share([r for r in wrong if r.valid], wrong),
        "wrong_corrected_by_shorter": share([r for r in wrong if r.has_shorter], wrong),
        "mean_shortest_valid_steps": mean(r.valid[0].layer_calls for r in found),
        "mean_shortest_valid_steps_right": mean(r.valid[0].layer_calls for r in right if r.valid),
        "mean_shortest_valid_steps_wrong": mean(r.valid[0].layer_calls for r in wrong if r.valid),
        "mean_valid_programs": mean(len(r.valid) for r in records),
        "mean_programs_scored": mean(r.programs_scored for r in records),
        "tf_valid_decode_agreement": round(1 - rejected / tf_valid_checked, 4) if tf_valid_checked else None,
        "tf_valid_checked": tf_valid_checked,
        "tf_valid_kept_by_margin": tf_valid_found - tf_valid_checked,
        "tf_invalid_decode_agreement": round(1 - accepted_invalid / checked_invalid, 4) if checked_invalid else None,
        "tf_invalid_checked": checked_invalid,
        "by_family": families,
    }


# ---------------------------------------------------------------- one prompt

VERIFY_TOP = 12  # shortest valid programs re-checked by real decoding


@dataclass
class PromptSearch:
    """Programs found for one prompt whose greedy answer is the expected one."""

    method: str
    programs: list[Program]  # decoding-verified, shortest first
    answers: list[str]  # each program's answer, as shown
    programs_scored: int
    seconds: float
    full_valid: bool | None  # the full program itself gives the expected answer (None: stopped before it was scored)
    stopped: bool = False  # cut short (time limit or cancel): partial results
    rule: str = "exact"  # how answers were checked (polar_core.study.checker)


def prompt_scorer(lm: LoadedModel, prompt_ids: Sequence[int], expected: str, few_shot: bool, rule: str = "exact",
                  stop_strings: Sequence[str] = (), should_stop: Callable[[], bool] | None = None):
    """Scores programs on one prompt: teacher forcing for few-shot prompts (an
    answer line that ends in a newline, checked exactly: fast, prefixes
    shared); decoding and the checker under `rule` otherwise (free text has
    no fixed continuation; a round of decoding stops at `should_stop`,
    raising polar_core.limits.Stopped)."""
    if few_shot:
        stops = line_end_ids(lm.tokenizer) | eos_token_ids(lm)
        return make_scorer(lm, Target(prompt_ids, expected_token_ids(lm, prompt_ids, expected), stops))

    def decode(programs):
        traces = decode_programs(lm, prompt_ids, programs, max_new_tokens=16, stop_strings=tuple(stop_strings),
                                 should_stop=should_stop)
        return [check_answer(t.text, expected, rule=rule) for t in traces]

    return decode


def find_programs(lm: LoadedModel, prompt: str, expected: str, *, method: str = "greedy", budget: int = 100,
                  verify_top: int = VERIFY_TOP, progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None, exact: bool = False) -> PromptSearch:
    """Search programs whose greedy answer to `prompt` is `expected`, then check
    the shortest `verify_top` of them by decoding.

    Answers are checked as the page marks them (``PromptStyle.answer_rule``):
    few-shot answers exactly, free-text answers by containing `expected`
    unless `exact`.

    Args:
        progress: called with (programs scored, budget) after every round.
        should_stop: polled between rounds (and between tokens of a decoded
            round); True ends the search early with what the finished
            rounds found (marked ``stopped``). The shortest programs found
            are still checked by decoding: one batch of at most
            `verify_top`, bounded work.
    """
    if not expected.strip():
        raise SearchError("a search needs an expected answer: a program is valid when it produces it")
    style = prompt_style(lm, prompt)
    rule = style.answer_rule(exact)
    ids = encode_prompts(lm, [style.text(prompt)], chat=style.chat).input_ids[0].tolist()
    scorer = prompt_scorer(lm, ids, expected, style.few_shot, rule, style.stop_strings, should_stop)
    search = make_search(method, lm.num_layers, budget=budget, seed=0)
    stopped = False
    while programs := search.ask():
        try:
            verdicts = scorer(programs)
        except Stopped:  # the round was cut short: its verdicts are not known
            stopped = True
            break
        search.tell(programs, verdicts)
        if progress is not None:
            progress(search.programs_scored, budget)
        if should_stop is not None and should_stop():
            stopped = True
            break
    if stopped:
        search.stop()
    result = search.result()
    candidates = result.valid[:verify_top]
    traces = decode_programs(lm, ids, candidates, max_new_tokens=16, stop_strings=style.stop_strings)
    found = [(p, shown_answer(t.text, style)) for p, t in zip(candidates, traces)
             if check_answer(t.text, expected, rule=rule)]
    return PromptSearch(method, [p for p, _ in found], [a for _, a in found], result.programs_scored,
                        result.seconds, result.full_valid, stopped, rule)
