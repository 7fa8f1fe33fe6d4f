"""Honest evaluation of a router on the task suite: accuracy against compute.

Methods compared on the same items (greedy, few-shot prompts, answers cut at
the first newline and checked by ``tasks.check_answer``):

- the full program;
- router top-1: the one program the router picks. DEPLOYABLE: the headline;
- router best-of-k: right if any of the top-k programs is right. It needs the
  ground truth to choose, so it is an ORACLE, and a table refuses to hold it
  without the same router's top-1 row directly above it (``check_honest``);
- static programs at the router's average depth: ShortGPT (drop the layers of
  lowest block influence), Gromov et al. (drop the most redundant block),
  early exit (drop the last layers);
- the search oracle: the best program search found for the item (needs the
  answer too).

Each generation is cached on (item, program), so methods that pick the same
program for an item share one run.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from polar_core.engine.generate import Stopping, generate
from polar_core.engine.models import LoadedModel
from polar_core.limits import Stopped
from polar_core.program import Program
from polar_core.study.checker import check_answer, extract_answer
from polar_core.study.redundancy import gromov_program, load_redundancy, measure_redundancy, shortgpt_program
from polar_core.study.router import Routed, Router, route_batch, train_router
from polar_core.study.suggest import MAX_CANDIDATES, suggest_many
from polar_core.study.supervision import SupervisionSample
from polar_core.study.tables import ORACLE_TAG, EvalTable, MethodRow
from polar_core.study.tasks import FAMILIES, STOP_TEXT, SUITE_VERSION, TaskItem, build_prompt, load_suite, sample_items

# --------------------------------------------------------------------------
# running programs, cached


def answer_texts(lm: LoadedModel, prompts: Sequence[str], programs: Sequence[Program], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers of few-shot prompts, one program per prompt (rows of one batch), cut at the newline."""
    traces = generate(lm, list(prompts), list(programs), max_new_tokens=max_new_tokens, chat=False,
                      stopping=Stopping(strings=(STOP_TEXT,)))
    return [t.text for t in traces]


class Runner:
    """Generates answers for (item, program) pairs, each pair once.

    Args:
        prompt_fn: the prompt of an item (default: the suite's few-shot prompt).
        pool: a `polar_core.study.distributed.WorkerPool` to generate on (the
            same batches, spread over its workers); None = in this process.
        should_stop: polled before every batch (in this process); True
            raises polar_core.limits.Stopped, keeping the answers so far.
    """

    def __init__(self, lm: LoadedModel, *, prompt_fn: Callable[[TaskItem], str] = build_prompt,
                 batch_size: int = 16, max_new_tokens: int = 8, progress: bool = True, pool=None,
                 should_stop: Callable[[], bool] | None = None):
        self.lm, self.prompt_fn, self.pool, self.should_stop = lm, prompt_fn, pool, should_stop
        self.batch_size, self.max_new_tokens, self.progress = batch_size, max_new_tokens, progress
        self.results: dict[tuple[str, tuple[int, ...]], tuple[str, bool]] = {}
        self._prompts: dict[str, str] = {}

    def prompt(self, item: TaskItem) -> str:
        if item.id not in self._prompts:
            self._prompts[item.id] = self.prompt_fn(item)
        return self._prompts[item.id]

    def correct(self, items: Sequence[TaskItem], programs: Sequence[Program], desc: str = "generating") -> list[bool]:
        """Whether each item is answered right under its program."""
        self.ensure(list(zip(items, programs)), desc)
        return [self.results[(it.id, p.path)][1] for it, p in zip(items, programs)]

    def ensure(self, pairs: Sequence[tuple[TaskItem, Program]], desc: str = "generating") -> None:
        """Generate every pair not run yet; pairs sharing a program share batches."""
        todo = {(it.id, p.path): (it, p) for it, p in pairs if (it.id, p.path) not in self.results}
        # Sorting by program keeps batches mostly single-program: one layer call per step.
        queue = sorted(todo.values(), key=lambda ip: (ip[1].path, ip[0].id))
        batches = [queue[i : i + self.batch_size] for i in range(0, len(queue), self.batch_size)]
        jobs = [([self.prompt(it) for it, _ in batch], [p for _, p in batch]) for batch in batches]
        bar = tqdm(total=len(queue), desc=desc, unit="run", disable=not self.progress or not queue)
        if self.pool is None:
            texts = []
            for prompts, programs in jobs:
                if self.should_stop is not None and self.should_stop():
                    bar.close()
                    self._keep(batches, texts)
                    raise Stopped
                texts.append(answer_texts(self.lm, prompts, programs, self.max_new_tokens))
                bar.update(len(prompts))
        else:
            texts = self.pool.map("answer_texts", [(job, {"max_new_tokens": self.max_new_tokens}) for job in jobs],
                                  lambda index, done: bar.update(len(done)))
        bar.close()
        self._keep(batches, texts)

    def _keep(self, batches, texts) -> None:
        for batch, batch_texts in zip(batches, texts):  # zip: only the batches that ran
            for (item, program), text in zip(batch, batch_texts):
                self.results[(item.id, program.path)] = (text, check_answer(text, item))


def _row(method, group, items, programs, correct, num_layers, **extra) -> MethodRow:
    return MethodRow(method, group, len(items), sum(correct), sum(p.layer_calls for p in programs), num_layers, **extra)


def fixed_program_row(runner: Runner, items, program: Program, method: str, group: str, note: str = "") -> MethodRow:
    """One program for every item."""
    programs = [program] * len(items)
    ok = runner.correct(items, programs, desc=method)
    return _row(method, group, items, programs, ok, program.num_layers, note=note)


def router_rows(runner: Runner, items, predictions: Sequence[Sequence[tuple[Program, float]]], name: str,
                k: int, group: str = "router", gate: str = "") -> tuple[MethodRow, MethodRow]:
    """The router's top-1 row and its best-of-k row, always together.

    Best-of-k counts an item right when any of its top-k programs is; its
    layers are those of the first right one in rank order (else of the top-1).
    Running all k programs costs k times as much, which the layer count does
    not show: the note says so.
    """
    depth = predictions[0][0][0].num_layers
    top1 = [preds[0][0] for preds in predictions]
    top1_ok = runner.correct(items, top1, desc=f"{name} top-1")
    pairs = [(it, p) for it, preds in zip(items, predictions) for p, _ in preds[:k]]
    runner.ensure(pairs, desc=f"{name} top-{k}")
    chosen, any_ok = [], []
    for item, preds in zip(items, predictions):
        right = [p for p, _ in preds[:k] if runner.results[(item.id, p.path)][1]]
        chosen.append(right[0] if right else preds[0][0])
        any_ok.append(bool(right))
    label = f"{name} top-1"
    top = _row(label, group, items, top1, top1_ok, depth,
               note="deployable: the one program the router picks" + (f" ({gate})" if gate else ""))
    best = _row(f"{name} best-of-{k} {ORACLE_TAG}", group, items, chosen, any_ok, depth, oracle=True,
                best_of_k_of=label, note=f"needs the answer to pick among {k} programs; running them all costs {k}x")
    return top, best


def ungated_row(runner: Runner, items, router: RouterUnderTest) -> MethodRow:
    """Ablation: the router's own top-1, also where its familiarity gate runs the full program."""
    programs = [preds[0][0] for preds in router.ungated]
    ok = runner.correct(items, programs, desc=f"{router.name} without the gate")
    return _row(f"{router.name} top-1 without the familiarity gate", f"{router.group}-ablation", items, programs, ok,
                programs[0].num_layers, note="ablation: the router's own pick on every prompt, familiar or not")


SUGGESTIONS_LABEL = "Suggestions top-1 (training-free)"


def suggestions_row(runner: Runner, items, programs: Sequence[Program]) -> MethodRow:
    """The training-free suggestion per item (``polar_core.study.suggest``): the
    cheapest program verified to keep the full program's answer."""
    ok = runner.correct(items, list(programs), desc="suggestions")
    kept = sum(not p.is_full for p in programs)
    return _row(SUGGESTIONS_LABEL, "suggest", items, list(programs), ok, programs[0].num_layers,
                note=f"verified to keep the full program's answer (shorter on {kept}/{len(items)} items, else "
                     "the full program); finding it runs the full program and one teacher-forced pass over "
                     f"{MAX_CANDIDATES} candidates, so it saves nothing on that input")


def suggested_programs(lm: LoadedModel, runner: Runner, items, progress: bool = True) -> list[Program]:
    """Per item, the cheapest verified suggestion, or the full program when none was verified."""
    full = Program.full(lm.num_layers)
    out = []
    bar = tqdm(total=len(items), desc="suggestions", unit="item", disable=not progress)
    for lo in range(0, len(items), 16):
        chunk = items[lo : lo + 16]
        for found in suggest_many(lm, [runner.prompt(it) for it in chunk], k=1):
            out.append(found.suggestions[0].program if found.suggestions else full)
        bar.update(len(chunk))
    bar.close()
    return out


def input_dependence(items: Sequence[TaskItem], programs: Sequence[Program]) -> dict:
    """How much a predictor's top-1 depends on the input: distinct programs over
    the items, and per family the distinct programs and the share of items
    whose program differs from the family's most common one."""
    by_family: dict[str, list[tuple[int, ...]]] = {}
    for item, program in zip(items, programs):
        by_family.setdefault(item.family, []).append(program.path)
    families = {}
    for family, paths in sorted(by_family.items()):
        mode = max(set(paths), key=paths.count)
        families[family] = {"n": len(paths), "distinct": len(set(paths)),
                            "differs_from_mode": round(sum(p != mode for p in paths) / len(paths), 4)}
    return {"items": len(items), "distinct_top1": len({p.path for p in programs}), "by_family": families}


def fallback_programs(predictions, threshold: float) -> list[Program]:
    """Top-1 when its log-prob is at least threshold, else the full program."""
    out = []
    for preds in predictions:
        program, score = preds[0]
        out.append(program if score >= threshold else Program.full(program.num_layers))
    return out


def fallback_row(runner: Runner, items, predictions, name: str, threshold: float, group: str = "router",
                 note: str = "") -> MethodRow:
    """Deployable: the router's top-1, or the full program when the router is unsure."""
    programs = fallback_programs(predictions, threshold)
    ok = runner.correct(items, programs, desc=f"{name} fallback")
    used = sum(not p.is_full or preds[0][0].is_full for p, preds in zip(programs, predictions))
    return _row(f"{name} top-1, full-program fallback", group, items, programs, ok, programs[0].num_layers,
                note=f"deployable: full program when top-1 log-prob < {threshold:.3f} "
                     f"(top-1 kept on {used}/{len(items)} items){'; ' + note if note else ''}")


def tune_fallback(runner: Runner, items, predictions, max_compute: float = 0.85) -> tuple[float, str]:
    """The fallback threshold with the best accuracy on these (validation) items
    among those that keep compute <= max_compute (any, if none does); ties go
    to less compute. Returns the threshold and a note with its val figures."""
    depth = predictions[0][0][0].num_layers
    top1 = [preds[0] for preds in predictions]
    top_ok = runner.correct(items, [p for p, _ in top1], desc="val top-1")
    full_ok = runner.correct(items, [Program.full(depth)] * len(items), desc="val full")
    candidates = sorted({s for _, s in top1}) + [math.inf]
    scored = []
    for t in candidates:
        keep = [s >= t for _, s in top1]
        acc = sum(a if k else b for a, b, k in zip(top_ok, full_ok, keep)) / len(items)
        layers = sum(p.layer_calls if k else depth for (p, _), k in zip(top1, keep)) / len(items)
        scored.append((acc, -layers, t))
    within = [x for x in scored if -x[1] <= max_compute * depth] or scored
    acc, neg_layers, threshold = max(within)
    return threshold, (f"threshold tuned on {len(items)} val-split items: val accuracy {acc:.1%} at "
                       f"{-neg_layers / depth:.1%} compute (val full program {sum(full_ok) / len(items):.1%})")


def search_oracle_programs(items: Sequence[TaskItem], samples: Sequence[SupervisionSample], num_layers: int):
    """Per item: the shortest valid program search found (the full program when
    it found none or the item is not in the file), and how many items had one."""
    by_question = {s.question: s for s in samples}
    programs, found = [], 0
    for item in items:
        sample = by_question.get(item.question)
        valid = sample.valid_programs if sample else ()
        if valid:
            found += 1
            programs.append(min(valid, key=lambda p: p.layer_calls))
        else:
            programs.append(Program.full(num_layers))
    return programs, found


# --------------------------------------------------------------------------
# static baselines


def static_programs(lm: LoadedModel, drop: int, calibration_prompts: Sequence[str]) -> tuple[dict[str, Program], str]:
    """ShortGPT, Gromov and early-exit programs that drop `drop` layers, and
    where the redundancy came from.

    Uses the shipped redundancy measurement (``redundancy.load_redundancy``)
    when there is one, else measures it on the calibration prompts.
    """
    depth = lm.num_layers
    drop = min(max(drop, 0), depth - 1)
    if drop == 0:
        full = Program.full(depth)
        return {"ShortGPT": full, "Gromov": full, "Early exit": full}, "nothing dropped"
    red = load_redundancy(lm.name)
    source = f"shipped redundancy measurement ({red.num_prompts} prompts)" if red is not None else ""
    if red is None or red.num_layers != depth:
        if not calibration_prompts:
            raise ValueError(f"no redundancy measurement ships for {lm.name!r}: pass calibration prompts")
        red = measure_redundancy(lm, list(calibration_prompts))
        source = f"redundancy measured on {len(calibration_prompts)} train-split prompts"
    programs = {
        "ShortGPT": shortgpt_program(red, drop),
        "Gromov": gromov_program(red, drop),
        "Early exit": Program.early_exit(depth, depth - 1 - drop),
    }
    return programs, source


# --------------------------------------------------------------------------
# the evaluation


@dataclass
class RouterUnderTest:
    """A router's predictions on the items, with the label to print."""

    name: str
    predictions: list[list[tuple[Program, float]]]
    group: str = "router"
    fallback: float | None = None  # run the full program when the top-1 log-prob is below this
    fallback_note: str = ""
    ungated: list[list[tuple[Program, float]]] | None = None  # the router's own ranking, where a gate changed it
    unfamiliar: list[bool] | None = None  # per item: the familiarity gate fired (None: the router has no gate)

    @classmethod
    def of(cls, name: str, routed: Sequence[Routed], group: str = "router") -> RouterUnderTest:
        """The deployable (familiarity-gated) predictions, keeping the router's own for the ablation row."""
        gated = [r.gated for r in routed]
        changed = any(g[0][0] != r.ranked[0][0] for g, r in zip(gated, routed))
        unfamiliar = [not r.familiar for r in routed] if routed and routed[0].threshold is not None else None
        return cls(name, gated, group, ungated=[r.ranked for r in routed] if changed else None, unfamiliar=unfamiliar)

    def subset(self, index: Sequence[int], **changes) -> RouterUnderTest:
        """The same router's predictions on some of the items only."""
        def pick(values):
            return None if values is None else [values[i] for i in index]

        return dataclasses.replace(self, predictions=pick(self.predictions), ungated=pick(self.ungated),
                                   unfamiliar=pick(self.unfamiliar), **changes)

    def gate_note(self) -> str:
        """What the familiarity gate did on these items ('' without a gate)."""
        if self.unfamiliar is None:
            return ""
        changed = 0 if self.ungated is None else sum(a[0][0] != b[0][0] for a, b in zip(self.predictions, self.ungated))
        return (f"familiarity gate: {sum(self.unfamiliar)} of {len(self.unfamiliar)} prompts unfamiliar, the full "
                f"program instead of the router's own pick on {changed}")


def route_items(lm, router, runner: Runner, items, k: int, batch_size: int = 32) -> list[Routed]:
    """What the router says about each item's prompt (route_batch), in batches."""
    out = []
    for i in range(0, len(items), batch_size):
        out += route_batch(lm, router, [runner.prompt(it) for it in items[i : i + batch_size]], k)
    return out


def predict_items(lm, router, runner: Runner, items, k: int, batch_size: int = 32):
    """Top-k deployable predictions of a router for each item's prompt (familiarity-gated)."""
    return [r.gated for r in route_items(lm, router, runner, items, k, batch_size)]


def evaluate_items(
    runner: Runner,
    items: Sequence[TaskItem],
    routers: Sequence[RouterUnderTest],
    *,
    k: int = 5,
    title: str,
    search_samples: Sequence[SupervisionSample] | None = None,
    calibration_prompts: Sequence[str] = (),
    static: bool = True,
    notes: Sequence[str] = (),
    suggested: Sequence[Program] | None = None,
) -> EvalTable:
    """One table: the full program, each router (top-1, then best-of-k), the
    training-free suggestions (``suggested``: one program per item), static
    baselines at the average depth of the first router's deployable rows and
    of the suggestions, and the search oracle."""
    if not items:
        raise ValueError("no items to evaluate")
    depth = runner.lm.num_layers
    rows = [fixed_program_row(runner, items, Program.full(depth), "Full program", "full")]
    deployable = []  # the first router's deployable rows: static baselines match their depths
    for i, r in enumerate(routers):
        pair = router_rows(runner, items, r.predictions, r.name, k, r.group, gate=r.gate_note())
        rows += pair
        if r.ungated is not None:
            rows.append(ungated_row(runner, items, r))
        if i == 0:
            deployable.append(pair[0])
        if r.fallback is not None:
            rows.append(fallback_row(runner, items, r.predictions, r.name, r.fallback, r.group, r.fallback_note))
            if i == 0:
                deployable.append(rows[-1])
    if suggested is not None:
        rows.append(suggestions_row(runner, items, suggested))
        deployable.append(rows[-1])
    notes = list(notes)
    drops = sorted({max(0, round(depth - d.layer_calls)) for d in deployable}) if static else []
    for drop in drops:
        programs, source = static_programs(runner.lm, drop, calibration_prompts)
        matched = " / ".join(f"{d.method} ({d.layer_calls:.1f})" for d in deployable
                             if max(0, round(depth - d.layer_calls)) == drop)
        notes.append(f"Static baselines @ {depth - drop} drop {drop} layers to match the average depth of "
                     f"{matched}; {source}.")
        for name, program in programs.items():
            rows.append(fixed_program_row(runner, items, program, f"{name} @ {depth - drop}", "static",
                                          f"`{program.format()}`"))
    if search_samples is not None:
        programs, found = search_oracle_programs(items, search_samples, depth)
        ok = runner.correct(items, programs, desc="search oracle")
        rows.append(_row(f"Search oracle {ORACLE_TAG}", "search", items, programs, ok, depth, oracle=True,
                         note=f"shortest valid program found by search ({found}/{len(items)} items have one; "
                              "others run the full program)"))
    return EvalTable(title, tuple(rows), tuple(notes))


def family_table(runner: Runner, items, predictions, title: str,
                 suggested: Sequence[Program] | None = None) -> EvalTable:
    """Per family: full program vs router top-1 (and the suggestions), no oracle rows."""
    depth = runner.lm.num_layers
    rows = []
    for family in sorted({it.family for it in items}):
        idx = [i for i, it in enumerate(items) if it.family == family]
        fam_items = [items[i] for i in idx]
        full = [Program.full(depth)] * len(idx)
        top1 = [predictions[i][0][0] for i in idx]
        rows.append(_row(f"{family}: full", family, fam_items, full, runner.correct(fam_items, full), depth))
        rows.append(_row(f"{family}: router top-1", family, fam_items, top1, runner.correct(fam_items, top1), depth,
                         note=f"{len(set(p.path for p in top1))} distinct programs"))
        if suggested is not None:
            mine = [suggested[i] for i in idx]
            rows.append(_row(f"{family}: suggestions top-1", family, fam_items, mine, runner.correct(fam_items, mine),
                             depth))
    return EvalTable(title, tuple(rows))


@dataclass(frozen=True)
class Recipe:
    """How the router under test was trained (its training.json): the held-out
    routers repeat it on the training file minus a family."""

    epochs: int = 40
    seed: int = 0
    lr: float = 1e-3
    familiar_quantile: float | None = None  # None: no familiarity gate

    def train(self, lm: LoadedModel, samples, config, progress: bool) -> Router:
        return train_router(lm, samples, config, epochs=self.epochs, seed=self.seed, lr=self.lr, progress=progress,
                            familiar_quantile=self.familiar_quantile)

    def describe(self) -> str:
        gate = ("no familiarity gate" if self.familiar_quantile is None
                else f"familiarity gate at quantile {self.familiar_quantile}")
        return f"{self.epochs} epochs, lr {self.lr}, seed {self.seed}, {gate}"


def leave_one_out_table(setting: "_Setting", router: Router, items, main_predictions, train_samples,
                        families: Sequence[str], *, recipe: Recipe, progress: bool) -> EvalTable:
    """For each family, a router trained without it, on that family's items,
    beside the full program and the main router (which saw it); then all
    families together (each item predicted by the router that never saw its family)."""
    depth = setting.lm.num_layers
    runner = setting.runner
    rows, lofo_all, main_all, order = [], [], [], []
    suite_family = _family_of(train_samples, load_suite())
    for family in families:
        kept = [s for s, fam in zip(train_samples, suite_family) if fam != family]
        held_out = recipe.train(setting.lm, kept, router.config, progress)
        idx = [i for i, it in enumerate(items) if it.family == family]
        fam_items = [items[i] for i in idx]
        under = RouterUnderTest.of(f"without {family}", route_items(setting.lm, held_out, runner, fam_items, 1))
        lofo = [p[0][0] for p in under.predictions]
        main = [main_predictions[i][0][0] for i in idx]
        full = [Program.full(depth)] * len(idx)
        gate = under.gate_note()
        rows.append(_row(f"{family}: full", family, fam_items, full, runner.correct(fam_items, full), depth))
        rows.append(_row(f"{family}: router trained without {family}, top-1", family, fam_items, lofo,
                         runner.correct(fam_items, lofo), depth,
                         note=f"{len(kept)} training samples" + (f"; {gate}" if gate else "")))
        if under.ungated is not None:
            own = [p[0][0] for p in under.ungated]
            rows.append(_row(f"{family}: router trained without {family}, top-1 without the familiarity gate",
                             family, fam_items, own, runner.correct(fam_items, own), depth, note="ablation"))
        rows.append(_row(f"{family}: main router top-1 (saw {family})", family, fam_items, main,
                         runner.correct(fam_items, main), depth))
        lofo_all += lofo
        main_all += main
        order += fam_items
    full = [Program.full(depth)] * len(order)
    rows.append(_row("All families: full", "all", order, full, runner.correct(order, full), depth))
    rows.append(_row("All families: router that never saw the item's family, top-1", "all", order, lofo_all,
                     runner.correct(order, lofo_all), depth))
    rows.append(_row("All families: main router top-1", "all", order, main_all, runner.correct(order, main_all), depth))
    return EvalTable(f"Leave one family out ({setting.split} split)", tuple(rows), (
        f"Each 'trained without' router repeats the main router's recipe ({recipe.describe()}) "
        "on the training file minus one family's samples; it is evaluated on that family only.",))


# --------------------------------------------------------------------------
# the whole report


def _family_of(samples: Sequence[SupervisionSample], items: Sequence[TaskItem]) -> list[str | None]:
    by_question = {it.question: it.family for it in items}
    return [by_question.get(s.question) for s in samples]


@dataclass
class _Setting:
    """What every table of one evaluation shares."""

    lm: LoadedModel
    runner: Runner
    split: str
    k: int
    calibration_prompts: list[str]
    val_items: list[TaskItem]  # where fallback thresholds are tuned ([] = no fallback row)

    def under_test(self, name: str, router: Router, routed: Sequence[Routed], group: str = "router",
                   exclude: str | None = None) -> RouterUnderTest:
        """A router's predictions, with a fallback threshold tuned on val items (never on the evaluated split)."""
        under = RouterUnderTest.of(name, routed, group)
        if not self.val_items or self.split == "val":
            return under
        tune_items = [it for it in self.val_items if it.family != exclude]
        tune_preds = predict_items(self.lm, router, self.runner, tune_items, 1)
        threshold, note = tune_fallback(self.runner, tune_items, tune_preds)
        return dataclasses.replace(under, fallback=threshold, fallback_note=note)


def run_evaluation(
    lm: LoadedModel,
    router: Router,
    *,
    split: str = "test",
    test_samples: Sequence[SupervisionSample] | None = None,
    train_samples: Sequence[SupervisionSample] | None = None,
    ood_family: str | None = None,
    k: int = 5,
    per_family: int | None = None,
    epochs: int = 40,
    seed: int = 0,
    lr: float = 1e-3,
    familiar_quantile: float | None = None,
    calibration: int = 32,
    max_new_tokens: int = 8,
    fallback: bool = False,
    suggestions: bool = False,
    leave_one_out: bool = False,
    held_out_families: Sequence[str] = (),
    held_out_per_family: int | None = None,
    progress: bool = True,
    pool=None,
) -> list[EvalTable]:
    """The router evaluation on a split of the task suite: the main table, a
    per-family table and, with `ood_family` and `train_samples`, the table of
    a second router trained without that family, evaluated on it.

    Args:
        per_family: evaluate at most this many items per family (None = all).
        epochs, seed, lr, familiar_quantile: the router's training recipe
            (its training.json), repeated by the held-out-family routers.
        calibration: train-split prompts on which static baselines measure
            redundancy, when none is shipped.
        fallback: add a deployable "top-1, full-program fallback" row whose
            threshold is tuned on the val split (never on the evaluated split).
        suggestions: add the training-free suggestions (``polar_core.study.suggest``).
        leave_one_out: with `train_samples`, a router trained without each
            family in turn, evaluated on that family (one table).
        held_out_families: question families no router saw (``tasks.HELD_OUT_FAMILIES``):
            a table over up to `held_out_per_family` items of each, every split.
        pool: generate on these Ray workers (polar_core.study.distributed);
            the tables are the same.
    """
    items = [it for fam in FAMILIES for it in sample_items(fam, per_family, split)]
    recipe = Recipe(epochs, seed, lr, familiar_quantile)
    runner = Runner(lm, max_new_tokens=max_new_tokens, progress=progress, pool=pool)
    per_calibration_family = max(1, calibration // len(FAMILIES))
    setting = _Setting(
        lm, runner, split, k,
        calibration_prompts=[build_prompt(it) for fam in FAMILIES for it in sample_items(fam, per_calibration_family, "train")],
        val_items=[it for fam in FAMILIES for it in sample_items(fam, per_family, "val")] if fallback else [])
    main = setting.under_test("Router", router, route_items(lm, router, runner, items, k))
    preds = main.predictions
    suggested = suggested_programs(lm, runner, items, progress) if suggestions else None
    dependence = input_dependence(items, [p[0][0] for p in preds])
    note = (f"{len(items)} {split}-split items of {len(FAMILIES)} families; greedy, {max_new_tokens} new tokens max. "
            f"Input dependence of the router's top-1: {dependence['distinct_top1']} distinct programs over the "
            f"{len(items)} items.")
    tables = _split_tables(setting, items, main, test_samples, note, suggested)
    tables[0] = dataclasses.replace(tables[0], facts={"router_top1_input_dependence": dependence})
    if ood_family and train_samples is not None:
        tables.append(_held_out_table(setting, router, items, main, train_samples, test_samples, ood_family,
                                      recipe=recipe, progress=progress))
    if leave_one_out and train_samples is not None:
        tables.append(leave_one_out_table(setting, router, items, preds, train_samples, FAMILIES, recipe=recipe,
                                          progress=progress))
    if held_out_families:
        tables += _new_families_tables(setting, router, held_out_families, held_out_per_family, suggestions)
    return tables


def _new_families_tables(setting: "_Setting", router: Router, families: Sequence[str], per_family: int | None,
                         suggestions: bool) -> list[EvalTable]:
    """Question families no router saw: every method on up to `per_family` items of each (all splits)."""
    for family in families:
        if family in FAMILIES:
            raise ValueError(f"{family!r} is a searched family, not a held-out one")
    items = [it for fam in families for it in sample_items(fam, per_family)]
    router_under_test = RouterUnderTest.of("Router", route_items(setting.lm, router, setting.runner, items, setting.k))
    preds = router_under_test.predictions
    suggested = suggested_programs(setting.lm, setting.runner, items) if suggestions else None
    dependence = input_dependence(items, [p[0][0] for p in preds])
    main = evaluate_items(
        setting.runner, items, [router_under_test], k=setting.k,
        title=f"New question families no router saw ({', '.join(families)})",
        calibration_prompts=setting.calibration_prompts, suggested=suggested,
        notes=[f"{len(items)} items ({per_family or 'all'} per family, every split: no router or search saw "
               f"these families). Router top-1: {dependence['distinct_top1']} distinct programs."])
    main = dataclasses.replace(main, facts={"router_top1_input_dependence": dependence})
    per = family_table(setting.runner, items, preds, "New question families, per family", suggested)
    return [main, per]


def _split_tables(setting: _Setting, items, main: RouterUnderTest, test_samples, note: str,
                  suggested: Sequence[Program] | None = None) -> list[EvalTable]:
    """The main table, the items the search file covers (when it covers only some), the per-family table."""
    runner, split, k, calib = setting.runner, setting.split, setting.k, setting.calibration_prompts
    searched = set() if test_samples is None else {s.question for s in test_samples}
    covered = [i for i, it in enumerate(items) if it.question in searched]
    complete = test_samples is not None and len(covered) == len(items)
    tables = [
        evaluate_items(runner, items, [main], k=k, title=f"All families ({split} split)",
                       search_samples=test_samples if complete else None, calibration_prompts=calib, notes=[note],
                       suggested=suggested),
        family_table(runner, items, main.predictions, f"Per family: full program vs router top-1 ({split} split)",
                     suggested),
    ]
    if covered and not complete:
        # The search file covers only some items: compare every method on exactly those.
        sub = [items[i] for i in covered]
        sub_router = main.subset(covered)
        tables.insert(1, evaluate_items(
            runner, sub, [sub_router], k=k, title=f"Items with search results ({len(sub)} of {len(items)})",
            search_samples=test_samples, calibration_prompts=calib,
            suggested=None if suggested is None else [suggested[i] for i in covered],
            notes=["The search oracle needs search results; the test supervision file covers these items, "
                   "so every method is compared on them alone (same router, same threshold)."]))
    return tables


def _held_out_table(setting: _Setting, router: Router, items, main: RouterUnderTest, train_samples, test_samples,
                    family: str, *, recipe: Recipe, progress: bool) -> EvalTable:
    """A second router trained without `family`, against the main router, on that family's items."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    kept = [s for s, fam in zip(train_samples, _family_of(train_samples, load_suite())) if fam != family]
    held_out = recipe.train(setting.lm, kept, router.config, progress)
    fam_idx = [i for i, it in enumerate(items) if it.family == family]
    fam_items = [items[i] for i in fam_idx]
    routers = [
        setting.under_test(f"Router w/o {family}", held_out,
                           route_items(setting.lm, held_out, setting.runner, fam_items, setting.k), exclude=family),
        main.subset(fam_idx, name=f"Main router (saw {family})", group="router-main"),
    ]
    searched = set() if test_samples is None else {s.question for s in test_samples}
    return evaluate_items(
        setting.runner, fam_items, routers, k=setting.k, title=f"Held-out family: {family} ({setting.split} split)",
        search_samples=test_samples if all(it.question in searched for it in fam_items) else None,
        calibration_prompts=setting.calibration_prompts,
        notes=[f"'Router w/o {family}' was trained on the same train file minus its "
               f"{len(train_samples) - len(kept)} {family} samples ({len(kept)} left), same config, "
               f"{recipe.describe()}: {family} is out of distribution for it. "
               f"'Main router' saw {family} in training (in distribution), for comparison."])


# --------------------------------------------------------------------------
# one family, on the page


def evaluate_family(lm: LoadedModel, router: Router | None, family: str, *, n_items: int = 20, drop: int = 6,
                    why_no_router: str = "", progress: bool = False,
                    should_stop: Callable[[], bool] | None = None) -> EvalTable:
    """The explorer's Evaluate tab: router top-1 (with best-of-k beside it)
    and the baselines over a family's test items; without a router, the full
    program and the static baselines dropping `drop` layers.

    When the router's depth would make the static baselines the full program
    (a router that keeps every layer), they drop `drop` layers instead, and
    the table says so.

    `should_stop` is polled between batches; when it turns true the table
    holds the rows finished so far, its title marked "partial".
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; choose one of {', '.join(FAMILIES)}")
    items = sample_items(family, n_items, "test")
    runner = Runner(lm, progress=progress, should_stop=should_stop)
    title = f"{family}: {len(items)} test items"
    rows: list[MethodRow] = []
    notes: list[str] = []
    try:
        _family_rows(lm, router, runner, items, drop, why_no_router, rows, notes)
    except Stopped:
        title += f" (partial: stopped after {len(rows)} method(s))"
    return EvalTable(title, tuple(rows), tuple(notes))


def _family_rows(lm, router, runner: Runner, items, drop: int, why_no_router: str, rows: list, notes: list) -> None:
    """The Evaluate tab's rows and notes, appended as each finishes (so a stop keeps the finished ones)."""
    depth = lm.num_layers
    rows.append(fixed_program_row(runner, items, Program.full(depth), "Full program", "full"))
    if router is not None:
        preds = predict_items(lm, router, runner, items, k=5)
        top, best = router_rows(runner, items, preds, "Router", 5)
        rows += [top, best]
        if round(depth - top.layer_calls) > 0:
            drop = round(depth - top.layer_calls)
            notes.append(f"Static baselines drop {drop} layers to match the router's top-1 depth ({top.layer_calls:.1f}).")
        else:
            notes.append(f"The router's top-1 runs every layer here; static baselines drop {drop} layers "
                         "(the slider) instead of matching it.")
    else:
        notes.append(f"No router loaded ({why_no_router}): baselines only, dropping {drop} layers.")
    try:
        statics, source = static_programs(lm, drop, [])
    except (ValueError, FileNotFoundError) as exc:
        statics, source = {"Early exit": Program.early_exit(depth, depth - 1 - drop)}, str(exc)
    notes.append(f"Static programs: {source}.")
    for name, program in statics.items():
        rows.append(fixed_program_row(runner, items, program, f"{name} @ {depth - drop}", "static", program.format()))


# --------------------------------------------------------------------------
# the full program's accuracy per family


def measure_full_accuracy(lm: LoadedModel, families: Sequence[str] = FAMILIES, per_family: int | None = 40,
                          split: str | None = None, shots: int = 3, batch_size: int = 16, max_new_tokens: int = 8,
                          log: Callable[[str], None] = print) -> dict:
    """Full-program greedy accuracy per family (the suite's baseline); a JSON-ready report."""
    report = {"model": lm.name, "shots": shots, "per_family": per_family, "split": split,
              "max_new_tokens": max_new_tokens, "suite_version": SUITE_VERSION, "families": {}, "items": {}}
    for family in families:
        items = sample_items(family, per_family, split)
        start, right = time.perf_counter(), 0
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            traces = generate(lm, [build_prompt(it, shots) for it in chunk], None, max_new_tokens=max_new_tokens,
                              chat=False, stopping=Stopping(strings=(STOP_TEXT,)))
            for item, trace in zip(chunk, traces):
                ok = check_answer(trace.text, item)
                right += ok
                report["items"][item.id] = {"prediction": extract_answer(trace.text), "correct": ok}
        acc = right / len(items) if items else 0.0
        report["families"][family] = {"n": len(items), "correct": right, "accuracy": round(acc, 4)}
        log(f"{family:16s} {right:3d}/{len(items):3d} = {acc:6.1%}  ({time.perf_counter() - start:.1f} s)")
    return report
