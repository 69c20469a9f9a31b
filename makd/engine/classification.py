"""Image classification as a task of the one training loop: CE, MaKD's aspect BCE, KD/DKD/LSKD and their sums,
and the permuted-target controls, on a student with a class head and an aspect head."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from makd.atomic import atomic_path, write_json
from makd.config import Config, resolve_path, to_dict
from makd.data import build_splits, describe_splits
from makd.data.base import ImageSplit, loader_workers
from makd.data.transforms import InputSpec, SplitDataset, build_transform, channel_stats, input_spec
from makd.engine.distributed import Dist
from makd.engine.seeding import SeededBatch, SeededFetch, continue_step, derive_seed, fetched_as_is, seed_worker
from makd.engine.tasks import TASKS, Task, autocast
from makd.errors import MakdError
from makd.evaluate import Predictions, evaluate_student, predict, score_predictions, topk_accuracy
from makd.labels import LabelStore
from makd.losses import Batch, WeightedLoss
from makd.models import build_student, export_student, load_student
from makd.models.kd_teacher import KDTeacher, load_kd_teacher
from makd.questions import QuestionSet
from makd.report.run import write_run_report

log = logging.getLogger("makd.train")


@dataclass
class AspectTargets:
    questions: QuestionSet
    store: LabelStore
    logodds: torch.Tensor  # [N_train, Q], aligned with the train split's rows
    mass: torch.Tensor
    flags: torch.Tensor | None  # [N_train, Q] uint8, when the teacher flags its targets (see the store's metadata)


def open_aspect_labels(config: Config, class_names: list[str]) -> tuple[QuestionSet, LabelStore]:
    """The configured question set and the label store made for it, checked against the data's classes."""
    if not config.questions or not config.labels.path:
        raise MakdError("an aspect loss is on: set `questions` (question-set JSON) and `labels.path` (label store)")
    questions = QuestionSet.load(resolve_path(config.questions))
    store = LabelStore.open(config.labels.path)
    store.check_questions(questions, str(config.questions))
    if list(questions.classes) != class_names:
        raise MakdError(f"question set {config.questions} lists classes {list(questions.classes)[:4]}..., "
                        f"the dataset has {class_names[:4]}...")
    return questions, store


def load_aspect_targets(config: Config, train: ImageSplit) -> AspectTargets:
    questions, store = open_aspect_labels(config, train.class_names)
    logodds, mass = store.lookup(train.sample_ids)
    flags = store.lookup_flags(train.sample_ids)
    order = target_order(train.targets, config.labels.permute, config.train.seed)
    if order is not None:
        logodds, mass = logodds[order], mass[order]
        flags = None if flags is None else flags[order]
    return AspectTargets(questions, store, _shared_tensor(logodds), _shared_tensor(mass),
                         None if flags is None else torch.from_numpy(flags))


def _shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over the label store's memory-mapped rows, without copying them: the targets are only ever
    indexed (which copies the batch), so torch's warning about a read-only buffer does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def target_order(labels: np.ndarray, mode: str, seed: int) -> np.ndarray | None:
    """Controls: the image whose targets each image gets (any class, or the same class); None: its own."""
    if mode == "none":
        return None
    rng = np.random.default_rng(derive_seed(seed, 0x5EED))
    order = np.arange(len(labels))
    groups = [order] if mode == "images" else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for group in groups:
        order[group] = rng.permutation(group)
    return order


def permute_targets(logodds: np.ndarray, mass: np.ndarray, labels: np.ndarray, mode: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Controls: give each image another image's targets (any class, or the same class)."""
    order = target_order(labels, mode, seed)
    return (logodds, mass) if order is None else (logodds[order], mass[order])


def training_loader(dataset: SplitDataset, batches: list[SeededBatch], workers: int, prefetch_factor: int,
                    device: torch.device) -> DataLoader:
    """The loader of a run's training batches: `batches` (a list the caller refills every epoch) of SeededBatches
    fetched in `workers` processes that persist across epochs, `prefetch_factor` batches ahead each, into pinned
    memory on GPUs (what benchmarks/input_pipeline.py measures)."""
    more = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if workers else {}
    return DataLoader(SeededFetch(dataset), batch_sampler=batches, num_workers=workers, collate_fn=fetched_as_is,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0),
                      worker_init_fn=seed_worker, **more)


def training_batches(loader: DataLoader, batches: list[SeededBatch],
                     device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, rows) of each of `batches` (what the loader's batch list holds), each step's generators
    continued from where its batch's draws left them."""
    for batch, (samples, rng_state) in zip(batches, loader):
        continue_step(batch.seed, rng_state, device)
        yield samples


@dataclass
class ImageBatch:
    """One training batch on the device: images and what the loss terms compare against."""

    images: torch.Tensor
    targets: Batch

    def __len__(self) -> int:
        return len(self.images)


def split_batch(batch: Batch, k: int) -> list[Batch]:
    """The targets of k micro-batches (views, same order as `tensor.tensor_split(k)`)."""
    if k == 1:
        return [batch]
    fields = {name: (value.tensor_split(k) if isinstance(value, torch.Tensor) else [value] * k)
              for name, value in batch.__dict__.items()}
    return [Batch(**{name: parts[i] for name, parts in fields.items()}) for i in range(k)]


@TASKS.register("classification")
class ClassificationTask(Task):
    name: ClassVar[str] = "classification"
    selection_metric: ClassVar[str] = "val_top1"

    def __init__(self, config: Config, device: torch.device, dist: Dist) -> None:
        super().__init__(config, device, dist)
        self.weighted_loss = WeightedLoss(config.loss)
        self.splits = build_splits(config.data)
        train = self.splits["train"]
        self.aspects = load_aspect_targets(config, train) if self.weighted_loss.needs_aspects else None
        questions = self.aspects.questions if self.aspects else None
        torch.manual_seed(derive_seed(config.train.seed))  # model initialisation
        model = build_student(config.model, train.channels, train.num_classes, len(questions or []),
                              *channel_stats(train)).to(device)
        self.spec: InputSpec = input_spec(train, config.data.image_size, model.data_config)
        self.memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format)
        self.kd_teacher = self._kd_teacher(train)
        self.dataset = SplitDataset(train, build_transform(self.spec, True, config.data.augment, config.data.crop_padding),
                                    self.spec)
        self._autocast = autocast(config, device)
        self._batches: list[SeededBatch] = []  # the batch sampler of the training loader, set every epoch
        self._loader: DataLoader | None = None

    def _kd_teacher(self, train: ImageSplit) -> KDTeacher | None:
        if not self.weighted_loss.needs_teacher:
            if self.config.kd_teacher.checkpoint or self.config.kd_teacher.timm:
                log.warning("kd_teacher is set but no loss term uses it (add loss.kd, loss.dkd or loss.lskd)")
            return None
        return load_kd_teacher(self.config.kd_teacher, train.class_names).to(self.device)

    # -- training data --------------------------------------------------------------------------------
    def num_train_samples(self) -> int:
        return len(self.dataset)

    def epoch_batches(self, epoch: int, local_batch: int) -> list[SeededBatch]:
        """This process's batches of `epoch`: the global order is a permutation seeded by (seed, epoch); process r
        takes every world_size-th sample, so one step's batches together form the global batch. Each batch carries
        its step's seed (augmentation, dropout)."""
        seed, key = self.config.train.seed, self.dist.seed_key
        order = list(DistributedSampler(self.dataset, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True,
                                        seed=derive_seed(seed, epoch, 1), drop_last=False))
        return [SeededBatch(order[start:start + local_batch], derive_seed(seed, epoch, step, 3, *key))
                for step, start in enumerate(range(0, len(order), local_batch))]

    def _train_loader(self) -> DataLoader:
        if self._loader is None:
            workers = self.workers
            log.info("data: %d loader process(es) per training process", workers)
            self._loader = training_loader(self.dataset, self._batches, workers, self.config.data.prefetch_factor,
                                           self.device)
        return self._loader

    def batches(self, epoch: int, local_batch: int, start_step: int) -> Iterator[ImageBatch]:
        mine = self.epoch_batches(epoch, local_batch)[start_step:]  # a resumed epoch skips trained batches unloaded
        self._batches[:] = mine
        for x, y, rows in training_batches(self._train_loader(), mine, self.device):
            yield self._on_device(x, y, rows)

    def _on_device(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> ImageBatch:
        """Images, labels, the rows' aspect targets and the KD teacher's logits, on the device."""
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        targets = Batch(labels=y.to(self.device, non_blocking=True))
        if self.aspects is not None:
            targets.aspect_logodds = self.aspects.logodds[rows].to(self.device)
            targets.aspect_mass = self.aspects.mass[rows].to(self.device)
            if self.aspects.flags is not None:
                targets.aspect_flags = self.aspects.flags[rows].to(self.device)
        if self.kd_teacher is not None:
            with self._autocast:
                targets.teacher_logits = self.kd_teacher(x).float()
        return ImageBatch(x, targets)

    def end_training(self) -> None:
        self._loader = None  # its persistent loader processes stop with it

    def split(self, batch: ImageBatch, parts: int) -> list[ImageBatch]:
        if parts == 1:
            return [batch]
        return [ImageBatch(x, t) for x, t in zip(batch.images.tensor_split(parts), split_batch(batch.targets, parts))]

    def batch_size(self, batch: ImageBatch) -> int:
        return len(batch)

    # -- loss -----------------------------------------------------------------------------------------
    def loss_names(self) -> list[str]:
        return [name for name, *_ in self.weighted_loss.terms]

    def loss(self, net: torch.nn.Module, batch: ImageBatch, epoch: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        batch.targets.epoch = epoch
        out = net(batch.images)
        total, parts = self.weighted_loss(out, batch.targets)
        return total, parts, {"correct": (out.class_logits.argmax(1) == batch.targets.labels).sum()}

    def counter_names(self) -> list[str]:
        return ["correct"]

    def train_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {"train_top1": 100.0 * sums["correct"] / count}

    # -- validation, files, report --------------------------------------------------------------------
    def validates(self) -> bool:
        return len(self.splits["val"]) > 0

    def validate(self) -> dict[str, float]:
        cfg = self.config
        with self._autocast:  # validation in the training precision (bf16 on a CPU that has it is ~2x faster)
            preds = predict(self.model, self.splits["val"], self.spec, cfg.train.eval_batch_size, self.device,
                            cfg.train.channels_last, self.workers, self.evaluation_shard())
        return {"val_top1": topk_accuracy(preds.class_logits, preds.targets)}

    @property
    def workers(self) -> int:
        """Loader processes of this run's training, validation and test (`data.num_workers`)."""
        return loader_workers(self.config.data.num_workers, self.splits["train"].array is not None, self.device.type)

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

    def export(self, which: str, epoch: int) -> None:
        export_student(Path(self.config.out) / f"{which}.safetensors", self.model, self.student_meta(epoch))

    def describe_data(self) -> dict[str, Any]:
        return describe_splits(self.splits)

    def finish(self, run: Path, state: Any, predictions: dict[str, Predictions] | None = None) -> dict[str, Any]:
        """Test the best-on-validation and last students (class logits only; the aspect head against the teacher).
        `predictions` of the two files on the test split may be given (a seed batch computes them all at once).
        Every DDP process tests its share and gets the results; the main one writes the files."""
        test, cfg = self.splits["test"], self.config.train
        teacher = self.aspects.store if self.aspects else None
        results: dict[str, Any] = {"name": self.config.name, "seed": cfg.seed, "best_epoch": state.best_epoch,
                                   "val_top1_best": state.best_metric if self.validates() else None,
                                   "val_top1_last": state.history[-1].get("val_top1"),
                                   "train_seconds": round(state.seconds, 2)}
        # When the last epoch is also the best one, the two files hold the same weights: evaluate once.
        for which in ("best",) if state.best_epoch == state.epoch else ("best", "last"):
            if predictions is not None:
                preds = predictions[which]
                metrics = score_predictions(preds, test, teacher)
            else:
                model, _ = load_student(run / f"{which}.safetensors")
                model = model.to(self.device).to(memory_format=self.memory_format)
                result = evaluate_student(model, self.spec, test, teacher, batch_size=cfg.eval_batch_size,
                                          device=self.device, channels_last=cfg.channels_last,
                                          num_workers=self.workers, shard=self.evaluation_shard())
                preds, metrics = result.predictions, result.metrics
            results.update({f"test_{k}_{which}": metrics[k] for k in ("top1", "top5", "ece")})
            if "aspects" in metrics:
                results[f"aspect_agreement_{which}"] = metrics["aspects"]
            if which == "best" and self.dist.main:
                with atomic_path(run / "test_class_logits_best.npy") as tmp, open(tmp, "wb") as f:
                    np.save(f, preds.class_logits)
        for key in [k for k in results if k.endswith("_best") and k.startswith(("test_", "aspect_"))]:
            results.setdefault(key.removesuffix("_best") + "_last", results[key])
        if not self.dist.main:
            return results
        write_json(run / "results.json", results)
        write_run_report(run, self.config, results, state.history)
        log.info("%s: test top-1 %.2f (best-on-val epoch %d), %.2f (last)", self.config.name,
                 results["test_top1_best"], state.best_epoch, results["test_top1_last"])
        return results
