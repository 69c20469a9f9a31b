"""Slurm job arrays through submitit: the one place makd submits jobs, for grid cells and label workers alike.

- One array per call: the jobs are submitted inside `executor.batch()`, so Slurm starts at most
  `array_parallelism` of them at once (`#SBATCH --array=0-<n-1>%<p>`). submitit's local cluster has no arrays: there
  makd itself keeps at most `array_parallelism` jobs running.
- Requeue: each job's callable is a `submitit.helpers.Checkpointable`. When Slurm signals the time limit or a
  preemption, submitit pickles the same call again and requeues the job (`max_requeues` times on time-outs;
  preemptions do not count); the call resumes — a run from its last checkpoint (`train.checkpoint_every`,
  `train.checkpoint_every_steps` decide how much is redone), a label worker at its missing shards.
- A job runs `nodes` x `tasks_per_node` processes (default: one per GPU); makd/launchers.py gives each its rank
  from srun's (or submitit's local) variables, so a training cell is one DDP run over all of them.
- Time limit: makd asks for `time_min` (default 240 min, in ExecutorConfig) rather than submitit's 5 minutes, and
  says so in the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import submitit

from makd.errors import MakdError
from makd.experiment.executors import Outcome, Work
from makd.experiment.grid import Executor

log = logging.getLogger("makd.experiment")

# makd's executor keys -> submitit's AutoExecutor parameters (generic, or slurm_-prefixed: Slurm only)
SUBMITIT_KEYS = {"time_min": "timeout_min", "cpus": "cpus_per_task", "gpus": "gpus_per_node", "mem_gb": "mem_gb",
                 "nodes": "nodes", "partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos",
                 "constraint": "slurm_constraint", "array_parallelism": "slurm_array_parallelism"}
POLL_S = {"slurm": 15.0}  # between looks at the jobs' states (sacct on Slurm); local processes: POLL_LOCAL_S
POLL_LOCAL_S = 0.25


class Requeueable(submitit.helpers.Checkpointable):
    """A unit of work submitit requeues on time-out or preemption: the inherited `checkpoint()` resubmits this same
    call, which resumes where the killed one stopped."""

    def __init__(self, work: Work, threads: int | None) -> None:
        self.work, self.threads = work, threads

    def __call__(self) -> list[dict[str, Any]]:
        # makd's messages (a resumed run, a labelled shard) into the job's log, as on a terminal
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("makd").setLevel(logging.INFO)
        return self.work(self.threads)


def tasks_per_node(executor: Executor) -> int:
    return executor.tasks_per_node or max(1, executor.gpus)


def parameters(executor: Executor) -> dict[str, Any]:
    """submitit parameters of one job (a job of an array)."""
    params = {submitit_key: getattr(executor, key) for key, submitit_key in SUBMITIT_KEYS.items()
              if getattr(executor, key) is not None}
    return {"name": "makd", "tasks_per_node": tasks_per_node(executor), **params}


def run_array(works: Sequence[Work], executor: Executor, workdir: Path) -> Iterator[Outcome]:
    """Submit `works` as one job array and yield each one's outcome as it finishes."""
    if not works:
        return
    folder = Path(executor.folder) if executor.folder else workdir / "submitit"
    try:
        pool = submitit.AutoExecutor(folder=str(folder), cluster=executor.cluster,
                                     slurm_max_num_timeout=executor.max_requeues,
                                     local_max_num_timeout=executor.max_requeues)
    except RuntimeError as exc:  # no cluster found
        raise MakdError(f"executor.cluster: {exc}") from None
    if pool.cluster != "slurm" and executor.nodes > 1:
        raise MakdError(f"executor.nodes: {executor.nodes} nodes need Slurm (the {pool.cluster} cluster is this machine)")
    pool.update_parameters(**parameters(executor))
    works = [work.quiet() for work in works]  # job logs, not terminals: no progress bars
    threads = executor.threads or executor.cpus
    at_once = executor.array_parallelism or len(works)
    log.info("slurm: %d job(s) as one array on the %s cluster, at most %d at once; time limit %d min a job "
             "(executor.time_min), requeued up to %d times when it is reached, and after each preemption; "
             "%d node(s) x %d process(es) a job; logs: %s", len(works), pool.cluster, min(at_once, len(works)),
             executor.time_min, executor.max_requeues, executor.nodes, tasks_per_node(executor), folder)
    if pool.cluster == "slurm":
        with pool.batch():  # one sbatch --array; Slurm enforces array_parallelism
            handles = [pool.submit(Requeueable(work, threads)) for work in works]
        yield from _collect(list(zip(works, handles)), [], pool, threads, folder)
    else:  # local processes: makd keeps the window
        yield from _collect([], list(works), pool, threads, folder, at_once)


def _collect(running: list[tuple[Work, Any]], waiting: list[Work], pool: Any, threads: int | None, folder: Path,
             at_once: int = 0) -> Iterator[Outcome]:
    """Yield each job's outcome as it ends, submitting waiting work while fewer than `at_once` jobs run."""
    poll = POLL_S.get(pool.cluster, POLL_LOCAL_S)
    while running or waiting:
        while waiting and len(running) < at_once:
            work = waiting.pop(0)
            running.append((work, pool.submit(Requeueable(work, threads))))
        for entry in list(running):
            work, handle = entry
            try:
                if not handle.done():
                    continue
                outcome: Outcome = (work, handle.result(), None)
            except Exception as exc:  # the job's own traceback is in submitit's log folder
                text = str(exc).strip()
                outcome = (work, None, f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''} (logs: {folder})")
            running.remove(entry)
            yield outcome
        if running:
            time.sleep(poll)
