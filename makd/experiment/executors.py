"""Where work runs: `local` worker processes, or `slurm` job arrays through submitit (makd/experiment/slurm.py).

The work is a training job (a grid cell, or seeds of one cell trained as one model) or a label worker (`makd label
--executor`, and the label stores a grid's cells need). Both resume where they stopped — a run from its checkpoint,
a label store at its missing shards — so an executor only decides where, how many at a time, and on Slurm requeues
a job that reaches its time limit or is preempted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

from makd.config import Config, load_config, to_dict
from makd.engine import train
from makd.errors import MakdError
from makd.experiment.grid import Executor
from makd.labels.show import SampleSource
from makd.launchers import LOCAL_WORKER_VARIABLE, from_env
from makd.registry import Registry

log = logging.getLogger("makd.experiment")


class Work(Protocol):
    """A unit an executor runs: picklable (it may run in another process or on another machine), resumable."""

    @property
    def names(self) -> list[str]: ...

    def quiet(self) -> Work:
        """The same work without progress bars (a setting that changes nothing computed)."""
        ...

    def __call__(self, threads: int | None = None) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Job:
    """Training: a cell's config, or several seeds of one cell to train as one batched model."""

    configs: tuple[dict[str, Any], ...]

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.configs]

    def quiet(self) -> Job:
        return Job(tuple({**c, "train": {**c.get("train", {}), "progress": False}} for c in self.configs))

    def __call__(self, threads: int | None = None) -> list[dict[str, Any]]:
        return run_job(self, threads)


@dataclass(frozen=True)
class LabelWork:
    """One label worker: what `makd label` runs in one process, into the config's label store. Several workers
    (and the several processes of one Slurm job, one per GPU) share the store; the last to finish consolidates it."""

    config: dict[str, Any]
    worker: int
    workers: int
    samples: SampleSource | None = None  # default: the configured splits' images

    @property
    def names(self) -> list[str]:
        return [f"label worker {self.worker + 1}/{self.workers} of {self.config['labels']['path']}"]

    def quiet(self) -> LabelWork:
        return replace(self, config={**self.config, "train": {**self.config.get("train", {}), "progress": False}})

    def __call__(self, threads: int | None = None) -> list[dict[str, Any]]:
        from makd.labels import label_from_config, samples_to_label

        _set_threads(threads)
        job = from_env()  # this worker's processes: one per GPU of its Slurm job, or this process alone
        # Each process claims its share `rank/world` first, then any shard no live worker holds (makd/labels/leases.py):
        # the shards of a worker that died are finished by the others.
        store = label_from_config(load_config(base=self.config), rank=self.worker * job.world_size + job.rank,
                                  world_size=self.workers * job.world_size, samples=self.samples or samples_to_label)
        return [{"label_store": str(store.path), "missing_shards": len(store.missing_shards())}]


Outcome = tuple[Work, list[dict[str, Any]] | None, str | None]  # (work, results, error)
Run = Callable[[Sequence[Work], Executor, Path], Iterator[Outcome]]  # (work, settings, folder for job files)
EXECUTORS: Registry[Run] = Registry("executor", "executor.name", modules=("makd.experiment.executors",))


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_job(job: Job, threads: int | None = None) -> list[dict[str, Any]]:
    """Train the job's runs (in this process: under srun or submitit, one process of a DDP run) and return their
    results."""
    _set_threads(threads)
    configs = [load_config(base=c) for c in job.configs]
    if len(configs) > 1:
        from makd.engine.seed_batch import train_seeds

        return train_seeds(configs)
    return [train(configs[0])]


def label_workers(config: Config, workers: int, samples: SampleSource | None = None) -> list[LabelWork]:
    return [LabelWork(to_dict(config), i, workers, samples) for i in range(workers)]


def _take_local_rank(ranks: Any) -> None:
    """Pool process initializer: a distinct local rank per worker process, so each takes its own GPU."""
    os.environ[LOCAL_WORKER_VARIABLE] = str(ranks.get())


def _in_worker(work: Work, threads: int | None) -> list[dict[str, Any]]:
    return work(threads)


@EXECUTORS.register("local")
def run_local(works: Sequence[Work], executor: Executor, workdir: Path) -> Iterator[Outcome]:
    """`workers` processes with `threads` torch threads each, each on its own GPU when there are GPUs; one worker
    runs in this process (no start-up cost)."""
    threads = executor.threads or max(1, (os.cpu_count() or 1) // executor.workers)
    if not works:
        return
    if executor.workers == 1:
        for work in works:
            yield guarded(work, lambda: work(threads))
        return
    works = [work.quiet() for work in works]  # the caller's bar only: workers' bars would overwrite each other
    processes = min(executor.workers, len(works))
    context = get_context("spawn")  # a forked torch with live OpenMP threads can deadlock
    ranks = context.Queue()
    for rank in range(processes):
        ranks.put(rank)
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_take_local_rank, initargs=(ranks,)) as pool:
        futures: dict[Future, Work] = {pool.submit(_in_worker, work, threads): work for work in works}
        for future in as_completed(futures):
            yield guarded(futures[future], future.result)


def guarded(work: Work, compute: Callable[[], list[dict[str, Any]]]) -> Outcome:
    """Work that fails with a user error is reported and the caller goes on with the rest."""
    try:
        return work, compute(), None
    except MakdError as exc:
        return work, None, str(exc)


@EXECUTORS.register("slurm")
def run_slurm(works: Sequence[Work], executor: Executor, workdir: Path) -> Iterator[Outcome]:
    """One Slurm job array through submitit (`cluster: local` runs the jobs as local processes: tests, laptops);
    see makd/experiment/slurm.py."""
    try:
        from makd.experiment.slurm import run_array
    except ImportError as exc:
        if "submitit" not in str(exc):
            raise
        raise MakdError("executor.name=slurm needs submitit: pip install submitit") from None
    yield from run_array(works, executor, workdir)


def job_configs(configs: Sequence[Config]) -> Job:
    return Job(tuple(to_dict(c) for c in configs))
