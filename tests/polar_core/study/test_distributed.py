"""Search and evaluation on a local Ray with 2 CPU workers equal the single-process results,
also when a worker dies mid-run (its chunk runs again elsewhere)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import ray
from tiny import rigged_router, tiny_lm_with_chars

from polar_core.study import distributed, tasks
from polar_core.study.evaluate import run_evaluation
from polar_core.study.find import search_task_items, summarize
from polar_core.study.router import RouterConfig
from polar_core.study.supervision import SupervisionSample, save_supervision
from polar_core.study.tables import report_markdown

pytestmark = pytest.mark.slow
SEARCH = dict(methods=("mcts",), budget=6, seed=3, recheck_invalid=2)


ITEMS = [it for family in ("capitals", "antonyms", "add_1digit") for it in tasks.sample_items(family, 2, "train")]


@pytest.fixture(scope="module")
def pool():
    """A local Ray with 2 CPU workers, each holding the tiny model (started by the pool, stopped after the module)."""
    with distributed.WorkerPool(distributed.RaySettings(workers=2, model=tiny_lm_with_chars)) as workers:
        yield workers


@pytest.fixture(scope="module")
def lm():
    return tiny_lm_with_chars()


@pytest.fixture(scope="module")
def alone(lm):
    """The single-process search of ITEMS."""
    return search_task_items(lm, ITEMS, **SEARCH)


def _supervision_bytes(records, items, path) -> bytes:
    by_id = {it.id: it for it in items}
    samples = [SupervisionSample(by_id[r.item_id].question, by_id[r.item_id].answer, r.valid, r.invalid,
                                 1.0 if r.initial_right else 0.0) for r in records]
    return save_supervision(samples, path).read_bytes()


def test_search_on_ray_equals_one_process(pool, lm, alone, tmp_path):
    spread = pool.search_task_items(ITEMS, chunk=4, **SEARCH)
    assert [r.item_id for r in spread] == [it.id for it in ITEMS]
    ray_file = _supervision_bytes(spread, ITEMS, tmp_path / "ray.json")
    assert ray_file == _supervision_bytes(alone, ITEMS, tmp_path / "one.json")
    assert summarize(spread, lm.num_layers) == summarize(alone, lm.num_layers)


def test_evaluate_on_ray_equals_one_process(pool, lm):
    router = rigged_router(RouterConfig.for_model(lm))
    run = dict(per_family=1, k=2, calibration=8, progress=False)
    assert report_markdown(run_evaluation(lm, router, pool=pool, **run)) == report_markdown(
        run_evaluation(lm, router, **run))


def test_a_dead_workers_chunk_is_retried_and_nothing_is_lost(pool, lm, alone):
    victims, retried = list(pool._actors), pool.retried

    def kill_once(index, result):  # after the first chunk: kill every worker there was
        while victims:
            ray.kill(victims.pop())

    spread = pool.map("search_task_items", [((part,), SEARCH) for part in distributed.chunked(ITEMS, 2)], kill_once)
    assert pool.retried > retried
    records = [r for part in spread for r in part]
    assert [r.item_id for r in records] == [it.id for it in ITEMS]  # none lost, none twice
    assert summarize(records, lm.num_layers) == summarize(alone, lm.num_layers)


def test_ray_is_imported_only_when_asked_for():
    code = "import sys, polar_core.cli, polar_core.study.evaluate, app.handlers; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
