"""DDP: the process group of a run started by torchrun, srun or submitit (makd/launchers.py says which process
is which), and the few collectives the loop needs.

One process per device. gloo on the CPU (tests), NCCL on GPUs. `train.batch_size` is the global batch of one
optimizer step, so a config means the same training on any number of processes.
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from makd.launchers import Dist, from_env, process_device

__all__ = ["Dist", "from_env", "init", "barrier", "sum_across", "shutdown", "gather_objects", "broadcast_buffers"]

DEFAULT_TIMEOUT_MIN = 60.0
log = logging.getLogger("makd.train")


def init(info: Dist, device: torch.device, timeout_min: float = DEFAULT_TIMEOUT_MIN) -> torch.device:
    """This process's device (a GPU: its own, see `process_device`) and, with several processes, the process group
    (gloo on the CPU, NCCL on GPUs) with an explicit timeout: how long a rank may wait in a collective for the
    others (e.g. while rank 0 alone writes a checkpoint or evaluates) before the run is aborted."""
    if device.type == "cuda":
        # DDP needs one device per process: an explicit cuda:<i> is kept only by a process that runs alone.
        requested = "cuda" if info.enabled or device.index is None else str(device)
        device = torch.device(process_device(requested, info.local_rank, torch.cuda.device_count(), "train.device"))
        torch.cuda.set_device(device)
    if not info.enabled or dist.is_initialized():
        return device
    where = {}
    if info.master_addr:  # srun, submitit: rank 0's host and a port derived from the job id (torchrun: env://)
        host = f"[{info.master_addr}]" if ":" in info.master_addr else info.master_addr
        where = {"init_method": f"tcp://{host}:{info.master_port}"}
    backend = "nccl" if device.type == "cuda" else "gloo"
    log.debug("DDP: %s on %s, %s, collectives time out after %g min", info.describe(), device, backend, timeout_min)
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(minutes=timeout_min), **where)
    return device


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def sum_across(info: Dist, values: list[float]) -> list[float]:
    """Element-wise sum over all processes (float64 on the CPU: exact for counts)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def shutdown(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


# -- collectives of distributed evaluation (added after the launcher's part above) --------------------------------
def gather_objects(info: Dist, value: object) -> list[object]:
    """Every process's `value` (picklable: arrays, detections), on every process, in rank order. The processes are
    one job's own, so unpickling what they send is as safe as the job itself."""
    if not info.enabled:
        return [value]
    gathered: list[object] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered



def broadcast_buffers(info: Dist, module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every process. DDP copies them only at the start of a
    training forward, so after an epoch's last step each process holds statistics its own batch moved: validating
    then would score N different models, none of them the one rank 0 exports."""
    if info.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, 0)
