"""Several seeds of one classification run, trained as one stacked model by the one training loop.

Each member is an ordinary classification run — its own config (only the seed and the folder differ), data
order, augmentation draws, initialisation, batch-norm statistics, validation, best checkpoint, run folder and
report — and ends where a run of its own would have ended, within float tolerance (the grouped kernels sum in
another order; tests/test_seed_batch.py checks it). The members share the forward and backward passes of a
stacked network (makd/models/stacked.py), which is what makes a grid of small runs cheaper.

The loop's own run folder for the group holds only the stacked training checkpoint (so a killed group resumes);
each member's folder receives what a single run writes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from makd.atomic import write_json
from makd.config import Config, load_config, save_config, to_dict
from makd.engine.classification import ClassificationTask, ImageBatch
from makd.engine.distributed import Dist
from makd.engine.runlog import RunLog
from makd.engine.tasks import Task
from makd.engine.trainer import Trainer
from makd.errors import MakdError
from makd.evaluate import predict_members, topk_accuracy
from makd.losses import Batch
from makd.models import StudentOutput, load_student
from makd.models.stacked import stack_students

log = logging.getLogger("makd.train")
MEMBER_KEYS = ("train", "seeds")  # the only config keys in which members may differ (besides name and out)


@dataclass
class MemberState:
    """What the loop's TrainState holds for a single run, per member (what ClassificationTask.finish reads)."""

    epoch: int = 0
    best_metric: float = float("-inf")
    best_epoch: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StackedBatch:
    images: torch.Tensor  # [K, B, C, H, W]
    targets: list[Batch]

    def __len__(self) -> int:
        return self.images.shape[1]


class SeedBatchTask(Task):
    """The members' ClassificationTasks (data, targets, files) around one stacked student. Built by
    `train_seeds`, not from a config: it is not a registered task."""

    name: ClassVar[str] = "seed_batch"
    selection_metric: ClassVar[str] = "val_top1_mean"  # the group's number; each member keeps its own best

    def __init__(self, config: Config, device: torch.device, dist: Dist, members: Sequence[Config] = ()) -> None:
        super().__init__(config, device, dist)
        if dist.enabled:
            raise MakdError("seed batching trains on one process (run seeds as separate DDP runs instead)")
        self.tasks = [ClassificationTask(member, device, dist) for member in members]
        self.model = stack_students([t.model for t in self.tasks]).to(device)
        self.states = [MemberState() for _ in self.tasks]
        self.logs: list[RunLog] = []

    # -- training data --------------------------------------------------------------------------------
    def num_train_samples(self) -> int:
        return self.tasks[0].num_train_samples()

    def batches(self, epoch: int, local_batch: int, start_step: int) -> Iterator[StackedBatch]:
        # Each member draws its batch as its own run would (its seeds for order and augmentation), in turn.
        for parts in zip(*(t.batches(epoch, local_batch, start_step) for t in self.tasks)):
            yield StackedBatch(torch.stack([p.images for p in parts]), [p.targets for p in parts])

    def split(self, batch: StackedBatch, parts: int) -> list[StackedBatch]:
        if parts == 1:
            return [batch]
        pieces = [t.split(ImageBatch(batch.images[k], batch.targets[k]), parts) for k, t in enumerate(self.tasks)]
        return [StackedBatch(torch.stack([p[i].images for p in pieces]), [p[i].targets for p in pieces])
                for i in range(parts)]

    def batch_size(self, batch: StackedBatch) -> int:
        return len(batch)

    # -- loss: the sum of the members' losses (each member's gradient is its own run's) -----------------------
    def loss_names(self) -> list[str]:
        return [f"{name}@{k}" for k, t in enumerate(self.tasks) for name in t.loss_names()]

    def loss(self, net: torch.nn.Module, batch: StackedBatch, epoch: float):
        out = net(batch.images)
        total, parts, counters = 0.0, {}, {}
        for k, task in enumerate(self.tasks):
            batch.targets[k].epoch = epoch
            member = StudentOutput(out.class_logits[k], None if out.aspect_logits is None else out.aspect_logits[k])
            member_total, member_parts = task.weighted_loss(member, batch.targets[k])
            total = total + member_total
            parts.update({f"{name}@{k}": value for name, value in member_parts.items()})
            counters[f"correct@{k}"] = (member.class_logits.argmax(1) == batch.targets[k].labels).sum()
        return total, parts, counters

    def counter_names(self) -> list[str]:
        return [f"correct@{k}" for k in range(len(self.tasks))]

    def train_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {f"train_top1@{k}": 100.0 * sums[f"correct@{k}"] / count for k in range(len(self.tasks))}

    # -- validation and the members' bookkeeping ------------------------------------------------------
    def validate(self) -> dict[str, float]:
        first = self.tasks[0]
        cfg = first.config
        preds = predict_members(self.model, first.splits["val"], first.spec, cfg.train.eval_batch_size, self.device,
                                first.workers)  # the members share the split: one pass for all of them
        scores = [topk_accuracy(p.class_logits, p.targets) for p in preds]
        return {**{f"val_top1@{k}": s for k, s in enumerate(scores)}, "val_top1_mean": sum(scores) / len(scores)}

    def _member_view(self, k: int, task: ClassificationTask) -> ClassificationTask:
        """Member k's task with its model set to member k's weights (for validation, export, testing)."""
        task.model.load_state_dict(self.model.member_state(k))
        return task

    def start(self, resumed: bool) -> None:
        for task, state in zip(self.tasks, self.states):
            run = Path(task.config.out)
            if not resumed:
                run.mkdir(parents=True, exist_ok=True)
                save_config(task.config, run / "config.yaml")
                write_json(run / "splits.json", task.describe_data())
            self.logs.append(RunLog(run, tensorboard=task.config.train.tensorboard, wandb=None))

    def end_epoch(self, row: dict[str, Any]) -> None:
        shared = {k: v for k, v in row.items() if k in ("epoch", "step", "lr")}
        by_member: list[dict[str, Any]] = [{} for _ in self.tasks]
        for name, value in row.items():
            base, at, index = name.rpartition("@")
            if at and index.isdigit():
                by_member[int(index)][base] = value
        for k, (task, state, runlog) in enumerate(zip(self.tasks, self.states, self.logs)):
            terms = by_member[k]
            mine = {**shared, "loss": sum(v for name, v in terms.items() if name.startswith("loss_")), **terms,
                    "images_per_s": row.get("images_per_s", float("nan"))}  # every member saw the group's images
            if "val_top1" in mine and mine["val_top1"] > state.best_metric:
                state.best_metric, state.best_epoch = mine["val_top1"], row["epoch"]
                self._member_view(k, task).export("best", row["epoch"])
            state.epoch = row["epoch"]
            state.history.append(mine)
            runlog.log_row(mine, state.history)

    def validates(self) -> bool:
        return self.tasks[0].validates()

    def end_training(self) -> None:
        for task in self.tasks:
            task.end_training()

    def export(self, which: str, epoch: int) -> None:
        # Each member's best file is written when its own validation improves (end_epoch); without validation the
        # loop asks for the last one as the best.
        if which == "last" or not self.validates():
            for k, (task, state) in enumerate(zip(self.tasks, self.states)):
                self._member_view(k, task).export(which, epoch)
                if which == "best":
                    state.best_epoch = epoch

    def finish(self, run: Path, state: Any) -> dict[str, Any]:
        """Each member's report, from one stacked pass over the test split per checkpoint (best, last)."""
        for runlog in self.logs:
            runlog.close()
        first = self.tasks[0]
        predictions: dict[str, list] = {}
        for which in ("best", "last"):
            students = [load_student(Path(t.config.out) / f"{which}.safetensors")[0] for t in self.tasks]
            stack = stack_students(students, check=False).to(self.device)
            predictions[which] = predict_members(stack, first.splits["test"], first.spec, first.config.train.eval_batch_size,
                                                 self.device, first.workers)
        results = []
        for k, (task, member) in enumerate(zip(self.tasks, self.states)):
            member.seconds = state.seconds / len(self.tasks)
            results.append(self._member_view(k, task).finish(Path(task.config.out), member,
                                                             {w: p[k] for w, p in predictions.items()}))
        write_json(run / "results.json", {"members": results})
        return {"members": results}

    # -- checkpoint -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"members": [dict(s.__dict__) for s in self.states]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("members"):
            self.states = [MemberState(**s) for s in state["members"]]


def group_config(configs: Sequence[Config]) -> Config:
    """The loop's own config for a group: the first member's, with a folder beside the members' named after them."""
    first = configs[0]
    for other in configs[1:]:
        a, b = to_dict(first), to_dict(other)
        differing = sorted(k for k in a if a[k] != b[k] and k not in ("name", "out", *MEMBER_KEYS))
        train_a, train_b = dict(a["train"], seed=0), dict(b["train"], seed=0)
        if differing or train_a != train_b:
            raise MakdError(f"seed batch: {other.name} differs from {first.name} in more than the seed "
                            f"({(differing or ['train'])[0]})")
    if first.model.drop_rate or first.model.kwargs.get("drop_path_rate"):
        raise MakdError("seed batch: dropout draws differ from separate runs; train these seeds one by one")
    seeds = "-".join(str(c.train.seed) for c in configs)
    out = Path(first.out).parent / f"{first.name.rsplit('-s', 1)[0]}-seeds-{seeds}"
    return load_config(base=to_dict(first), overrides=[f"name={out.name}", f"out={out}"])


def train_seeds(configs: Sequence[Config], resume: bool = True) -> list[dict[str, Any]]:
    """Train runs that differ only in their seed as one stacked model; returns each run's results (also in its
    own folder, as a single run would leave them). A member already finished is not trained again."""
    configs = [c for c in configs if not (Path(c.out) / "results.json").is_file()]
    if not configs:
        return []
    if len(configs) == 1:
        from makd.engine import train

        return [train(configs[0], resume=resume)]
    group = group_config(configs)
    trainer = Trainer(group, task=lambda config, device, dist: SeedBatchTask(config, device, dist, members=configs))
    return trainer.fit(resume=resume)["members"]
