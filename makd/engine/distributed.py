"""torchrun DDP: process group set-up from torchrun's environment, and the few collectives the loop needs.

One process per device. gloo on the CPU (tests), NCCL on GPUs. `train.batch_size` is the global batch of one
optimizer step, so a config means the same training on any number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from makd.errors import MakdError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

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


def from_env() -> Dist:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (a plain run is rank 0 of 1)."""
    try:
        return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise MakdError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None


def init(info: Dist, device: torch.device) -> torch.device:
    """Join the process group (gloo on the CPU, NCCL on GPUs); returns this process's device."""
    if not info.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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


def broadcast_object(info: Dist, value: object) -> object:
    """Rank 0's `value` on every process (e.g. a metric that only rank 0 computed)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
