"""The one training loop (CE, MaKD, KD/DKD/LSKD and their sums, controls): seeded, resumable at any step,
validated, reported; single process or torchrun DDP, with autocast and gradient accumulation.

Every random draw is a function of (seed, epoch, step[, rank]): the sampler and worker seeds per epoch, the
global RNG (augmentation without workers, dropout) per step. A run resumed from a mid-epoch checkpoint
replays the epoch's batch order and continues bit-for-bit where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from makd.atomic import read_json, write_json
from makd.config import Config, load_config, resolve_path, save_config, to_dict
from makd.data import build_splits, describe_splits
from makd.data.base import ImageSplit
from makd.data.transforms import InputSpec, SplitDataset, build_transform, channel_stats, input_spec
from makd.engine import distributed
from makd.engine.checkpoint import load_newest_state, rng_states, save_state, set_rng_states
from makd.engine.runlog import RunLog
from makd.errors import MakdError
from makd.evaluate import evaluate_student, predict, topk_accuracy
from makd.labels import LabelStore
from makd.losses import Batch, WeightedLoss
from makd.models import Student, build_student
from makd.models.kd_teacher import KDTeacher, load_kd_teacher
from makd.models.student_file import export_student, load_student
from makd.questions import QuestionSet
from makd.report.run import write_run_report

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
    return AspectTargets(questions, store, _shared_tensor(logodds), _shared_tensor(mass))


def _shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over the label store's memory-mapped rows, without copying them: the targets are only ever
    indexed (which copies the batch), so torch's warning about a read-only buffer does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


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


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: torch is seeded per worker by the loader; seed NumPy and `random` from it too."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def split_batch(batch: Batch, k: int) -> list[Batch]:
    """The targets of k micro-batches (views, same order as `tensor.tensor_split(k)`)."""
    if k == 1:
        return [batch]
    fields = {name: (value.tensor_split(k) if isinstance(value, torch.Tensor) else [value] * k)
              for name, value in batch.__dict__.items()}
    return [Batch(**{name: parts[i] for name, parts in fields.items()}) for i in range(k)]


def build_optimizer(config: Config, model: Student) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and norm scales
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=config.optim.lr, momentum=config.optim.momentum, nesterov=config.optim.nesterov)
    return torch.optim.AdamW(groups, lr=config.optim.lr)


# Settings that may differ when a run is resumed: they do not change what is computed.
NOT_TRAINING = ("generate.", "select.")  # sections only the question stages read
RESUMABLE_CHANGES = {"train.progress", "train.threads", "train.device", "train.tensorboard", "data.num_workers",
                     "train.wandb", "train.wandb_project"}


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, ignoring RESUMABLE_CHANGES."""
    changed = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, dotted + ".")
        elif a != b and dotted not in RESUMABLE_CHANGES and not dotted.startswith(NOT_TRAINING):
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
        cfg = config.train
        self.run = Path(config.out)
        self.dist = distributed.from_env()
        self.device = distributed.init(self.dist, resolve_device(cfg.device))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.batch_size % (self.dist.world_size * cfg.accumulation_steps):
            raise MakdError(f"train.batch_size {cfg.batch_size} is not divisible by {self.dist.world_size} processes x "
                            f"train.accumulation_steps {cfg.accumulation_steps}")
        self.loss = WeightedLoss(config.loss)
        self.splits = build_splits(config.data)
        train = self.splits["train"]
        self.aspects = load_aspect_targets(config, train) if self.loss.needs_aspects else None
        questions = self.aspects.questions if self.aspects else None
        torch.manual_seed(derive_seed(cfg.seed))  # model initialisation
        self.model = build_student(config.model, train.channels, train.num_classes, len(questions or []),
                                   *channel_stats(train)).to(self.device)
        self.spec: InputSpec = input_spec(train, config.data.image_size, self.model.data_config)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.net = self._wrap_ddp(self.model)
        self.kd_teacher = self._kd_teacher(train)
        self.optimizer = build_optimizer(config, self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.local_batch = cfg.batch_size // self.dist.world_size
        self.steps_per_epoch = math.ceil(math.ceil(len(train) / self.dist.world_size) / self.local_batch)
        self.state = TrainState()
        self.dataset = SplitDataset(train, build_transform(self.spec, True, config.data.augment), self.spec)

    def _wrap_ddp(self, model: Student) -> torch.nn.Module:
        if not self.dist.enabled:
            return model
        if self.config.train.sync_bn:
            if self.device.type != "cuda":
                raise MakdError("train.sync_bn: synchronised batch norm needs GPUs (torch has no CPU kernel for it)")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def _kd_teacher(self, train: ImageSplit) -> KDTeacher | None:
        if not self.loss.needs_teacher:
            if self.config.kd_teacher.checkpoint or self.config.kd_teacher.timm:
                log.warning("kd_teacher is set but no loss term uses it (add loss.kd, loss.dkd or loss.lskd)")
            return None
        return load_kd_teacher(self.config.kd_teacher, train.class_names).to(self.device)

    @property
    def autocast(self) -> torch.autocast:
        amp = self.config.train.amp
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, enabled=amp != "off")

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
        """Every process calls this (the partial epoch sums are combined); the main one writes."""
        self.state.epoch_sums = self._global_sums(self.state.epoch_sums, partial=True)
        if not self.dist.main:
            return
        lr = lr_at(self.config, max(0, self.state.global_step - 1), self.steps_per_epoch)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "schedule": {"lr": lr, "note": "lr is a pure function of global_step"},
                 "state": self.state.to_dict(), "rng": rng_states(), "world_size": self.dist.world_size,
                 "config": to_dict(self.config)}
        save_state(self.checkpoint_path, state)

    def try_resume(self) -> bool:
        """Continue from the newest valid checkpoint in <out>/checkpoints/ (`makd train --resume auto`)."""
        ckpt = load_newest_state(self.checkpoint_path)
        if ckpt is None:
            return False
        changed = config_changes(to_dict(load_config(base=ckpt["config"])), to_dict(self.config))
        if changed:
            raise MakdError(f"{self.checkpoint_path} was written with another {changed[0]}; "
                            f"use a new `out` folder, or --resume never to start over")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        if not self.dist.main:
            self.state.epoch_sums = {}  # the saved sums are already the global ones: count them once
        set_rng_states(ckpt["rng"])
        log.info("resumed %s at epoch %d step %d", self.run, self.state.epoch, self.state.step_in_epoch)
        return True

    # -- training --------------------------------------------------------------------------------
    def epoch_loader(self, epoch: int) -> DataLoader:
        """This process's share of the epoch: the global order is a permutation seeded by (seed, epoch);
        process r takes every world_size-th sample, so one step's batches together form the global batch."""
        cfg, key = self.config.train, self.dist.seed_key
        sampler = DistributedSampler(self.dataset, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True,
                                     seed=derive_seed(cfg.seed, epoch, 1), drop_last=False)
        return DataLoader(self.dataset, batch_size=self.local_batch, sampler=sampler, num_workers=self.config.data.num_workers,
                          generator=torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 2, *key)),
                          worker_init_fn=seed_worker, pin_memory=self.device.type == "cuda", persistent_workers=False)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, lr: float) -> tuple[dict[str, float], int]:
        """One optimizer step on this process's share of the global batch, in `accumulation_steps` micro-batches."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        batch = self.targets(x, y.to(self.device, non_blocking=True), rows)
        self.optimizer.zero_grad(set_to_none=True)
        k = min(self.config.train.accumulation_steps, len(y))
        totals, correct = None, 0
        for i, (xs, part) in enumerate(zip(x.tensor_split(k), split_batch(batch, k))):
            # DDP averages gradients only on the last micro-batch; each micro-batch's loss counts by its size.
            with self.net.no_sync() if self.dist.enabled and i < k - 1 else contextlib.nullcontext():
                with self.autocast:
                    out = self.net(xs)
                    total, parts = self.loss(out, part)
                share = len(part.labels) / len(y)
                self.scaler.scale(total * share if k > 1 else total).backward()
            values = torch.stack([total.detach(), *(v.detach() for v in parts.values())]).float() * share
            totals = values if totals is None else totals + values
            correct += int((out.class_logits.argmax(1) == part.labels).sum())
        numbers = totals.tolist()  # one host sync for every logged value
        if not math.isfinite(numbers[0]):
            raise MakdError(f"loss became {numbers[0]} at step {self.state.global_step}: lower optim.lr")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return dict(zip(["loss", *(f"loss_{name}" for name in parts)], numbers)), correct

    def targets(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> Batch:
        """What the loss terms compare against: labels, the rows' aspect targets, the KD teacher's logits."""
        batch = Batch(labels=y, epoch=self.state.global_step / self.steps_per_epoch)
        if self.aspects is not None:
            batch.aspect_logodds = self.aspects.logodds[rows].to(self.device)
            batch.aspect_mass = self.aspects.mass[rows].to(self.device)
        if self.kd_teacher is not None:
            with self.autocast:
                batch.teacher_logits = self.kd_teacher(x).float()
        return batch

    def seed_step(self, seed: int) -> None:
        """Seed the generators this step draws from: what torch.manual_seed does for the CPU and this process's
        GPU, without its walk over every other backend (~0.25 ms, 1 % of a small model's step)."""
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def _sum_keys(self) -> list[str]:
        return ["loss", *(f"loss_{name}" for name, *_ in self.loss.terms), "correct", "count"]

    def _global_sums(self, sums: dict[str, float], partial: bool = False) -> dict[str, float]:
        """Sums over all processes; with `partial`, only the main process keeps them (the others restart at 0)."""
        if not self.dist.enabled:
            return sums
        keys = self._sum_keys()
        total = dict(zip(keys, distributed.sum_across(self.dist, [sums.get(k, 0.0) for k in keys])))
        return total if (self.dist.main or not partial) else {}

    def run_epoch(self, epoch: int, bar: tqdm | None) -> dict[str, Any]:
        cfg = self.config.train
        self.net.train()
        it = iter(self.epoch_loader(epoch))
        for _ in range(self.state.step_in_epoch):  # mid-epoch resume: replay the order, skip trained batches
            next(it)
        sums = self.state.epoch_sums
        t0, seen = time.perf_counter(), 0
        lr = lr_at(self.config, max(0, self.state.global_step - 1), self.steps_per_epoch)
        for step in range(self.state.step_in_epoch, self.steps_per_epoch):
            self.seed_step(derive_seed(cfg.seed, epoch, step, 3, *self.dist.seed_key))
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
                sums = self.state.epoch_sums
            if bar is not None:
                ips = seen * self.dist.world_size / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.3g}", ips=f"{ips:.0f}", refresh=False)
        elapsed = time.perf_counter() - t0
        sums = self._global_sums(sums)
        seen = distributed.sum_across(self.dist, [float(seen)])[0]
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
        cfg, main = self.config.train, self.dist.main
        self.run.mkdir(parents=True, exist_ok=True)
        if not (resume and self.try_resume()) and main:
            save_config(self.config, self.run / "config.yaml")
            write_json(self.run / "splits.json", describe_splits(self.splits))
        runlog = RunLog(self.run, tensorboard=cfg.tensorboard and main, wandb=self._wandb() if main else None)
        with tqdm(total=cfg.epochs, initial=self.state.epoch, desc=self.config.name, unit="ep", disable=not (cfg.progress and main),
                  leave=False) as bar:
            for epoch in range(self.state.epoch, cfg.epochs):
                row = self.run_epoch(epoch, bar)
                if main and len(self.splits["val"]) and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                    self._validate_into(row, epoch, bar)
                self.state.history.append(row)
                self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
                if main:
                    runlog.log_row(row, self.state.history)
                self.save_checkpoint()
                bar.update(1)
        runlog.close()
        if main:
            export_student(self.run / "last.safetensors", self.model, self.student_meta(self.state.epoch))
            if not len(self.splits["val"]):  # no validation images: the last checkpoint is the one used
                self.state.best_epoch = self.state.epoch
                export_student(self.run / "best.safetensors", self.model, self.student_meta(self.state.epoch))
            results = self.finish()
        distributed.barrier(self.dist)
        if not main:
            results = read_json(self.run / "results.json", "results")
        distributed.shutdown(self.dist)
        return results

    def _validate_into(self, row: dict[str, Any], epoch: int, bar: tqdm) -> None:
        row["val_top1"] = self.validate()
        if row["val_top1"] > self.state.best_val_top1:
            self.state.best_val_top1, self.state.best_epoch = row["val_top1"], epoch + 1
            export_student(self.run / "best.safetensors", self.model, self.student_meta(epoch + 1))
        bar.set_postfix(val=f"{row['val_top1']:.1f}", best=f"{self.state.best_val_top1:.1f}", ips=f"{row['images_per_s']:.0f}")

    def _wandb(self) -> dict[str, Any] | None:
        cfg = self.config.train
        if not cfg.wandb:
            return None
        return {"project": cfg.wandb_project, "name": self.config.name, "config": to_dict(self.config)}

    # -- final evaluation ------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Test the best-on-validation and last students (class logits only; the aspect head against the teacher)."""
        test = self.splits["test"]
        results: dict[str, Any] = {"name": self.config.name, "seed": self.config.train.seed,
                                   "best_epoch": self.state.best_epoch, "val_top1_best": self.state.best_val_top1 if self.state.best_val_top1 >= 0 else None,
                                   "val_top1_last": self.state.history[-1].get("val_top1")}
        cfg = self.config.train
        # When the last epoch is also the best one, the two files hold the same weights: evaluate once.
        for which in ("best",) if self.state.best_epoch == self.state.epoch else ("best", "last"):
            model, _ = load_student(self.run / f"{which}.safetensors")
            model = model.to(self.device).to(memory_format=self.memory_format)
            result = evaluate_student(model, self.spec, test, self.aspects.store if self.aspects else None,
                                      batch_size=cfg.eval_batch_size, device=self.device, channels_last=cfg.channels_last,
                                      num_workers=self.config.data.num_workers)
            results.update({f"test_{k}_{which}": result.metrics[k] for k in ("top1", "top5", "ece")})
            if "aspects" in result.metrics:
                results[f"aspect_agreement_{which}"] = result.metrics["aspects"]
            if which == "best":
                np.save(self.run / "test_class_logits_best.npy", result.predictions.class_logits)
        for key in [k for k in results if k.endswith("_best") and k.startswith(("test_", "aspect_"))]:
            results.setdefault(key.removesuffix("_best") + "_last", results[key])
        write_json(self.run / "results.json", results)
        write_run_report(self.run, self.config, results, self.state.history)
        log.info("%s: test top-1 %.2f (best-on-val epoch %d), %.2f (last)", self.config.name,
                 results["test_top1_best"], self.state.best_epoch, results["test_top1_last"])
        return results


def train(config: Config, resume: bool = True) -> dict[str, Any]:
    """Train one student as configured; returns the results also written to `<out>/results.json`."""
    return Trainer(config).fit(resume=resume)
