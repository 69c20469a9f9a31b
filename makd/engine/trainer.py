"""The one training loop, for every task (classification: CE, MaKD, KD/DKD/LSKD and their sums, controls;
detection): seeded, resumable at any step, validated, reported; single process or torchrun DDP, with autocast and
gradient accumulation. What differs between tasks is in makd/engine/tasks.py.

Every random draw is a function of (seed, epoch, step[, rank]): the sampler and worker seeds per epoch, the
global RNG (augmentation without workers, dropout) per step. A run resumed from a mid-epoch checkpoint
replays the epoch's batch order and continues bit-for-bit where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from makd.atomic import remove_stale_temporaries, write_json
from makd.config import Config, load_config, save_config, to_dict
from makd.effects import execution_keys
from makd.engine import distributed
from makd.engine.batch_norm import batch_norms, sync_batch_norms
from makd.engine.checkpoint import load_newest_state, rng_states, save_state, set_rng_states
from makd.engine.host_memory import keep_freed_memory
from makd.engine.runlog import RunLog
from makd.engine.tasks import TASKS, Task, autocast
from makd.errors import MakdError

log = logging.getLogger("makd.train")


CHECK_EVERY = 50  # steps between host syncs that check the loss is finite (and refresh the progress bar)
SMALL_BATCH_NORM_BATCH = 16  # train.sync_bn auto: synchronise batch norm when a process normalises fewer images


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """GPUs: cuDNN benchmarks and picks the fastest kernels, float32 matmuls and convolutions use TF32 — unless
    `train.deterministic` asks for deterministic kernels in full float32. (Set per run, never at import.)"""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9: the precision API
        precision = "ieee" if deterministic else "tf32"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:  # torch 2.4-2.8 (pyproject allows them)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic


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


def build_optimizer(config: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and norm scales
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=config.optim.lr, momentum=config.optim.momentum, nesterov=config.optim.nesterov)
    return torch.optim.AdamW(groups, lr=config.optim.lr)


# Settings that may differ when a run is resumed: they do not change what is computed.
NOT_TRAINING = ("generate.", "select.", "executor.")  # sections only the question stages and launchers read
# The keys marked EXECUTION in the config (makd/effects.py): what a run computes does not depend on them (checkpoint
# frequency included: tests/test_trainer.py proves it; loader processes, as every batch's draws are seeded by its
# step), or only in float rounding (threads, the memory layout, the evaluation batch size: batch norm is per image
# when evaluating; GPU kernel choices: train.deterministic), or how the C allocator keeps freed memory. A run
# resumed with another of these continues the same computation in another summation order.
RESUMABLE_CHANGES = execution_keys(Config)


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
    best_metric: float = -math.inf  # the task's selection metric (val_top1, val mAP...) of the best checkpoint
    best_epoch: int = 0
    seconds: float = 0.0  # time spent in training epochs and validation, over every resumed part of the run
    epoch_sums: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    def __init__(self, config: Config, task: Callable[[Config, torch.device, distributed.Dist], Task] | None = None) -> None:
        """`task` builds the task (default: the registered `config.task`)."""
        self.config = config
        cfg = config.train
        self.run = Path(config.out)
        self.dist = distributed.from_env()
        self.device = distributed.init(self.dist, resolve_device(cfg.device), cfg.dist_timeout_min)
        configure_backends(self.device, cfg.deterministic)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.keep_freed_memory:
            keep_freed_memory()
        if cfg.batch_size % (self.dist.world_size * cfg.accumulation_steps):
            raise MakdError(f"train.batch_size {cfg.batch_size} is not divisible by {self.dist.world_size} processes x "
                            f"train.accumulation_steps {cfg.accumulation_steps}")
        self.local_batch = cfg.batch_size // self.dist.world_size
        self.task: Task = (task or TASKS.get(config.task))(config, self.device, self.dist)
        self.model = self.task.model
        self.net = self._wrap_ddp(self.model)
        self.optimizer = build_optimizer(config, self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.autocast = autocast(config, self.device)
        self.steps_per_epoch = math.ceil(math.ceil(self.task.num_train_samples() / self.dist.world_size) / self.local_batch)
        self.state = TrainState()
        self._running: torch.Tensor | None = None  # the epoch's sums so far, on the device (see run_epoch)

    def _wrap_ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.dist.enabled:
            return model
        cfg = self.config.train
        micro = self.local_batch // cfg.accumulation_steps
        log.info("per-process batch: %d images (train.batch_size %d over %d processes)%s", self.local_batch,
                 cfg.batch_size, self.dist.world_size,
                 f", in {cfg.accumulation_steps} micro-batches of {micro}" if cfg.accumulation_steps > 1 else "")
        if batch_norms(model) and self._sync_batch_norm(micro):
            model, left = sync_batch_norms(model, self.device)
            self.model = self.task.model = model
            if left:
                log.warning("train.sync_bn: %d batch-norm layer(s) of a kind makd cannot synchronise on %s keep "
                            "per-process statistics", left, self.device.type)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def _sync_batch_norm(self, micro: int) -> bool:
        """train.sync_bn: true, false, or auto (on when each process normalises fewer than 16 images)."""
        setting = self.config.train.sync_bn
        on = micro < SMALL_BATCH_NORM_BATCH if setting == "auto" else setting
        if on:
            how = "SyncBatchNorm" if self.device.type == "cuda" else "all-reduced batch statistics (no SyncBatchNorm kernel off GPUs)"
            log.info("batch norm over the global batch: %s (train.sync_bn %s)", how, setting)
        elif micro < SMALL_BATCH_NORM_BATCH:
            log.warning("train.sync_bn is false: batch-norm statistics are per process, over %d images each", micro)
        return bool(on)

    # -- artifacts -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run / "checkpoints" / "last.pt"

    def _write_checkpoint(self) -> None:
        """The main process writes the training state (the epoch's sums already combined by `save_checkpoint`)."""
        if not self.dist.main:
            return
        lr = lr_at(self.config, max(0, self.state.global_step - 1), self.steps_per_epoch)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "schedule": {"lr": lr, "note": "lr is a pure function of global_step"},
                 "state": self.state.to_dict(), "rng": rng_states(), "world_size": self.dist.world_size,
                 "config": to_dict(self.config), "task": self.task.state_dict()}
        save_state(self.checkpoint_path, state)

    def try_resume(self) -> bool:
        """Continue from the newest valid checkpoint in <out>/checkpoints/ (`makd train --resume auto`)."""
        ckpt = load_newest_state(self.checkpoint_path)
        if ckpt is None:
            return False
        changed = config_changes(to_dict(load_config(base=ckpt["config"])), to_dict(self.config))
        if self.dist.world_size == ckpt.get("world_size", 1) == 1:  # one process synchronises nothing (the default
            changed = [key for key in changed if key != "train.sync_bn"]  # was false before `auto`)
        if changed:
            raise MakdError(f"{self.checkpoint_path} was written with another {changed[0]}; "
                            f"use a new `out` folder, or --resume never to start over")
        if ckpt.get("world_size", 1) != self.dist.world_size:
            log.warning("warning: %s was written by %d process(es), resumed with %d: the same global batches, with "
                        "other per-process draws (not bit-identical to an uninterrupted run)", self.checkpoint_path,
                        ckpt.get("world_size", 1), self.dist.world_size)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        saved = dict(ckpt["state"])
        if "best_val_top1" in saved:  # checkpoints of makd 0.1 named the selection metric after classification
            saved["best_metric"] = saved.pop("best_val_top1")
        self.state = TrainState(**saved)
        self.task.load_state_dict(ckpt.get("task") or {})
        if not self.dist.main:
            self.state.epoch_sums = {}  # the saved sums are already the global ones: count them once
        set_rng_states(ckpt["rng"])
        log.info("resumed %s at epoch %d step %d", self.run, self.state.epoch, self.state.step_in_epoch)
        return True

    # -- training --------------------------------------------------------------------------------
    def train_step(self, batch: Any, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this process's share of the global batch, in `accumulation_steps` micro-batches.
        Returns, on the device (no host sync), the loss and the weighted loss terms (batch means) and the task's
        counters (sums). A non-finite loss is GradScaler's to skip with fp16; otherwise `run_epoch` raises at its
        next check."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        size = self.task.batch_size(batch)
        k = min(self.config.train.accumulation_steps, size)
        epoch = self.state.global_step / self.steps_per_epoch
        totals = counters = None
        for i, part in enumerate(self.task.split(batch, k)):
            # DDP averages gradients only on the last micro-batch; each micro-batch's loss counts by its size.
            with self.net.no_sync() if self.dist.enabled and i < k - 1 else contextlib.nullcontext():
                with self.autocast:
                    total, parts, counted = self.task.loss(self.net, part, epoch)
                share = self.task.batch_size(part) / size
                self.scaler.scale(total * share if k > 1 else total).backward()
            values = torch.stack([total.detach(), *(v.detach() for v in parts.values())]).float() * share
            totals = values if totals is None else totals + values
            summed = torch.stack([counted[name].detach().float() for name in self.task.counter_names()]) \
                if counted else torch.zeros(0)
            counters = summed if counters is None else counters + summed
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return totals, counters.to(totals.device)

    def step_values(self, totals: torch.Tensor, counters: torch.Tensor) -> dict[str, float]:
        """What `train_step` returned, by name (loss, loss_<term>..., counters...), on the host."""
        return dict(zip(self._sum_keys(), torch.cat([totals.double(), counters.double()]).tolist()))

    def _sum_keys(self) -> list[str]:
        return ["loss", *(f"loss_{name}" for name in self.task.loss_names()), *self.task.counter_names(), "count"]

    def _global_sums(self, sums: dict[str, float], partial: bool = False) -> dict[str, float]:
        """Sums over all processes; with `partial`, only the main process keeps them (the others restart at 0)."""
        if not self.dist.enabled:
            return sums
        keys = self._sum_keys()
        total = dict(zip(keys, distributed.sum_across(self.dist, [sums.get(k, 0.0) for k in keys])))
        return total if (self.dist.main or not partial) else {}

    def _start_sums(self) -> None:
        """The device-side sums of the epoch continue from the state's (a resumed epoch's sums so far): float64, so
        that they equal the sums one uninterrupted run adds up, in the same order, to the bit."""
        keys = self._sum_keys()
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self._running = torch.tensor([self.state.epoch_sums.get(k, 0.0) for k in keys], dtype=dtype, device=self.device)

    def _add_step(self, totals: torch.Tensor, counters: torch.Tensor, n: int) -> None:
        terms, counts = totals.to(self._running.dtype) * n, counters.to(self._running.dtype)
        seen = torch.tensor(float(n), dtype=self._running.dtype, device=self._running.device)
        if self.scaler.is_enabled():  # GradScaler skipped the step: it stays out of the epoch's means altogether
            finite = torch.isfinite(totals[0])
            terms, counts, seen = (torch.where(finite, t, 0.0) for t in (terms, counts, seen))
            self._skipped += (~finite).float()
        self._running[:len(terms)] += terms
        self._running[len(terms):-1] += counts
        self._running[-1] += seen

    def _checked(self, first_step: int) -> dict[str, float]:
        """This process's sums of the epoch so far, on the host (a host sync). A non-finite loss in any process since
        `first_step` stops every process here, at the same step (fp16 steps that GradScaler skipped are not summed)."""
        sums = dict(zip(self._sum_keys(), self._running.tolist()))
        loss = distributed.sum_across(self.dist, [sums["loss"]])[0]
        if not math.isfinite(loss):
            raise MakdError(f"loss became {loss} between steps {first_step} and {self.state.global_step}: lower optim.lr")
        return sums

    def save_checkpoint(self) -> None:
        """Every process calls this (the partial epoch sums are combined); the main one writes."""
        if self._running is not None:
            self.state.epoch_sums = self._global_sums(self._checked(self._check_from), partial=True)
            self._check_from = self.state.global_step
            self._start_sums()
        self._write_checkpoint()

    def run_epoch(self, epoch: int, bar: tqdm | None) -> dict[str, Any]:
        """One epoch. Nothing syncs the host with the device per step: the loss terms and counters add up on the
        device, checked (finite) every CHECK_EVERY steps, at checkpoints and at the end."""
        cfg = self.config.train
        self.net.train()
        self._start_sums()
        self._skipped = torch.zeros((), device=self.device)  # fp16 steps with a non-finite loss
        self._check_from = self.state.global_step
        t0, seen = time.perf_counter(), 0
        lr = lr_at(self.config, max(0, self.state.global_step - 1), self.steps_per_epoch)
        for step, batch in enumerate(self.task.batches(epoch, self.local_batch, self.state.step_in_epoch),
                                     start=self.state.step_in_epoch):
            lr = lr_at(self.config, self.state.global_step, self.steps_per_epoch)
            totals, counters = self.train_step(batch, lr)
            n = self.task.batch_size(batch)
            self._add_step(totals, counters, n)
            seen += n
            self.state.step_in_epoch = step + 1
            self.state.global_step += 1
            if cfg.checkpoint_every_steps and self.state.global_step % cfg.checkpoint_every_steps == 0:
                self.save_checkpoint()
            elif self.state.global_step % CHECK_EVERY == 0:
                sums = self._checked(self._check_from)
                self._check_from = self.state.global_step
                if bar is not None:
                    ips = seen * self.dist.world_size / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{sums['loss'] / max(sums['count'], 1):.3f}", lr=f"{lr:.3g}", ips=f"{ips:.0f}")
        elapsed = time.perf_counter() - t0
        self.state.seconds += elapsed
        sums = self._global_sums(self._checked(self._check_from))
        skipped = int(distributed.sum_across(self.dist, [float(self._skipped)])[0])
        if skipped:
            log.warning("epoch %d: %d fp16 step(s) with a non-finite loss, skipped by the grad scaler", epoch + 1, skipped)
        self._running = None
        seen = distributed.sum_across(self.dist, [float(seen)])[0]
        count = sums.pop("count")
        counted = {k: sums.pop(k) for k in self.task.counter_names()}
        row = {"epoch": epoch + 1, "step": self.state.global_step, "lr": lr, **{k: v / count for k, v in sums.items()},
               **self.task.train_metrics(counted, count), "images_per_s": seen / elapsed if elapsed > 0 else float("nan")}
        self.state.epoch_sums = {}
        return row

    def fit(self, resume: bool = True) -> dict[str, Any]:
        cfg, main = self.config.train, self.dist.main
        self.run.mkdir(parents=True, exist_ok=True)
        for folder in (self.run, self.checkpoint_path.parent):  # what a killed run left; live writers' files stay
            remove_stale_temporaries(folder)
        resumed = resume and self.try_resume()
        if not resumed and main:
            save_config(self.config, self.run / "config.yaml")
            write_json(self.run / "splits.json", self.task.describe_data())
        self.task.start(resumed)
        runlog = RunLog(self.run, tensorboard=cfg.tensorboard and main, wandb=self._wandb() if main else None)
        with tqdm(total=cfg.epochs, initial=self.state.epoch, desc=self.config.name, unit="ep", disable=not (cfg.progress and main),
                  leave=False) as bar:
            for epoch in range(self.state.epoch, cfg.epochs):
                row = self.run_epoch(epoch, bar)
                validates = self.task.validates() and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
                if validates:  # every process evaluates its share of the validation split
                    self._validate_into(row, epoch, bar)
                self.task.end_epoch(row)
                self.state.history.append(row)
                self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
                if main:
                    runlog.log_row(row, self.state.history)
                # Also after every validation: best.safetensors and the state naming its epoch stay in step.
                if validates or (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                    self.save_checkpoint()
                bar.update(1)
        runlog.close()
        self.task.end_training()
        if not self.task.validates():  # no validation images: the last checkpoint is the one used
            self.state.best_epoch = self.state.epoch
        if main:
            self.task.export("last", self.state.epoch)
            if not self.task.validates():
                self.task.export("best", self.state.epoch)
        distributed.barrier(self.dist)  # the files exist: every process tests its share of them
        results = self.task.finish(self.run, self.state)
        distributed.barrier(self.dist)
        distributed.shutdown(self.dist)
        return results

    def _validate_into(self, row: dict[str, Any], epoch: int, bar: tqdm) -> None:
        """Every process gets the same numbers (the task gathers its shards), so every state stays the same."""
        start = time.perf_counter()
        distributed.broadcast_buffers(self.dist, self.model)
        row.update(self.task.validate())
        self.state.seconds += time.perf_counter() - start
        metric = self.task.selection_metric
        if row[metric] > self.state.best_metric:
            self.state.best_metric, self.state.best_epoch = row[metric], epoch + 1
            if self.dist.main:
                self.task.export("best", epoch + 1)
        bar.set_postfix(val=f"{row[metric]:.1f}", best=f"{self.state.best_metric:.1f}", ips=f"{row['images_per_s']:.0f}")

    def _wandb(self) -> dict[str, Any] | None:
        cfg = self.config.train
        if not cfg.wandb:
            return None
        return {"project": cfg.wandb_project, "name": self.config.name, "config": to_dict(self.config)}


def train(config: Config, resume: bool = True) -> dict[str, Any]:
    """Train one model as configured; returns the results also written to `<out>/results.json`."""
    return Trainer(config).fit(resume=resume)
