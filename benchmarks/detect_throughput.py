"""Detection throughput: makd's training loop against a bare torchvision loop on the same detector and data, the
aspect head's overhead, and how fast the bridge teacher labels box crops.

Both loops train the demo's tiny Faster R-CNN on the same canvases, dataset object (same augmentation), batch size
and initial weights. The bare loop is what a person writes from torchvision's tutorial: batches of (images,
targets) -> model(images, targets) -> sum of the loss dict -> backward -> SGD step. makd's loop adds what the
product needs: the epoch's seeded, aspect-ratio-grouped batch order, per-step seeding, the lr schedule, weighted
and logged loss terms, the finite-loss check. Validation and checkpoints are outside both.

Epochs of the four loops (makd and bare, with and without the aspect head) are interleaved round by round, so load
from other processes hits all alike, and each loop's best epoch counts (other processes only slow a loop down).
Labelling: the bridge teacher scores the crops of every training box through `label_split`, after a warm-up call
that loads its models (the aspect setting then trains on those rows). The last line is `ratio_vs_bare=<x> aspect_overhead=<y> crops_per_s=<z>`: x = the lower of
makd/bare over the two settings, y = makd's extra time per image with the aspect head, z = crops labelled per second.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning OpenMP threads when the CPU is shared

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _throughput_table import print_throughput_table  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from makd.config import builtin_config, load_config, resolve_path  # noqa: E402
from makd.detection.crops import box_crops  # noqa: E402
from makd.detection.data import build_detection_splits  # noqa: E402
from makd.detection.models import build_detector  # noqa: E402
from makd.detection.pipeline import collate  # noqa: E402
from makd.engine.trainer import Trainer  # noqa: E402
from makd.labels import label_split  # noqa: E402
from makd.questions import QuestionSet  # noqa: E402
from makd.teachers import build_teacher  # noqa: E402


class EpochItems(torch.utils.data.Dataset):
    """The task's dataset seen as a plain map-style dataset of one epoch (what the bare loop indexes)."""

    def __init__(self, dataset, epoch: int) -> None:
        self.dataset, self.epoch = dataset, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[(i, self.epoch)]


def makd_epoch(trainer: Trainer, epoch: int) -> float:
    trainer.state.step_in_epoch = 0
    start = time.perf_counter()
    trainer.run_epoch(epoch, None)
    return trainer.task.num_train_samples() / (time.perf_counter() - start)


def bare_epoch(trainer: Trainer, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int, alpha: float) -> float:
    items = EpochItems(trainer.task.dataset, epoch)
    start = time.perf_counter()
    loader = DataLoader(items, batch_size=trainer.config.train.batch_size, collate_fn=collate,
                        sampler=RandomSampler(items, generator=torch.Generator().manual_seed(epoch)))
    model.train()
    for images, targets in loader:
        losses = model(images, targets)
        loss = sum(alpha * v if k == "loss_aspect" else v for k, v in losses.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(items) / (time.perf_counter() - start)


class Setting:
    """One setting's two loops: makd's Trainer and the bare loop on a copy of its initial detector."""

    def __init__(self, overrides: list[str]) -> None:
        self.trainer = Trainer(load_config(base=builtin_config("demo_detection"), overrides=overrides))
        task = self.trainer.task
        self.alpha = task.aspect_weight
        train = task.splits["train"]
        self.model = build_detector(task.options, train.num_classes, len(task.questions or []), task.in_chans,
                                    task.input["mean"], task.input["std"])
        self.model.load_state_dict(task.model.state_dict())
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.trainer.config.optim.lr, momentum=0.9,
                                         weight_decay=1e-4)
        self.makd: list[float] = []
        self.bare: list[float] = []

    def round(self, epoch: int) -> None:
        self.makd.append(makd_epoch(self.trainer, epoch))
        self.bare.append(bare_epoch(self.trainer, self.model, self.optimizer, epoch, self.alpha))


def label_throughput(config_overrides: list[str], root: Path) -> tuple[float, int]:
    """Crops per second of the bridge teacher through label_split (its models loaded by a warm-up call first)."""
    config = load_config(base=builtin_config("demo_detection"), overrides=config_overrides)
    train = build_detection_splits(config)["train"]
    crops = box_crops(train, config.detection.crop_margin, config.detection.crop_min_side)
    questions = QuestionSet.load(resolve_path(config.questions))
    teacher = build_teacher(config.teacher)
    teacher.score([crops.image(0)], questions)  # load the image and text models outside the timing
    start = time.perf_counter()
    label_split(crops, teacher, questions, root / "bridge-labels", shard_size=256, progress=False)
    return len(crops) / (time.perf_counter() - start), len(crops)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="training canvases per epoch")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved epochs per loop and setting")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the demo: the fastest on "
                        "2 shared cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = [f"detection.root={root / 'canvases'}", f"detection.canvases={{train: {args.images}, val: 8, test: 8}}",
                  "train.progress=false", "train.tensorboard=false", f"out={root / 'run'}"]
        print(f"# detect_throughput: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {args.images} canvases/epoch, batch 8, {args.rounds} rounds, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        crops_per_s, n = label_throughput(common, root)
        print(f"bridge teacher on box crops: {n} crops, {crops_per_s:.1f} crops/s", flush=True)
        settings = {"CE only": Setting(common + ["loss.aspect_bce.weight=0"]),
                    "CE + aspects (MaKD)": Setting(common + [f"labels.path={root / 'bridge-labels'}"])}
        for epoch in range(args.rounds + 1):  # round 0 warms up (allocator, oneDNN)
            for setting in settings.values():
                setting.round(epoch)
    ratio, overhead = print_throughput_table(settings, decimals=1)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"ratio_vs_bare={ratio:.3f} aspect_overhead={overhead:.3f} crops_per_s={crops_per_s:.1f}")
    return 0 if np.isfinite(ratio) else 1


if __name__ == "__main__":
    sys.exit(main())
