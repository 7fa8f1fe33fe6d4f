"""Search for valid programs of one input: MCTS (as in PoLar/CoLa) and a greedy search.

Both searches are *ask/tell* state machines: ``ask()`` returns programs that
need a score, ``tell(programs, valid)`` hands the verdicts back. That lets one
driver (``run_searches``) advance many searches in lock step and score all
their requests in one batch (``polar_core.study.scoring`` shares prefixes across
programs and questions), while ``mcts_search`` / ``greedy_search`` run one
search with any scorer (a callable ``programs -> list[bool]``), e.g. a rigged
one in tests. Given the same seed and settings a search is deterministic, and
lock-step or alone makes no difference: a search only sees its own verdicts.

MCTS (CoLa/PoLar): a tree node is a *partial* program built left to right over
layers 0..D-1 with a cursor c. The actions at the cursor are the paper's
segments of k <= 4 layers: keep them, skip them, or repeat them r times
(2 <= r <= 4). A node's value comes from its rollout, the partial program
completed by running the remaining layers c..D-1 once (the identity rollout:
deterministic, so every rollout is one cached program). Reward = valid (1/0).
Selection maximises ``R/v + c*sqrt(ln V / v) - λ|π|/D`` over children (|π|:
the rollout program's steps), except that with probability ``explore`` a
random child is taken; untried actions are expanded first, shortest rollout
first. Defaults are CoLa's: 200 simulations, λ = 5.0, explore = 0.1.
Simulations are run in waves of ``wave`` with a virtual loss, so a wave's new
programs are scored together; a simulation whose program is already scored
costs no model call but counts towards the budget.

Greedy: score the full program. If it is valid, repeatedly apply the single
skip edit (drop a block of k <= 4 consecutive steps) that leaves the
shortest valid program, until none is valid. If it is wrong, first try every
single skip and loop edit of the full program (a block of k <= 4 layers
repeated r <= 4 times); if some are valid, continue from the shortest one.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field

from polar_core.program import Program

LayerPath = tuple[int, ...]  # a program's path of layer indices
Scorer = Callable[[Sequence[Program]], list[bool]]  # programs -> valid?

MAX_BLOCK = 4  # k: layers per segment / edit (paper: <= 4)
MAX_REPEATS = 4  # r: times a block runs (paper: <= 4)


class SearchError(ValueError):
    """Bad search settings or a scorer that broke its contract."""


@dataclass
class SearchResult:
    """What a search found on one input.

    valid / invalid: every program the search looked at (scored by it or found
    in a shared cache), valid ones shortest first (ties by path).
    """

    method: str
    num_layers: int
    valid: list[Program]
    invalid: list[Program]
    full_valid: bool | None
    programs_scored: int  # new model calls' worth of programs (cache misses)
    simulations: int  # MCTS simulations / greedy rounds
    seconds: float

    @property
    def shortest(self) -> Program | None:
        return self.valid[0] if self.valid else None

    @property
    def has_shorter(self) -> bool:
        """A valid program with fewer steps than the full program exists."""
        return bool(self.valid) and self.valid[0].layer_calls < self.num_layers


def _check_settings(num_layers, budget, seed) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise SearchError(f"num_layers must be a positive integer, got {num_layers!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise SearchError(f"budget must be a positive integer, got {budget!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SearchError(f"seed must be an integer, got {seed!r}")


class _Search:
    """Shared bookkeeping: the verdict cache, requests in flight, the clock."""

    method = "search"

    def __init__(self, num_layers: int, budget: int, seed: int, cache: MutableMapping[LayerPath, bool] | None):
        _check_settings(num_layers, budget, seed)
        self.num_layers = num_layers
        self.budget = budget
        self.rng = random.Random(seed)
        self.cache: MutableMapping[LayerPath, bool] = {} if cache is None else cache
        self.seen: dict[LayerPath, None] = {}  # programs this search looked at, in order
        self.requested: list[LayerPath] = []
        self.programs_scored = 0
        self.simulations = 0
        self.done = False
        self._started: float | None = None
        self._seconds = 0.0

    @property
    def full(self) -> LayerPath:
        return tuple(range(self.num_layers))

    def _look(self, path: LayerPath) -> bool | None:
        """The cached verdict of path, or None (it then needs a score)."""
        self.seen.setdefault(path, None)
        return self.cache.get(path)

    def ask(self) -> list[Program]:
        """Programs to score next; empty exactly when the search is done."""
        if self._started is None:
            self._started = time.perf_counter()
        if self.requested:
            raise SearchError("ask() called twice without tell()")
        paths = [] if self.done else self._ask()
        if not paths:
            self.done = True
            self._seconds = time.perf_counter() - self._started
        self.requested = paths
        return [Program(p, self.num_layers) for p in paths]

    def tell(self, programs: Sequence[Program], valid: Sequence[bool]) -> None:
        """Verdicts for the programs the last ask() returned, in order."""
        paths = [tuple(p.path) if isinstance(p, Program) else tuple(p) for p in programs]
        if paths != self.requested:
            raise SearchError("tell() must answer exactly the programs of the last ask()")
        valid = list(valid)
        if len(valid) != len(paths):
            raise SearchError(f"scorer returned {len(valid)} verdicts for {len(paths)} programs")
        for path, ok in zip(paths, valid):
            if not isinstance(ok, bool) and type(ok).__name__ != "bool_":  # numpy's bool too
                raise SearchError(f"scorer verdicts must be booleans, got {type(ok).__name__}")
            self.cache[path] = bool(ok)
        self.programs_scored += len(paths)
        self.requested = []
        self._tell(paths)

    def stop(self) -> None:
        """End the search early (a time limit, a cancel): result() then holds what was told so far."""
        if self._started is None:
            self._started = time.perf_counter()
        self.requested, self.done = [], True
        self._seconds = time.perf_counter() - self._started

    def result(self) -> SearchResult:
        if not self.done:
            raise SearchError("the search is not finished")
        valid = [p for p in self.seen if self.cache.get(p) is True]
        invalid = [p for p in self.seen if self.cache.get(p) is False]
        order = lambda p: (len(p), p)  # noqa: E731
        return SearchResult(
            method=self.method,
            num_layers=self.num_layers,
            valid=[Program(p, self.num_layers) for p in sorted(valid, key=order)],
            invalid=[Program(p, self.num_layers) for p in sorted(invalid, key=order)],
            full_valid=self.cache.get(self.full),
            programs_scored=self.programs_scored,
            simulations=self.simulations,
            seconds=self._seconds,
        )

    def _ask(self) -> list[LayerPath]:
        raise NotImplementedError

    def _tell(self, paths: list[LayerPath]) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------- MCTS


@dataclass(eq=False)
class _Node:
    prefix: LayerPath
    cursor: int
    rollout: LayerPath  # prefix + the remaining layers once
    parent: "_Node | None" = None
    children: list["_Node"] = field(default_factory=list)
    untried: list[LayerPath] = field(default_factory=list)  # segments to append
    visits: int = 0
    total: float = 0.0
    exhausted: bool = False


def _segments(cursor: int, num_layers: int, max_block: int, max_repeats: int) -> list[tuple[LayerPath, int]]:
    """(steps to append, layers consumed) for each action at the cursor."""
    actions = []
    for k in range(1, min(max_block, num_layers - cursor) + 1):
        block = tuple(range(cursor, cursor + k))
        actions.append((block, k))  # keep
        actions.append(((), k))  # skip
        actions += [(block * r, k) for r in range(2, max_repeats + 1)]  # repeat
    return actions


class MCTS(_Search):
    """Monte Carlo tree search over left-to-right programs (see module docstring)."""

    method = "mcts"

    def __init__(
        self,
        num_layers: int,
        *,
        budget: int = 200,
        c: float = math.sqrt(2),
        length_penalty: float = 5.0,
        explore: float = 0.1,
        wave: int = 8,
        max_block: int = MAX_BLOCK,
        max_repeats: int = MAX_REPEATS,
        seed: int = 0,
        cache: MutableMapping[LayerPath, bool] | None = None,
    ):
        super().__init__(num_layers, budget, seed, cache)
        if not 0.0 <= explore <= 1.0:
            raise SearchError(f"explore must be in [0, 1], got {explore}")
        if c < 0 or length_penalty < 0:
            raise SearchError("c and length_penalty must be >= 0")
        if wave < 1 or max_block < 1 or max_repeats < 1:
            raise SearchError("wave, max_block and max_repeats must be >= 1")
        self.c, self.length_penalty, self.explore, self.wave = c, length_penalty, explore, wave
        self.max_block, self.max_repeats = max_block, max_repeats
        self.root = self._make_node((), 0, None)
        self.waiting: dict[LayerPath, list[list[_Node]]] = {}  # program -> selection paths to credit

    def _make_node(self, prefix: LayerPath, cursor: int, parent: _Node | None) -> _Node:
        node = _Node(prefix, cursor, prefix + tuple(range(cursor, self.num_layers)), parent)
        if cursor >= self.num_layers:
            node.exhausted = True
            return node
        options = []
        for steps, k in _segments(cursor, self.num_layers, self.max_block, self.max_repeats):
            if not prefix + steps and cursor + k >= self.num_layers:
                continue  # would skip every layer: no program
            rollout_len = len(prefix) + len(steps) + self.num_layers - cursor - k
            options.append((rollout_len, self.rng.random(), steps, k))
        options.sort()  # shortest rollout first, ties in seeded random order
        node.untried = [(steps, k) for _, _, steps, k in options]  # type: ignore[misc]
        return node

    def _ucb(self, child: _Node, parent_visits: int) -> float:
        v = max(child.visits, 1)
        return (
            child.total / v
            + self.c * math.sqrt(math.log(max(parent_visits, 1)) / v)
            - self.length_penalty * len(child.rollout) / self.num_layers
        )

    def _ask(self) -> list[LayerPath]:
        batch: list[LayerPath] = []
        if self.simulations == 0:
            # The root's rollout is the full program: score it first, as CoLa does.
            self.simulations += 1
            batch += self._evaluate([self.root])
            if batch:
                return batch
        while len(batch) < self.wave and self.simulations < self.budget and not self.root.exhausted:
            self.simulations += 1
            batch += self._evaluate(self._select())
        return batch

    def _select(self) -> list[_Node]:
        """One selection + expansion; returns the path root..new node."""
        node, trail = self.root, [self.root]
        while True:
            if node.untried:
                steps, k = node.untried.pop(0)
                child = self._make_node(node.prefix + steps, node.cursor + k, node)
                node.children.append(child)
                trail.append(child)
                self._update_exhausted(trail)
                return trail
            live = [ch for ch in node.children if not ch.exhausted]
            if not live:  # cannot happen for a non-exhausted node; guard anyway
                node.exhausted = True
                return trail
            if self.rng.random() < self.explore:
                node = self.rng.choice(live)
            else:
                node = max(live, key=lambda ch: self._ucb(ch, node.visits))
            trail.append(node)

    def _update_exhausted(self, trail: list[_Node]) -> None:
        for node in reversed(trail):
            if node.cursor < self.num_layers and (node.untried or any(not ch.exhausted for ch in node.children)):
                break
            node.exhausted = True

    def _evaluate(self, trail: list[_Node]) -> list[LayerPath]:
        """Credit the trail now (cached verdict) or once its program is scored."""
        for node in trail:
            node.visits += 1  # virtual loss until the verdict is in
        program = trail[-1].rollout
        verdict = self._look(program)
        if verdict is not None:
            self._credit(trail, verdict)
            return []
        first = program not in self.waiting
        self.waiting.setdefault(program, []).append(trail)
        return [program] if first else []

    @staticmethod
    def _credit(trail: list[_Node], valid: bool) -> None:
        for node in trail:
            node.total += float(valid)

    def _tell(self, paths: list[LayerPath]) -> None:
        for path in paths:
            for trail in self.waiting.pop(path, []):
                self._credit(trail, self.cache[path])


# ---------------------------------------------------------------- greedy


def skip_edits(path: LayerPath, max_block: int = MAX_BLOCK) -> list[LayerPath]:
    """Every path with one block of k <= max_block consecutive steps removed."""
    out = []
    for k in range(1, max_block + 1):
        for i in range(len(path) - k + 1):
            edited = path[:i] + path[i + k :]
            if edited:
                out.append(edited)
    return out


def loop_edits(path: LayerPath, max_block: int = MAX_BLOCK, max_repeats: int = MAX_REPEATS) -> list[LayerPath]:
    """Every path with one block of k <= max_block steps run r = 2..max_repeats times."""
    out = []
    for k in range(1, max_block + 1):
        for i in range(len(path) - k + 1):
            block = path[i : i + k]
            out += [path[:i] + block * r + path[i + k :] for r in range(2, max_repeats + 1)]
    return out


class GreedySearch(_Search):
    """Greedy single-edit search (see module docstring); budget = programs scored."""

    method = "greedy"

    def __init__(
        self,
        num_layers: int,
        *,
        budget: int = 400,
        max_block: int = MAX_BLOCK,
        max_repeats: int = MAX_REPEATS,
        seed: int = 0,
        cache: MutableMapping[LayerPath, bool] | None = None,
    ):
        super().__init__(num_layers, budget, seed, cache)
        if max_block < 1 or max_repeats < 1:
            raise SearchError("max_block and max_repeats must be >= 1")
        self.max_block, self.max_repeats = max_block, max_repeats
        self.phase = "start"
        self.current = self.full
        self.candidates: list[LayerPath] = []

    def _ask(self) -> list[LayerPath]:
        while True:
            candidates = self._next_candidates()
            if not candidates:
                return []
            self.simulations += 1
            room = max(self.budget - self.programs_scored, 0)
            missing = [p for p in candidates if self._look(p) is None][:room]
            self.candidates = [p for p in candidates if p in self.cache or p in missing]
            if missing:
                return missing
            # Every candidate within budget is already scored: decide now.

    def _next_candidates(self) -> list[LayerPath]:
        """Advance the phase with the verdicts in hand; the next edits to try."""
        if self.phase == "start":
            self.phase = "judge_full"
            return [self.full]
        if self.phase == "judge_full":
            repair = not self.cache[self.full]
            self.phase = "repair" if repair else "shorten"
            return self._edits(self.full, repair)
        best = self._best(self.candidates)
        if best is None:
            return []
        self.current, self.phase = best, "shorten"
        return self._edits(best, repair=False)

    def _edits(self, path: LayerPath, repair: bool) -> list[LayerPath]:
        edits = skip_edits(path, self.max_block)
        if repair:
            edits += loop_edits(path, self.max_block, self.max_repeats)
        unique = list(dict.fromkeys(e for e in edits if e != path))
        self.rng.shuffle(unique)  # seeded tie-breaking between equally short edits
        return unique

    def _best(self, paths: list[LayerPath]) -> LayerPath | None:
        valid = [p for p in paths if self.cache.get(p) is True]
        if self.phase == "shorten":
            valid = [p for p in valid if len(p) < len(self.current)]
        return min(valid, key=len) if valid else None

    def _tell(self, paths: list[LayerPath]) -> None:
        pass


class InfluenceSearch(_Search):
    """Programs proposed by one input's layer influence, then shortened greedily.

    Round 1 scores the full program and ``candidates`` (made from the full
    program's run on this input: ``polar_core.study.suggest.candidate_programs``).
    Then, from the shortest valid program so far, each round tries dropping one
    more of its layers, the ``width`` least influential first (``order``: the
    layers, least influential first), and keeps the shortest valid result;
    it stops when none is valid or the budget is spent. Budget = programs scored.
    """

    method = "influence"

    def __init__(self, num_layers: int, *, candidates: Sequence[Program] = (), order: Sequence[int] = (),
                 width: int = 6, budget: int = 64, seed: int = 0,
                 cache: MutableMapping[LayerPath, bool] | None = None):
        super().__init__(num_layers, budget, seed, cache)
        if width < 1:
            raise SearchError(f"width must be >= 1, got {width}")
        self.candidates = [tuple(p.path) for p in candidates]
        self.order = [int(layer) for layer in order]
        self.width = width
        self.current: LayerPath | None = None  # the program the last round shortened (None: none yet)

    def _ask(self) -> list[LayerPath]:
        while True:
            tries = self._next_round()
            if tries is None:
                return []
            self.simulations += 1
            room = max(self.budget - self.programs_scored, 0)
            missing = [p for p in dict.fromkeys(tries) if self._look(p) is None][:room]
            if missing:
                return missing
            if room == 0 or not tries:
                return []
            # Every program of this round was scored already (a shared cache): go on to the next.

    def _next_round(self) -> list[LayerPath] | None:
        """The programs of the next round, or None when the search is over."""
        if self.simulations == 0:
            return [self.full, *self.candidates]
        best = self._shortest_valid()
        if best is None or (self.current is not None and len(best) >= len(self.current)):
            return None  # nothing valid, or the last round found nothing shorter
        self.current = best
        return self._drops(best)

    def _shortest_valid(self) -> LayerPath | None:
        valid = [p for p in self.seen if self.cache.get(p) is True]
        return min(valid, key=lambda p: (len(p), p)) if valid else None

    def _drops(self, path: LayerPath) -> list[LayerPath]:
        """`path` without one of its layers, the `width` least influential first."""
        quiet = [layer for layer in self.order if layer in path][: self.width]
        return [tuple(step for step in path if step != layer) for layer in quiet if len(path) > 1]

    def _tell(self, paths: list[LayerPath]) -> None:
        pass


# ---------------------------------------------------------------- drivers


def run_search(search: _Search, scorer: Scorer) -> SearchResult:
    """Drive one ask/tell search to the end with a scorer."""
    while True:
        programs = search.ask()
        if not programs:
            return search.result()
        search.tell(programs, scorer(programs))


def run_searches(
    searches: Sequence[_Search],
    score_jobs: Callable[[list[tuple[int, list[Program]]]], list[list[bool]]],
    on_round: Callable[[int, int], None] | None = None,
) -> list[SearchResult]:
    """Drive many searches in lock step; each round's requests are scored in one call.

    Args:
        score_jobs: receives [(search index, programs)] and returns verdicts per job.
        on_round: called with (searches finished, programs scored this round).
    """
    while True:
        jobs = []
        for i, search in enumerate(searches):
            if not search.done:
                programs = search.ask()
                if programs:
                    jobs.append((i, programs))
        if not jobs:
            return [s.result() for s in searches]
        verdicts = score_jobs(jobs)
        if len(verdicts) != len(jobs):
            raise SearchError(f"score_jobs returned {len(verdicts)} results for {len(jobs)} jobs")
        for (i, programs), valid in zip(jobs, verdicts):
            searches[i].tell(programs, valid)
        if on_round is not None:
            on_round(sum(s.done for s in searches), sum(len(p) for _, p in jobs))


def mcts_search(scorer: Scorer, num_layers: int, **kwargs) -> SearchResult:
    """MCTS for one input (keyword arguments as ``MCTS``)."""
    return run_search(MCTS(num_layers, **kwargs), scorer)


def greedy_search(scorer: Scorer, num_layers: int, **kwargs) -> SearchResult:
    """Greedy single-edit search for one input (keyword arguments as ``GreedySearch``)."""
    return run_search(GreedySearch(num_layers, **kwargs), scorer)


SEARCHES = {"mcts": MCTS, "greedy": GreedySearch, "influence": InfluenceSearch}


def make_search(method: str, num_layers: int, **kwargs) -> _Search:
    """A search by name ("mcts", "greedy" or "influence")."""
    if method not in SEARCHES:
        raise SearchError(f"unknown search method {method!r}; known: {', '.join(SEARCHES)}")
    return SEARCHES[method](num_layers, **kwargs)
