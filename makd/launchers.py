"""Which launcher started this process, and what that makes it: its rank among the processes of one run, how many
there are, its index on its node (which GPU it takes) and where rank 0 listens.

One process per device, whatever starts it (first match wins):
- torchrun, or anything that sets torch's RANK and WORLD_SIZE (LOCAL_RANK, MASTER_ADDR, MASTER_PORT beside them).
  They win over Slurm's, so `torchrun` started by `srun` once per node, inside a Slurm job, is one torchrun run;
- submitit's local executor (SUBMITIT_LOCAL_* as its JobEnvironment reads them): the Slurm path on one machine;
- srun: SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID; rank 0 runs on the first host of the step's node
  list. The step's task count, not SLURM_NTASKS: that one is the job's, and a batch script that runs makd without
  srun has it too (> 1 when the job asked for several tasks) although it is one process — waiting for the others
  would hang. Such a process runs alone, with a warning;
- makd's own local worker pool (MAKD_LOCAL_RANK): one process of one, placed on the worker's own device;
- anything else: rank 0 of 1.

This module reads the environment only; it never changes it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from makd.errors import MakdError

log = logging.getLogger("makd.launch")

LOCAL_WORKER_VARIABLE = "MAKD_LOCAL_RANK"  # set by makd's local worker pool for its own processes
PORTS = (15000, 30000)  # derived rendezvous ports: below Linux's ephemeral range (32768-60999)


@dataclass(frozen=True)
class Dist:
    """This process's place in a run of `world_size` processes (a plain process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index among this node's processes: which GPU the process takes
    master_addr: str | None = None  # where rank 0 listens; None: torch's env:// (MASTER_ADDR / MASTER_PORT)
    master_port: int | None = None
    launcher: str = "none"  # torchrun, srun, submitit-local, local-worker, none: for logs and errors

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def seed_key(self) -> tuple[int, ...]:
        """Appended to the parts of per-rank seeds; empty on rank 0, so a single process keeps its old seeds."""
        return (self.rank,) if self.rank else ()

    def describe(self) -> str:
        return f"process {self.rank} of {self.world_size} (local rank {self.local_rank}, launcher {self.launcher})"


def from_env(env: Mapping[str, str] | None = None) -> Dist:
    """This process's rank, world size and local rank from its launcher's variables (see the module docstring)."""
    env = os.environ if env is None else env
    if LOCAL_WORKER_VARIABLE in env:  # a worker of `executor: local` runs alone, whatever launched its parent
        return Dist(0, 1, _int(env, LOCAL_WORKER_VARIABLE), launcher="local-worker")
    if "RANK" in env and "WORLD_SIZE" in env:
        return _checked(Dist(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0),
                             launcher="torchrun"), "RANK", "WORLD_SIZE")
    if env.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
        return _checked(Dist(_int(env, "SUBMITIT_LOCAL_GLOBALID"), _int(env, "SUBMITIT_LOCAL_NTASKS", 1),
                             _int(env, "SUBMITIT_LOCAL_LOCALID", 0), "127.0.0.1",  # the local executor has one node
                             _port(env, env.get("SUBMITIT_LOCAL_JOB_ID", "")), launcher="submitit-local"),
                        "SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS")
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # a task of an srun job step
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        addr = env.get("MASTER_ADDR") or (first_host(nodes) if world > 1 and nodes else None)
        job = f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}"  # concurrent steps get other ports
        return _checked(Dist(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0), addr,
                             _port(env, job) if addr else None, launcher="srun"), "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
    tasks = env.get("SLURM_NTASKS", "1")
    if "SLURM_JOB_ID" in env and tasks.isdigit() and int(tasks) > 1:
        _warn_once(f"this Slurm job has {tasks} tasks (SLURM_NTASKS) but this process was not started by srun: it "
                   "runs alone; start it with `srun makd ...` to run one process per task")
    return Dist()


def processes_on_node(env: Mapping[str, str] | None = None) -> int:
    """How many of the run's processes share this node, from the launcher's variables: torchrun's LOCAL_WORLD_SIZE,
    srun's SLURM_NTASKS_PER_NODE ("4", or "4(x2),2" on uneven nodes: the first), submitit's local
    SUBMITIT_LOCAL_NTASKS; 1 otherwise."""
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SUBMITIT_LOCAL_NTASKS"):
        count = re.match(r"\d+", env.get(name, ""))
        if count:
            return max(1, int(count.group()))
    return 1


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value or "")
    except ValueError:
        raise MakdError(f"{name}={value!r}: expected a whole number (launchers set it: torchrun, srun, submitit)") from None


def _checked(info: Dist, rank: str, world: str) -> Dist:
    if not 0 <= info.rank < info.world_size:
        raise MakdError(f"{rank}={info.rank} is not a rank of {world}={info.world_size} processes")
    return info


def _port(env: Mapping[str, str], job: str) -> int:
    """MASTER_PORT when set, else a port every process of the job derives alike from the job's id."""
    if env.get("MASTER_PORT"):
        return _int(env, "MASTER_PORT")
    low, high = PORTS
    return low + zlib.crc32(job.encode()) % (high - low)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning("warning: %s", message)


def first_host(nodelist: str) -> str:
    return expand_hostlist(nodelist)[0]


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list, as `scontrol show hostnames` expands it: `gpu[01-03,07],cpu5` -> gpu01,
    gpu02, gpu03, gpu07, cpu5 (zero padding kept; several bracket groups in one name are crossed)."""
    hosts = [host for item in _top_level_items(text) for host in _expand(item, text)]
    if not hosts:
        raise MakdError(f"Slurm node list {text!r}: no host in it")
    return hosts


def _top_level_items(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise MakdError(f"Slurm node list {text!r}: unbalanced brackets")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise MakdError(f"Slurm node list {text!r}: unbalanced brackets")
    return [item.strip() for item in [*items, text[start:]] if item.strip()]


RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _expand(item: str, text: str) -> list[str]:
    group = re.search(r"\[([^\]]*)\]", item)
    if group is None:
        return [item]
    head, tail = item[:group.start()], item[group.end():]
    hosts = []
    for part in group.group(1).split(","):
        match = RANGE.match(part.strip())
        if match is None or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise MakdError(f"Slurm node list {text!r}: cannot read the range {part!r}")
        low, high = match.group(1), match.group(2) or match.group(1)
        hosts += [h for n in range(int(low), int(high) + 1) for h in _expand(f"{head}{n:0{len(low)}d}{tail}", text)]
    return hosts


def process_device(requested: str, local_rank: int, gpus: int, option: str = "device") -> str:
    """The device a process takes: `auto` is its own GPU when the machine has one, else the CPU; `cuda` is its own
    GPU; `cuda:<i>`, `cpu` and `mps` stay as written. Its own GPU is cuda:<local_rank modulo the GPUs it sees>:
    torchrun's 8 processes on 8 GPUs take one each, and a Slurm task that sees only its GPU (--gpus-per-task=1,
    local rank 3) takes cuda:0, the one it sees."""
    if requested == "auto":
        requested = "cuda" if gpus else "cpu"
    if requested.startswith("cuda") and not gpus:
        raise MakdError(f"{option}: {requested} requested but no CUDA device is available (use cpu)")
    if requested == "cuda":
        return f"cuda:{local_rank % gpus}"
    return requested


def device_for_process(requested: str, option: str = "device") -> str:
    """`process_device` for this process: its launcher's local rank, the GPUs torch sees."""
    import torch

    info = from_env()
    device = process_device(requested, info.local_rank, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                            option)
    if info.launcher != "none":  # under a launcher, say which device each process took (one line per process)
        log.info("%s: %s for %s", option, device, info.describe())
    return device
