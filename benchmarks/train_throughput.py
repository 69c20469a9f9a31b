"""Training throughput: makd's engine against a bare PyTorch loop (the limit), with and without the aspect head.

Both train the same student (the demo's ResNet-8, width 16, on 28 px Fashion-MNIST, batch 32, SGD) on the same
data, transform and batch size, from the same initial weights. The bare loop is what a person would write by
hand: DataLoader -> forward -> CE (+ 4 · BCE on the aspect head) -> backward -> SGD step, nothing else. makd's
loop adds what the product needs: per-step seeding, the lr schedule, the loss registry with per-term logging,
the finite-loss check, accuracy and sums for metrics.csv. Validation and checkpoints are outside both.

Epochs of the four loops (makd and bare, with and without aspects) are interleaved round by round, so that
load from other processes on this machine hits all alike, and each loop's best epoch is compared (as `timeit` takes the minimum: other
processes only ever slow a loop down). Absolute images/s are noise on a shared machine; the ratios measured
in one run are the result. The last line is `ratio_vs_bare=<x> aspect_overhead=<y>`:
x = the lower of makd/bare over the two settings, y = makd's extra time per image with the aspect head.
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
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from makd.config import load_config  # noqa: E402
from makd.data import build_splits  # noqa: E402
from makd.data.base import ImageSplit  # noqa: E402
from makd.data.transforms import channel_stats  # noqa: E402
from makd.engine.trainer import Trainer  # noqa: E402
from makd.labels import label_split  # noqa: E402
from makd.models import build_student  # noqa: E402
from makd.questions import QuestionSet  # noqa: E402
from makd.teachers.base import AspectScores  # noqa: E402

QUESTIONS = 40


class SyntheticTeacher:
    """Log-odds that depend on the image (pixel statistics), so the label store holds realistic rows."""

    name = "synthetic"
    batch_size = 256

    def describe(self) -> dict:
        return {"name": self.name}

    def score(self, images, questions) -> AspectScores:
        x = np.stack([np.asarray(img, dtype=np.float32).ravel()[: len(questions) * 8] for img in images]) / 255.0
        logodds = (x.reshape(len(images), len(questions), -1).mean(-1) * 6 - 2).astype(np.float32)
        return AspectScores(logodds, np.ones_like(logodds))


def make_labels(config, root: Path) -> list[str]:
    train = build_splits(config.data)["train"]
    questions = QuestionSet.model_validate({"classes": train.class_names, "questions": [
        {"id": f"q{i}", "text": f"Synthetic question {i}?"} for i in range(QUESTIONS)]})
    questions.save(root / "questions.json")
    label_split(ImageSplit.concat([train], "all"), SyntheticTeacher(), questions, root / "labels", shard_size=4096,
                progress=False)
    return [f"questions={root / 'questions.json'}", f"labels.path={root / 'labels'}"]


def makd_epoch(trainer: Trainer, epoch: int) -> float:
    trainer.state.step_in_epoch = 0
    start = time.perf_counter()
    trainer.run_epoch(epoch, None)
    return len(trainer.task.dataset) / (time.perf_counter() - start)


def bare_epoch(trainer: Trainer, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int, aspects: bool) -> float:
    """The hand-written loop over the same dataset object, batch size and model architecture."""
    cfg = trainer.config.train
    start = time.perf_counter()
    loader = DataLoader(trainer.task.dataset, batch_size=cfg.batch_size, num_workers=0,
                        sampler=RandomSampler(trainer.task.dataset, generator=torch.Generator().manual_seed(epoch)))
    targets = trainer.task.aspects.logodds if aspects else None
    model.train()
    for x, y, rows in loader:
        out = model(x)
        loss = F.cross_entropy(out.class_logits, y)
        if aspects:
            loss = loss + 4.0 * F.binary_cross_entropy_with_logits(out.aspect_logits, torch.sigmoid(targets[rows]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(trainer.task.dataset) / (time.perf_counter() - start)


class Setting:
    """One setting's two loops: makd's Trainer and the bare loop on a copy of its initial student."""

    def __init__(self, overrides: list[str], aspects: bool) -> None:
        self.aspects = aspects
        self.trainer = Trainer(load_config(overrides=overrides))
        train = self.trainer.task.splits["train"]
        self.model = build_student(self.trainer.config.model, train.channels, train.num_classes,
                                   QUESTIONS if aspects else 0, *channel_stats(train))
        self.model.load_state_dict(self.trainer.model.state_dict())
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.trainer.config.optim.lr, momentum=0.9,
                                         weight_decay=5e-4)
        self.makd: list[float] = []
        self.bare: list[float] = []

    def round(self, epoch: int) -> None:
        self.makd.append(makd_epoch(self.trainer, epoch))
        self.bare.append(bare_epoch(self.trainer, self.model, self.optimizer, epoch, self.aspects))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=320, help="training images (per class: images / 10)")
    parser.add_argument("--rounds", type=int, default=25, help="interleaved epochs per loop and setting")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = ["data.dataset=fashion_mnist", f"data.train_per_class={args.images // 10}", "data.val_per_class=1",
              "data.test_per_class=1", "model.name=resnet8", "model.width=16", "train.batch_size=32",
              "train.progress=false", "train.tensorboard=false", "optim.lr=0.05"]
    print(f"# train_throughput: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.images} images/epoch, batch 32, {args.rounds} rounds", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        labelled = make_labels(load_config(overrides=common), root)
        settings = {"CE only": Setting(common + ["loss.aspect_bce.weight=0", f"out={root / 'ce'}"], False),
                    "CE + aspects (MaKD)": Setting(common + labelled + [f"out={root / 'makd'}"], True)}
        for epoch in range(args.rounds + 1):  # all four loops in every round; round 0 warms up (allocator, oneDNN)
            for setting in settings.values():
                setting.round(epoch)
    ratio, overhead = print_throughput_table(settings, decimals=0)
    print(f"ratio_vs_bare={ratio:.3f} aspect_overhead={overhead:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
