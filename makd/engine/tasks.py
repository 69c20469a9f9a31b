"""What the one training loop needs from a kind of model: a Task.

The loop (makd/engine/trainer.py) owns optimisation — steps, learning rate, gradient accumulation, autocast, DDP,
checkpoints, bit-exact resume, logging, the best-on-validation file. A task owns what differs between image
classification and object detection: the data and its order, the model, the loss of a batch, the validation
number that chooses the best checkpoint, the files a run leaves and its final report.

Tasks register by name (`task: classification` in the config); the registry imports their modules on first use,
so the engine never imports a task's package (detection sits above the engine and plugs in).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from makd.config import Config
from makd.engine.distributed import Dist, gather_objects
from makd.registry import Registry

if TYPE_CHECKING:
    from makd.evaluate import Shard

TASKS: Registry[type["Task"]] = Registry("task", "task", modules=("makd.engine.classification", "makd.detection.task"))


def autocast(config: Config, device: torch.device) -> torch.autocast:
    """The configured mixed precision (bf16 on GPUs; fp16 adds a grad scaler in the loop)."""
    amp = config.train.amp
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, enabled=amp != "off")


class Task:
    """Base class of a task; see the module docstring. `model` is what is optimised (and wrapped in DDP)."""

    name: ClassVar[str]
    selection_metric: ClassVar[str] = "val_top1"  # the `validate()` number a best checkpoint maximises
    model: torch.nn.Module

    def __init__(self, config: Config, device: torch.device, dist: Dist) -> None:
        self.config, self.device, self.dist = config, device, dist

    # -- training data --------------------------------------------------------------------------------
    def num_train_samples(self) -> int:
        raise NotImplementedError

    def batches(self, epoch: int, local_batch: int, start_step: int) -> Iterator[Any]:
        """This process's batches of `epoch` from step `start_step` on (a resumed epoch replays its order), each
        already on the device. Every random draw must be a function of (seed, epoch, step[, rank])."""
        raise NotImplementedError

    def split(self, batch: Any, parts: int) -> list[Any]:
        """`parts` micro-batches of a batch (gradient accumulation)."""
        raise NotImplementedError

    def batch_size(self, batch: Any) -> int:
        raise NotImplementedError

    # -- loss -----------------------------------------------------------------------------------------
    def loss_names(self) -> list[str]:
        """Names of the loss terms `loss` returns, in order (logged as loss_<name>)."""
        raise NotImplementedError

    def loss(self, net: torch.nn.Module, batch: Any, epoch: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(total, weighted terms by name, counters summed over the epoch — e.g. correct predictions)."""
        raise NotImplementedError

    def counter_names(self) -> list[str]:
        return []

    def train_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """Epoch metrics from the summed counters (e.g. train_top1)."""
        return {}

    # -- validation, files, report --------------------------------------------------------------------
    def validates(self) -> bool:
        """Whether there is a validation split; without one the last checkpoint is the one used."""
        return True

    def validate(self) -> dict[str, float]:
        """Validation numbers for the epoch's row; must hold `selection_metric`. Every DDP process calls it, evaluates
        its `evaluation_shard()` and returns the numbers of the whole split."""
        raise NotImplementedError

    def evaluation_shard(self) -> Shard:
        """This process's part of an evaluation, and the all-gather that puts the parts together."""
        from makd.evaluate import Shard  # evaluation is imported with the task, not with the loop

        return Shard(self.dist.rank, self.dist.world_size, partial(gather_objects, self.dist))

    def export(self, which: str, epoch: int) -> None:
        """Write the model file `<out>/<which>.safetensors` (which: best or last), what predict/evaluate/export read."""
        raise NotImplementedError

    def describe_data(self) -> dict[str, Any]:
        """What `splits.json` records: the exact samples of each split."""
        return {}

    # -- hooks for tasks with their own bookkeeping (several runs trained as one: makd/engine/seed_batch.py) ---
    def start(self, resumed: bool) -> None:
        """Called once the loop has (or has not) resumed, before the first epoch."""

    def end_epoch(self, row: dict[str, Any]) -> None:
        """Called with every epoch's row (after validation when there was one), before it is logged."""

    def end_training(self) -> None:
        """Called after the last epoch, before testing: release what only training needs (loader processes)."""

    def state_dict(self) -> dict[str, Any]:
        """Task state saved in the training checkpoint (plain values and tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (on resume)."""

    def finish(self, run: Path, state: Any) -> dict[str, Any]:
        """Evaluate the best and last files on the test split (every DDP process its shard); the main process writes
        results.json and report.md; every process returns the results."""
        raise NotImplementedError
