"""Program search with rigged scorers: MCTS and greedy find planted programs,
shortest first, within budget, deterministically."""
from __future__ import annotations

import pytest

from polar_core.program import Program
from polar_core.study.find import ItemRecord, summarize
from polar_core.study.search import (
    MCTS,
    GreedySearch,
    SearchError,
    greedy_search,
    loop_edits,
    mcts_search,
    run_search,
    run_searches,
    skip_edits,
)

D = 8


def skips_layer_2(programs):
    return [2 not in p.path for p in programs]


def loops_layer_5(programs):
    return [p.path.count(5) >= 2 and len(p.path) <= D + 1 for p in programs]


class Counting:
    """A scorer that records every program it is asked about."""

    def __init__(self, rule):
        self.rule, self.calls, self.asked = rule, 0, []

    def __call__(self, programs):
        self.calls += 1
        self.asked += [p.path for p in programs]
        return self.rule(programs)


def _assert_shortest_first(result):
    lengths = [p.layer_calls for p in result.valid]
    assert lengths == sorted(lengths)


@pytest.mark.parametrize("search", [mcts_search, greedy_search])
def test_finds_a_planted_skip(search):
    result = search(skips_layer_2, D, budget=150, seed=0)
    assert result.full_valid is False
    assert result.valid and all(2 not in p.path for p in result.valid)
    assert all(2 in p.path for p in result.invalid)
    _assert_shortest_first(result)
    assert result.has_shorter and result.shortest.layer_calls < D


@pytest.mark.parametrize("search", [mcts_search, greedy_search])
def test_finds_a_planted_loop(search):
    result = search(loops_layer_5, D, budget=300, seed=0)
    assert result.valid, "no program that loops layer 5 was found"
    assert all(p.path.count(5) >= 2 for p in result.valid)
    _assert_shortest_first(result)


def test_greedy_shortens_a_valid_full_program():
    """Valid = keeps layers 0 and 7 and at least 4 steps: greedy ends at 4 steps."""
    rule = lambda ps: [0 in p.path and 7 in p.path and p.layer_calls >= 4 for p in ps]  # noqa: E731
    result = greedy_search(rule, D, budget=500, seed=1)
    assert result.full_valid is True
    assert result.shortest.layer_calls == 4
    _assert_shortest_first(result)


def test_mcts_prefers_short_valid_programs():
    """Every program is valid: the length penalty drives the search to skips."""
    result = mcts_search(lambda ps: [True] * len(ps), D, budget=100, seed=0)
    assert result.shortest.layer_calls <= D // 2


@pytest.mark.parametrize("cls,budget", [(MCTS, 37), (GreedySearch, 23)])
def test_budget_is_respected(cls, budget):
    scorer = Counting(skips_layer_2)
    result = run_search(cls(D, budget=budget, seed=0), scorer)
    assert result.programs_scored == len(scorer.asked) <= budget
    assert len(set(scorer.asked)) == len(scorer.asked)  # a program is scored once
    if cls is MCTS:
        assert result.simulations <= budget


@pytest.mark.parametrize("cls", [MCTS, GreedySearch])
def test_deterministic_given_a_seed(cls):
    runs = []
    for _ in range(2):
        scorer = Counting(loops_layer_5)
        result = run_search(cls(D, budget=120, seed=7), scorer)
        runs.append((scorer.asked, [p.path for p in result.valid], [p.path for p in result.invalid]))
    assert runs[0] == runs[1]


def test_lock_step_equals_alone():
    rules = [skips_layer_2, loops_layer_5, lambda ps: [p.layer_calls <= 6 for p in ps]]
    alone = [run_search(MCTS(D, budget=60, seed=3), r) for r in rules]
    searches = [MCTS(D, budget=60, seed=3) for _ in rules]
    together = run_searches(searches, lambda jobs: [rules[i](ps) for i, ps in jobs])
    for a, b in zip(alone, together):
        assert [p.path for p in a.valid] == [p.path for p in b.valid]
        assert a.programs_scored == b.programs_scored


def test_shared_cache_saves_scoring():
    cache = {}
    first = Counting(skips_layer_2)
    run_search(MCTS(D, budget=80, seed=0, cache=cache), first)
    again = Counting(skips_layer_2)
    result = run_search(MCTS(D, budget=80, seed=0, cache=cache), again)
    # Verdicts arrive at once from the cache (no wave delay), so the tree may
    # wander further; what is cached is never asked again.
    assert not set(again.asked) & set(first.asked)
    assert result.programs_scored == len(again.asked) < len(first.asked)
    assert result.valid


def test_edit_generators():
    full = tuple(range(4))
    assert (1, 2, 3) in skip_edits(full) and (0, 3) in skip_edits(full, 2)
    assert () not in skip_edits((0,))
    assert (0, 1, 1, 1, 2, 3) in loop_edits(full)
    assert (0, 1, 2, 1, 2, 3) in loop_edits(full, 2, 2)


def test_bad_settings_and_broken_scorers_raise():
    with pytest.raises(SearchError, match="budget"):
        MCTS(D, budget=0)
    with pytest.raises(SearchError, match="num_layers"):
        GreedySearch(0)
    with pytest.raises(SearchError, match="explore"):
        MCTS(D, explore=1.5)
    with pytest.raises(SearchError, match="verdicts for"):
        mcts_search(lambda ps: [True], D, budget=10)
    with pytest.raises(SearchError, match="booleans"):
        greedy_search(lambda ps: [1] * len(ps), D, budget=10)
    search = MCTS(D, budget=5)
    search.ask()
    with pytest.raises(SearchError, match="twice"):
        search.ask()
    with pytest.raises(SearchError, match="exactly"):
        search.tell([Program.full(D), Program.full(D)], [True, True])
    with pytest.raises(SearchError, match="not finished"):
        MCTS(D).result()


def test_summarize_counts_the_paper_statistics():
    full, short = Program.full(4), Program((0, 1, 3), 4)
    rec = lambda right, valid: ItemRecord("x", "f", right, "", valid, [], 1, 0, 0, 0)  # noqa: E731
    stats = summarize([rec(True, [short, full]), rec(True, [full]), rec(False, [short]), rec(False, [])], 4)
    assert stats["right_with_shorter_valid"] == 0.5
    assert stats["wrong_corrected_by_any"] == 0.5 and stats["wrong_corrected_by_shorter"] == 0.5
    assert stats["mean_shortest_valid_steps"] == pytest.approx((3 + 4 + 3) / 3, abs=1e-3)


def test_task_item_search_gives_the_same_records_in_any_grouping():
    """Searching items in lock-step groups of 1 or all at once finds the same
    programs, and progress reaches every search."""
    from tiny import tiny_lm_with_chars

    from polar_core.study.find import search_task_items
    from polar_core.study.tasks import sample_items

    lm = tiny_lm_with_chars()
    items = sample_items("capitals", 2, "test") + sample_items("add_1digit", 1, "test")
    seen, checked = [], []
    one_by_one = search_task_items(lm, items, budget=6, recheck_invalid=2, group=1,
                                   progress=lambda done, total: seen.append((done, total)),
                                   check_progress=lambda done, total: checked.append((done, total)))
    together = search_task_items(lm, items, budget=6, recheck_invalid=2, group=len(items))
    assert seen[-1] == (3, 3)
    assert checked and checked[-1][0] == checked[-1][1] > 0  # the decoding check shows progress too
    key = lambda r: (r.item_id, r.initial_answer, [p.path for p in r.valid], [p.path for p in r.invalid],  # noqa: E731
                     r.programs_scored)
    assert [key(r) for r in one_by_one] == [key(r) for r in together]
    assert all(r.programs_scored > 0 and r.invalid for r in together)


def test_cascade_and_margin_gated_checks_find_what_float32_and_full_decoding_find():
    """The fast path (bfloat16 pass, float32 rescoring; decoding only near-ties)
    keeps exactly the valid programs of the float32 search that decodes every one."""
    from tiny import tiny_lm_with_chars

    from polar_core.study.find import search_task_items
    from polar_core.study.scoring import CascadeStats, bfloat16_twin
    from polar_core.study.tasks import sample_items

    lm = tiny_lm_with_chars()
    items = sample_items("capitals", 2, "test") + sample_items("plurals", 2, "test")
    exact = search_task_items(lm, items, budget=8, recheck_invalid=0, decode_margin=float("inf"))
    stats = CascadeStats()
    fast = search_task_items(lm, items, budget=8, recheck_invalid=0, fast=bfloat16_twin(lm), cascade=stats,
                             decode_margin=0.5)
    assert [[p.path for p in r.valid] for r in fast] == [[p.path for p in r.valid] for r in exact]
    assert [r.programs_scored for r in fast] == [r.programs_scored for r in exact]
    assert stats.programs == sum(r.programs_scored for r in fast) and stats.rescored <= stats.programs
    assert all(r.tf_valid_decoded is not None for r in fast)


def test_influence_search_scores_its_candidates_then_drops_quiet_layers():
    """Round 1 is the full program and the candidates; then one quiet layer
    more per round from the shortest valid program, while that stays valid."""
    from polar_core.study.search import InfluenceSearch

    quiet = [6, 2, 4, 0, 1, 3, 5, 7]  # least influential first
    valid_without = {6, 2, 4}  # any program keeping layers 0, 1, 3, 5, 7 is valid
    scorer = Counting(lambda ps: [all(layer in p.path for layer in range(D) if layer not in valid_without)
                                  and len(p.path) == len(set(p.path)) for p in ps])
    candidates = [Program.skip(D, 6, 6), Program.skip(D, 1, 1), Program.loop(D, 3, 3, 2)]
    result = run_search(InfluenceSearch(D, candidates=candidates, order=quiet, width=2, budget=50), scorer)
    assert scorer.asked[:4] == [tuple(range(D)), *(p.path for p in candidates)]
    assert result.shortest.path == (0, 1, 3, 5, 7)  # 6 (a candidate), then 2, then 4 dropped
    assert result.full_valid is True
    assert all(p.layer_calls < D or p.is_full for p in result.valid)
    # Never asks a program twice, and stops once a round finds nothing shorter.
    assert len(scorer.asked) == len(set(scorer.asked)) == result.programs_scored


def test_influence_search_respects_its_budget_and_a_shared_cache():
    from polar_core.study.search import InfluenceSearch

    candidates = [Program.skip(D, layer, layer) for layer in range(D)]
    scorer = Counting(lambda ps: [True] * len(ps))
    result = run_search(InfluenceSearch(D, candidates=candidates, order=list(range(D)), budget=5), scorer)
    assert result.programs_scored == len(scorer.asked) == 5
    cache = {p.path: False for p in candidates}
    again = Counting(lambda ps: [False] * len(ps))
    result = run_search(InfluenceSearch(D, candidates=candidates, order=list(range(D)), cache=cache), again)
    assert again.asked == [tuple(range(D))] and result.valid == []  # the cached verdicts cost nothing
    with pytest.raises(SearchError):
        InfluenceSearch(D, width=0)


def test_influence_method_searches_task_items_on_a_tiny_model():
    """search_task_items with the influence method: the candidates come from
    each item's own run, every kept program is verified by decoding."""
    from tiny import tiny_lm_with_chars

    from polar_core.study.find import search_task_items
    from polar_core.study.suggest import influence_plans
    from polar_core.study.tasks import sample_items

    lm = tiny_lm_with_chars()
    items = sample_items("capitals", 2, "test") + sample_items("plurals", 1, "test")
    records = search_task_items(lm, items, methods=("influence",), budget=12, decode_margin=float("inf"))
    assert [r.item_id for r in records] == [it.id for it in items]
    assert all(0 < r.programs_scored <= 12 and r.seen_by["influence"] for r in records)
    assert all(r.tf_valid_rejected == 0 or r.tf_valid_decoded for r in records)
    ids = lm.tokenizer("a b c d e f")["input_ids"]
    (cands, order), = influence_plans(lm, [ids])
    assert sorted(order) == list(range(lm.num_layers)) and cands and not any(p.is_full for p in cands)
