"""Search and evaluation spread over many processes and machines, on Ray.

Each worker is a Ray actor that loads the model once on its own device (one
GPU each when the model runs on CUDA, one CPU otherwise: Ray's resources
decide where it goes). Work is cut into chunks in a fixed order (task items
for a search, generation batches for an evaluation); chunks go to idle
workers; results are put back in chunk order, so the merged output does not
depend on which worker finished first. A worker that dies has its chunk
given to another one (a fresh actor replaces it): nothing is lost, nothing
is counted twice.

This module imports Ray; nothing else in the project does, and the CLI
imports this module only when `--ray` is given.

On a cluster: start Ray on every machine (`ray start --head` on one,
`ray start --address HEAD:6379` on the others), install this project on
each, then `python -m polar_core search ... --ray HEAD:6379 --workers N`.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError

from polar_core.engine.models import LoadedModel, load_model
from polar_core.study import evaluate, find

# What a worker may be asked to run: name -> function(lm, *args, **kwargs).
TASKS: dict[str, Callable[..., Any]] = {
    "answer_texts": evaluate.answer_texts,
    "search_task_items": find.search_task_items,
}
MAX_RETRIES = 3  # per chunk: a chunk that kills this many workers is a bug, not bad luck


class RayWorkError(RuntimeError):
    """A chunk could not be finished on any worker."""


@dataclass(frozen=True)
class RaySettings:
    """Where the workers run and what they load.

    Args:
        address: a running cluster ("HOST:PORT" or "auto"), or None to start a
            local Ray for this run (stopped at the end).
        workers: actors to start, each holding one loaded model.
        model: a model spec for `load_model`, or a function returning a
            LoadedModel (tests build tiny models this way).
        device, dtype: as in `load_model`; device "cuda" gives each worker a GPU.
        threads: torch threads per worker (default: 1, so workers do not fight
            over the cores of one machine).
    """

    address: str | None = None
    workers: int = 2
    model: str | Callable[[], LoadedModel] = "smollm2-135m-instruct"
    device: str | None = None
    dtype: str | None = None
    threads: int = 1

    def __post_init__(self):
        if not isinstance(self.workers, int) or not 1 <= self.workers <= 1024:
            raise ValueError(f"workers must be 1..1024, got {self.workers!r}")


def init_ray(address: str | None = None, **kwargs) -> None:
    """Connect to a Ray cluster at `address`, or start a local one (None)."""
    # Locally, workers import the same code as this process (the checkout, not an installed copy).
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env=env, **kwargs)


@ray.remote
class _ModelWorker:
    """One loaded model; runs named tasks on chunks."""

    def __init__(self, model, device, dtype, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.lm = model() if callable(model) else load_model(model, device=device, dtype=dtype)

    def run(self, task: str, args: tuple, kwargs: dict):
        return TASKS[task](self.lm, *args, **kwargs)


@dataclass
class WorkerPool:
    """Ray actors that each hold one loaded model (see the module docstring)."""

    settings: RaySettings
    retried: int = 0  # chunks run again after their worker died
    _actors: list = field(default_factory=list)
    _started_ray: bool = False

    def __enter__(self) -> WorkerPool:
        if not ray.is_initialized():
            init_ray(self.settings.address)
            self._started_ray = True
        self._actors = [self._new_actor() for _ in range(self.settings.workers)]
        return self

    def __exit__(self, *exc) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._started_ray:
            ray.shutdown()

    def _new_actor(self):
        s = self.settings
        gpus = 1 if (s.device or "").startswith("cuda") else 0
        return _ModelWorker.options(num_cpus=0 if gpus else 1, num_gpus=gpus).remote(
            s.model, s.device, s.dtype, s.threads)

    def map(self, task: str, chunks: Sequence[tuple[tuple, dict]],
            on_result: Callable[[int, Any], None] | None = None) -> list:
        """Run `task` on every (args, kwargs) chunk; results in chunk order.

        Chunks go to idle workers as they free up. When a worker dies, a new
        actor takes its place and the chunk runs again there (up to
        MAX_RETRIES times). `on_result(index, result)` is called as each
        chunk finishes, in completion order (for progress bars).
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        results: dict[int, Any] = {}
        tries = [0] * len(chunks)
        waiting = list(range(len(chunks)))[::-1]  # a stack: pop() gives the lowest index
        running: dict[Any, tuple[int, Any]] = {}  # object ref -> (chunk index, actor)
        idle = list(self._actors)
        while waiting or running:
            while waiting and idle:
                index, actor = waiting.pop(), idle.pop()
                args, kwargs = chunks[index]
                running[actor.run.remote(task, args, kwargs)] = (index, actor)
            done, _ = ray.wait(list(running), num_returns=1)
            index, actor = running.pop(done[0])
            try:
                results[index] = ray.get(done[0])
            except RayActorError as exc:
                tries[index] += 1
                if tries[index] >= MAX_RETRIES:
                    raise RayWorkError(f"chunk {index} of {task} failed on {tries[index]} workers: {exc}") from exc
                self.retried += 1
                self._actors.remove(actor)
                actor = self._new_actor()
                self._actors.append(actor)
                waiting.append(index)
            else:
                if on_result is not None:
                    on_result(index, results[index])
            idle.append(actor)
        return [results[i] for i in range(len(chunks))]

    def search_task_items(self, items: Sequence, *, chunk: int = 16,
                          progress: Callable[[int, int], None] | None = None,
                          **search_kwargs) -> list[find.ItemRecord]:
        """`find.search_task_items` over chunks of items on the workers; records in item order.

        Each item's search is independent of the others (its own seed-derived
        choices), so the records equal one process's (up to the float rounding
        of different batch compositions, as between batch sizes). Chunks of a
        multiple of the search's lock-step group (8 on CPU) keep even the
        batches of the search rounds the same.
        """
        parts = chunked(list(items), chunk)
        done = 0

        def on_result(index: int, records) -> None:
            nonlocal done
            done += len(records)
            if progress is not None:
                progress(done, len(items))

        results = self.map("search_task_items", [((part,), search_kwargs) for part in parts], on_result)
        return [record for records in results for record in records]


def chunked(items: Sequence, size: int) -> list[list]:
    """Consecutive chunks of `size` (the last may be shorter), in order."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
