"""The one training loop (CE, MaKD, controls): seeded, resumable at any step, validated, reported.

Every random draw is a function of (seed, epoch, step): the sampler and worker seeds per epoch, the
global RNG (augmentation without workers, dropout) per step. A run resumed from a mid-epoch checkpoint
replays the epoch's batch order and continues bit-for-bit where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from makd.atomic import write_json
from makd.config import Config, save_config, to_dict, resolve_path
from makd.data import build_splits, describe_splits
from makd.data.base import ImageSplit
from makd.data.transforms import InputSpec, SplitDataset, build_transform, channel_stats, input_spec
from makd.engine.checkpoint import export_student, load_state, save_state
from makd.engine.runlog import RunLog
from makd.errors import MakdError
from makd.evaluate import aspect_agreement, predict, topk_accuracy
from makd.labels import LabelStore
from makd.losses import Batch, WeightedLoss
from makd.models import Student, build_student
from makd.questions import QuestionSet

log = logging.getLogger("makd.train")


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MakdError(f"train.device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MakdError("train.device: cuda requested but no GPU is available")
    return device


@dataclass
class AspectTargets:
    questions: QuestionSet
    store: LabelStore
    logodds: torch.Tensor  # [N_train, Q], aligned with the train split's rows
    mass: torch.Tensor


def load_aspect_targets(config: Config, train: ImageSplit) -> AspectTargets:
    if not config.questions or not config.labels.path:
        raise MakdError("an aspect loss is on: set `questions` (question-set JSON) and `labels.path` (label store)")
    questions = QuestionSet.load(resolve_path(config.questions))
    store = LabelStore.open(config.labels.path)
    store.check_questions(questions, str(config.questions))
    if list(questions.classes) != train.class_names:
        raise MakdError(f"question set {config.questions} lists classes {list(questions.classes)[:4]}..., "
                        f"the dataset has {train.class_names[:4]}...")
    logodds, mass = store.lookup(train.sample_ids)
    logodds, mass = permute_targets(logodds, mass, train.targets, config.labels.permute, config.train.seed)
    return AspectTargets(questions, store, torch.from_numpy(logodds), torch.from_numpy(mass))


def permute_targets(logodds: np.ndarray, mass: np.ndarray, labels: np.ndarray, mode: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Controls: give each image another image's targets (any class, or the same class)."""
    if mode == "none":
        return logodds, mass
    rng = np.random.default_rng(derive_seed(seed, 0x5EED))
    order = np.arange(len(labels))
    groups = [order] if mode == "images" else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for group in groups:
        order[group] = rng.permutation(group)
    return logodds[order], mass[order]


def lr_at(config: Config, step: int, steps_per_epoch: int) -> float:
    """Learning rate as a pure function of the global step (nothing to checkpoint)."""
    sched, base = config.schedule, config.optim.lr
    epoch = step / steps_per_epoch
    warmup = sched.warmup_epochs
    if warmup and epoch < warmup:
        return base * (step + 1) / (warmup * steps_per_epoch)
    if sched.name == "constant":
        return base
    if sched.name == "step":
        return base * sched.gamma ** sum(epoch >= m for m in sched.milestones)
    total = config.train.epochs * steps_per_epoch - warmup * steps_per_epoch
    progress = (step - warmup * steps_per_epoch) / max(1.0, total)
    return sched.min_lr + 0.5 * (base - sched.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(config: Config, model: Student) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and norm scales
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=config.optim.lr, momentum=config.optim.momentum, nesterov=config.optim.nesterov)
    return torch.optim.AdamW(groups, lr=config.optim.lr)


# Settings that may differ when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = {"train.progress", "train.threads", "train.device", "train.tensorboard", "data.num_workers"}


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, ignoring RESUMABLE_CHANGES."""
    changed = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, dotted + ".")
        elif a != b and dotted not in RESUMABLE_CHANGES:
            changed.append(dotted)
    return changed


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps completed in the current epoch
    global_step: int = 0
    best_val_top1: float = -1.0
    best_epoch: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.run = Path(config.out)
        self.device = resolve_device(config.train.device)
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        self.loss = WeightedLoss(config.loss)
        self.splits = build_splits(config.data)
        train = self.splits["train"]
        self.spec: InputSpec = input_spec(train, config.data.image_size)
        self.aspects = load_aspect_targets(config, train) if self.loss.needs_aspects else None
        questions = self.aspects.questions if self.aspects else None
        torch.manual_seed(derive_seed(config.train.seed))  # model initialisation
        self.model = build_student(config.model, self.spec.in_chans, train.num_classes, len(questions or []),
                                   *channel_stats(train)).to(self.device)
        self.memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.optimizer = build_optimizer(config, self.model)
        self.steps_per_epoch = math.ceil(len(train) / config.train.batch_size)
        self.state = TrainState()
        self.dataset = SplitDataset(train, build_transform(self.spec, True, config.data.augment), self.spec)

    # -- artifacts -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run / "checkpoints" / "last.pt"

    def student_meta(self, epoch: int) -> dict[str, Any]:
        q = self.aspects.questions if self.aspects else None
        return {
            "model": self.config.model.model_dump(mode="json"),
            "input": self.spec.to_dict(),
            "classes": self.splits["train"].class_names,
            "questions": [{"id": x.id, "text": x.text} for x in q.questions] if q else [],
            "question_set_hash": q.hash if q else None,
            "epoch": epoch,
            "run": self.config.name,
            "config": to_dict(self.config),
        }

    def save_checkpoint(self) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "state": self.state.to_dict(),
                 "rng": {"torch": torch.get_rng_state()}, "config": to_dict(self.config)}
        save_state(self.checkpoint_path, state)

    def try_resume(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        ckpt = load_state(self.checkpoint_path)
        changed = config_changes(ckpt["config"], to_dict(self.config))
        if changed:
            raise MakdError(f"{self.checkpoint_path} was written with another {changed[0]}; "
                            f"use a new `out` folder, or pass --no-resume to start over")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["state"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        log.info("resumed %s at epoch %d step %d", self.run, self.state.epoch, self.state.step_in_epoch)
        return True

    # -- training --------------------------------------------------------------------------------
    def epoch_loader(self, epoch: int) -> DataLoader:
        cfg = self.config.train
        sampler = RandomSampler(self.dataset, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 1)))
        return DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=self.config.data.num_workers,
                          generator=torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 2)),
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, lr: float) -> tuple[dict[str, float], int]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        y = y.to(self.device, non_blocking=True)
        batch = Batch(labels=y)
        if self.aspects is not None:
            batch.aspect_logodds = self.aspects.logodds[rows].to(self.device)
            batch.aspect_mass = self.aspects.mass[rows].to(self.device)
        out = self.model(x)
        total, parts = self.loss(out, batch)
        if not torch.isfinite(total):
            raise MakdError(f"loss became {total.item()} at step {self.state.global_step}: lower optim.lr")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        correct = int((out.class_logits.argmax(1) == y).sum())
        return {"loss": total.item(), **{f"loss_{k}": v.item() for k, v in parts.items()}}, correct

    def run_epoch(self, epoch: int, bar: tqdm | None) -> dict[str, Any]:
        cfg = self.config.train
        self.model.train()
        it = iter(self.epoch_loader(epoch))
        for _ in range(self.state.step_in_epoch):  # mid-epoch resume: replay the order, skip trained batches
            next(it)
        sums = self.state.epoch_sums
        t0, seen = time.perf_counter(), 0
        lr = lr_at(self.config, max(0, self.state.global_step - 1), self.steps_per_epoch)
        for step in range(self.state.step_in_epoch, self.steps_per_epoch):
            torch.manual_seed(derive_seed(cfg.seed, epoch, step, 3))
            x, y, rows = next(it)
            lr = lr_at(self.config, self.state.global_step, self.steps_per_epoch)
            values, correct = self.train_step(x, y, rows, lr)
            n = len(y)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * n
            sums["correct"] = sums.get("correct", 0.0) + correct
            sums["count"] = sums.get("count", 0.0) + n
            seen += n
            self.state.step_in_epoch = step + 1
            self.state.global_step += 1
            if cfg.checkpoint_every_steps and self.state.global_step % cfg.checkpoint_every_steps == 0:
                self.save_checkpoint()
            if bar is not None:
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.3g}", refresh=False)
        elapsed = time.perf_counter() - t0
        count = sums.pop("count")
        row = {"epoch": epoch + 1, "step": self.state.global_step, "lr": lr,
               **{k: v / count for k, v in sums.items() if k != "correct"},
               "train_top1": 100.0 * sums["correct"] / count, "images_per_s": seen / elapsed if elapsed > 0 else float("nan")}
        self.state.epoch_sums = {}
        return row

    def validate(self) -> float:
        preds = predict(self.model, self.splits["val"], self.spec, self.config.train.eval_batch_size, self.device,
                        self.config.train.channels_last, self.config.data.num_workers)
        return topk_accuracy(preds.class_logits, preds.targets)

    def fit(self, resume: bool = True) -> dict[str, Any]:
        cfg = self.config.train
        self.run.mkdir(parents=True, exist_ok=True)
        if not (resume and self.try_resume()):
            save_config(self.config, self.run / "config.yaml")
            write_json(self.run / "splits.json", describe_splits(self.splits))
        runlog = RunLog(self.run, tensorboard=cfg.tensorboard)
        with tqdm(total=cfg.epochs, initial=self.state.epoch, desc=self.config.name, unit="ep", disable=not cfg.progress,
                  leave=False) as bar:
            for epoch in range(self.state.epoch, cfg.epochs):
                row = self.run_epoch(epoch, bar)
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    row["val_top1"] = self.validate()
                    if row["val_top1"] > self.state.best_val_top1:
                        self.state.best_val_top1, self.state.best_epoch = row["val_top1"], epoch + 1
                        export_student(self.run / "best.safetensors", self.model, self.student_meta(epoch + 1))
                    bar.set_postfix(val=f"{row['val_top1']:.1f}", best=f"{self.state.best_val_top1:.1f}",
                                    ips=f"{row['images_per_s']:.0f}")
                self.state.history.append(row)
                self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
                runlog.log_row(row, self.state.history)
                self.save_checkpoint()
                bar.update(1)
        runlog.close()
        export_student(self.run / "last.safetensors", self.model, self.student_meta(self.state.epoch))
        return self.finish()

    # -- final evaluation ------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        from makd.engine.checkpoint import load_student
        from makd.report.run import write_run_report

        test = self.splits["test"]
        results: dict[str, Any] = {"name": self.config.name, "seed": self.config.train.seed,
                                   "best_epoch": self.state.best_epoch, "val_top1_best": self.state.best_val_top1,
                                   "val_top1_last": self.state.history[-1].get("val_top1")}
        teacher_rows = self._teacher_rows_for(test)
        # When the last epoch is also the best one, the two files hold the same weights: evaluate once.
        for which in ("best",) if self.state.best_epoch == self.state.epoch else ("best", "last"):
            model, _ = load_student(self.run / f"{which}.safetensors")
            model = model.to(self.device).to(memory_format=self.memory_format)
            preds = predict(model, test, self.spec, self.config.train.eval_batch_size, self.device,
                            self.config.train.channels_last, self.config.data.num_workers)
            results[f"test_top1_{which}"] = topk_accuracy(preds.class_logits, preds.targets, 1)
            results[f"test_top5_{which}"] = topk_accuracy(preds.class_logits, preds.targets, 5)
            if preds.aspect_logits is not None and teacher_rows is not None:
                positions, logodds = teacher_rows
                agreement = aspect_agreement(preds.aspect_logits[positions], logodds)
                results[f"aspect_agreement_{which}"] = {**agreement.summary, "num_images": int(len(positions)),
                                                        "per_question_correlation": agreement.correlation.tolist()}
            if which == "best":
                np.save(self.run / "test_class_logits_best.npy", preds.class_logits)
        for key in [k for k in results if k.endswith("_best") and k.startswith(("test_", "aspect_"))]:
            results.setdefault(key.removesuffix("_best") + "_last", results[key])
        write_json(self.run / "results.json", results)
        write_run_report(self.run, self.config, results, self.state.history)
        log.info("%s: test top-1 %.2f (best-on-val epoch %d), %.2f (last)", self.config.name,
                 results["test_top1_best"], self.state.best_epoch, results["test_top1_last"])
        return results

    def _teacher_rows_for(self, split: ImageSplit) -> tuple[np.ndarray, np.ndarray] | None:
        """Teacher log-odds for the test samples the label store covers (a subset is enough for agreement)."""
        if self.aspects is None:
            return None
        positions, logodds, _ = self.aspects.store.available(split.sample_ids)
        return (positions, logodds) if len(positions) else None


def train(config: Config, resume: bool = True) -> dict[str, Any]:
    """Train one student as configured; returns the results also written to `<out>/results.json`."""
    return Trainer(config).fit(resume=resume)
