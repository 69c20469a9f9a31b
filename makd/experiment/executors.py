"""Where the cells of an experiment run: `local` worker processes, or `slurm` jobs through submitit.

Every cell is an ordinary training run (`makd.engine.train`) into its own folder, so an executor only decides
where and how many at a time; a killed cell resumes from its checkpoint when the grid runs again.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from makd.config import Config, load_config, save_config, to_dict
from makd.engine import train
from makd.errors import MakdError
from makd.experiment.grid import Executor
from makd.registry import Registry

log = logging.getLogger("makd.experiment")


@dataclass(frozen=True)
class Job:
    """One unit of work: a cell's config, or several seeds of one cell to train as one batched model."""

    configs: tuple[dict[str, Any], ...]

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.configs]


Outcome = tuple[Job, list[dict[str, Any]] | None, str | None]  # (job, results, error)
Run = Callable[[Sequence[Job], Executor, Path], Iterator[Outcome]]  # (jobs, settings, work folder)
EXECUTORS: Registry[Run] = Registry("executor", "executor.name", modules=("makd.experiment.executors",))


def run_job(job: Job, threads: int | None = None) -> list[dict[str, Any]]:
    """Train the job's runs (in this process) and return their results."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    configs = [load_config(base=c) for c in job.configs]
    if len(configs) > 1:
        from makd.engine.seed_batch import train_seeds

        return train_seeds(configs)
    return [train(configs[0])]


def _in_worker(job: Job, threads: int | None) -> list[dict[str, Any]]:
    return run_job(job, threads)


@EXECUTORS.register("local")
def run_local(jobs: Sequence[Job], executor: Executor, workdir: Path) -> Iterator[Outcome]:
    """`workers` processes with `threads` torch threads each; one worker runs in this process (no start-up cost)."""
    threads = executor.threads or max(1, (os.cpu_count() or 1) // executor.workers)
    if executor.workers == 1:
        for job in jobs:
            yield _guarded(job, lambda: run_job(job, threads))
        return
    jobs = [quiet(job) for job in jobs]  # the grid's bar only: workers' epoch bars would overwrite each other
    # spawn: a forked torch with live OpenMP threads can deadlock.
    with ProcessPoolExecutor(executor.workers, mp_context=get_context("spawn")) as pool:
        futures: dict[Future, Job] = {pool.submit(_in_worker, job, threads): job for job in jobs}
        for future in as_completed(futures):
            yield _guarded(futures[future], future.result)


def quiet(job: Job) -> Job:
    """The job without per-epoch progress bars (a setting that changes nothing a run computes)."""
    return Job(tuple({**c, "train": {**c.get("train", {}), "progress": False}} for c in job.configs))


def _guarded(job: Job, compute: Callable[[], list[dict[str, Any]]]) -> Outcome:
    """A cell that fails with a user error is reported and the grid goes on with the others."""
    try:
        return job, compute(), None
    except MakdError as exc:
        return job, None, str(exc)


def slurm_job(configs: list[dict[str, Any]], gpus: int) -> list[dict[str, Any]]:
    """What a Slurm job runs: the cell in this process, or under torchrun on the job's GPUs."""
    if gpus <= 1 or len(configs) > 1:
        return run_job(Job(tuple(configs)))
    config = load_config(base=configs[0])
    path = Path(config.out) / "cell.yaml"
    save_config(config, path)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "-m", "makd", "train",
                    "-c", str(path)], check=True)
    from makd.atomic import read_json

    return [read_json(Path(config.out) / "results.json", "results")]


SUBMITIT_KEYS = {"partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos",
                 "time_min": "timeout_min", "cpus": "cpus_per_task", "gpus": "gpus_per_node", "mem_gb": "mem_gb",
                 "constraint": "slurm_constraint", "array_parallelism": "slurm_array_parallelism"}


@EXECUTORS.register("slurm")
def run_slurm(jobs: Sequence[Job], executor: Executor, workdir: Path) -> Iterator[Outcome]:
    """One Slurm job per cell through submitit (`cluster: local` runs them as local processes, for tests and
    laptops; logs go to <out>/submitit/); extra executor keys map to submitit's: partition, account, qos, time_min, cpus, gpus, mem_gb,
    constraint, array_parallelism."""
    try:
        import submitit
    except ImportError:
        raise MakdError("executor.name=slurm needs submitit: pip install submitit") from None
    extra = dict(executor.model_extra or {})
    folder = Path(extra.pop("folder", workdir / "submitit"))
    cluster = extra.pop("cluster", None)
    unknown = sorted(set(extra) - set(SUBMITIT_KEYS))
    if unknown:
        raise MakdError(f"executor.{unknown[0]}: unknown option (choose from folder, cluster, {', '.join(SUBMITIT_KEYS)})")
    gpus = int(extra.get("gpus", 0))
    params = {SUBMITIT_KEYS[k]: v for k, v in extra.items()}
    pool = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    pool.update_parameters(name="makd", tasks_per_node=1, **params)
    submitted = [(job, pool.submit(slurm_job, list(job.configs), gpus)) for job in jobs]
    for job, handle in submitted:
        try:
            yield job, handle.result(), None
        except Exception as exc:  # the job's own traceback is in submitit's log folder
            yield job, None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''} " \
                             f"(logs: {folder})"


def job_configs(configs: Sequence[Config]) -> Job:
    return Job(tuple(to_dict(c) for c in configs))
