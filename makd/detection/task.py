"""Object detection as a task of the one training loop (`task: detection`): a torchvision detector whose own losses
are the supervised term (`loss.ce`) and whose per-box aspect head learns the teacher's answers about each
ground-truth box (`loss.aspect_bce`, alpha); the best checkpoint is chosen on validation mAP."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.models.detection import FasterRCNN

from makd.atomic import write_json, write_text
from makd.config import Config, LossTerm, to_dict
from makd.data.base import file_channels, loader_workers
from makd.detection.data import DetectionSplit, build_detection_splits, describe_detection_splits
from makd.detection.draws import image_draws, per_image_draws
from makd.detection.evaluate import detect, evaluate_detector
from makd.detection.metrics import box_map
from makd.detection.model_file import load_detector, save_detector
from makd.detection.models import aspect_module, build_detector, detector_options
from makd.detection.pipeline import (
    BoxTargets,
    DetectionDataset,
    build_augment,
    collate,
    epoch_batches,
    load_tensor,
    orientation_groups,
)
from makd.engine.classification import open_aspect_labels, target_order
from makd.engine.distributed import Dist
from makd.engine.seeding import derive_seed, seed_step
from makd.engine.tasks import TASKS, Task
from makd.errors import MakdError
from makd.labels import LabelStore
from makd.questions import QuestionSet
from makd.report.plots import training_curves

log = logging.getLogger("makd.train")
Batch = tuple[list[Tensor], list[dict[str, Tensor]], list[int]]  # images, targets, the images' draw seeds
ASPECT_OPTIONS = ("temperature", "mass_weighting", "keep_bounded")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def loss_weights(loss: dict[str, LossTerm]) -> tuple[float, float, dict[str, Any]]:
    """(weight of the detector's own losses `ce`, alpha of `aspect_bce`, the aspect term's options)."""
    for name, term in loss.items():
        if term.weight > 0 and name not in ("ce", "aspect_bce"):
            raise MakdError(f"loss.{name}: not a detection loss term (task detection has ce, the detector's own "
                            "losses, and aspect_bce)")
    ce, aspect = loss.get("ce", LossTerm(weight=0.0)), loss.get("aspect_bce", LossTerm(weight=0.0))
    if (ce.model_extra or {}):
        raise MakdError(f"loss.ce: task detection takes no options for it (got {sorted(ce.model_extra)[0]!r})")
    options = dict(aspect.model_extra or {})
    unknown = sorted(set(options) - set(ASPECT_OPTIONS))
    if unknown:
        raise MakdError(f"loss.aspect_bce: unknown option {unknown[0]!r} (options: {', '.join(ASPECT_OPTIONS)})")
    if ce.weight == 0 and aspect.weight == 0:
        raise MakdError("loss: every term has weight 0")
    return ce.weight, aspect.weight, options


def load_box_targets(config: Config, train: DetectionSplit, keep_bounded: bool = False) -> tuple[BoxTargets, QuestionSet, LabelStore]:
    """Teacher rows of the training boxes (by sample id `<image id>/<annotation id>`; boxes without one weigh 0, and
    so do the pairs the store flags as bounded unless `keep_bounded`), permuted across boxes for the
    `labels.permute` controls."""
    questions, store = open_aspect_labels(config, train.class_names)
    ids = train.all_box_ids()
    positions, logodds, mass = store.available(ids)
    if not len(positions):
        raise MakdError(f"label store {store.path} has no row for any training box (sample ids <image id>/<annotation "
                        "id>): label the train split with `makd label`")
    flags = None if keep_bounded else store.lookup_flags([ids[p] for p in positions])
    logodds, mass = np.asarray(logodds), np.asarray(mass)
    order = target_order(np.concatenate(train.labels)[positions], config.labels.permute, config.train.seed)
    if order is not None:
        logodds, mass = logodds[order], mass[order]
        flags = None if flags is None else flags[order]
    q = len(questions)
    targets = BoxTargets(np.zeros((train.num_boxes, q), np.float32), np.ones((train.num_boxes, q), np.float32),
                         np.zeros((train.num_boxes, q), np.float32))
    targets.logodds[positions], targets.mass[positions] = logodds, mass
    targets.weight[positions] = 1.0 if flags is None else (flags == 0)
    if len(positions) < train.num_boxes:
        log.warning("%d of %d training boxes have no teacher row in %s: they add no aspect loss",
                    train.num_boxes - len(positions), train.num_boxes, store.path)
    return targets, questions, store


def image_stats(split: DetectionSplit, in_chans: int, count: int = 64) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of the first `count` images (the tiny detector starts from scratch)."""
    pixels = torch.cat([load_tensor(split, i, in_chans).flatten(1).float() / 255.0 for i in range(min(count, len(split)))], 1)
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).clamp_min(1e-3).tolist())


@TASKS.register("detection")
class DetectionTask(Task):
    name: ClassVar[str] = "detection"
    selection_metric: ClassVar[str] = "val_map"

    def __init__(self, config: Config, device: torch.device, dist: Dist) -> None:
        super().__init__(config, device, dist)
        self.ce_weight, self.aspect_weight, aspect_options = loss_weights(config.loss)
        self.options = detector_options(config.detection.model)
        self.splits = build_detection_splits(config)
        train = self.splits["train"]
        if not len(train):
            raise MakdError("detection: the training split has no images")
        targets = questions = self.store = None
        if self.aspect_weight > 0:
            keep_bounded = bool(aspect_options.pop("keep_bounded", False))  # applied here, to the targets' weights
            targets, questions, self.store = load_box_targets(config, train, keep_bounded)
        self.questions = questions
        channels = config.data.channels
        if channels == "auto" and self.options.name == "tiny":  # torchvision's detectors take RGB
            channels = file_channels(train.paths, "detection: the training images")
        self.in_chans = 1 if channels == 1 and self.options.name == "tiny" else 3
        mean, std = image_stats(train, self.in_chans) if self.options.name == "tiny" else IMAGENET
        self.input = {"in_chans": self.in_chans, "mean": list(mean), "std": list(std)}
        torch.manual_seed(derive_seed(config.train.seed))  # model initialisation
        self.model = build_detector(self.options, train.num_classes, len(questions or []), self.in_chans, mean, std).to(device)
        if questions is not None:
            aspect_module(self.model).aspect_options = aspect_options
        self.seeded = per_image_draws(self.model)
        self.dataset = DetectionDataset(train, self.in_chans, build_augment(config.detection.augment), targets,
                                        config.train.seed)
        self.groups = orientation_groups(train) if config.detection.group_aspect_ratio else None
        self.terms = (["classifier", "box_reg", "objectness", "rpn_box_reg"] if isinstance(self.model, FasterRCNN)
                      else ["classification", "bbox_regression", "bbox_ctrness"]) + (["aspect"] if questions else [])
        self._batches: list[list[tuple[int, int]]] = []  # the batch sampler of the training loader, set every epoch
        self._loader: DataLoader | None = None

    # -- training data --------------------------------------------------------------------------------
    def num_train_samples(self) -> int:
        return len(self.dataset)

    def _train_loader(self) -> DataLoader:
        """One loader for the whole run: its workers persist across epochs, each epoch sets the batches."""
        if self._loader is None:
            workers = self.workers
            log.info("data: %d loader process(es) per training process", workers)
            more = {"persistent_workers": True, "prefetch_factor": self.config.data.prefetch_factor} if workers else {}
            self._loader = DataLoader(self.dataset, batch_sampler=self._batches, collate_fn=collate, num_workers=workers,
                                      pin_memory=self.device.type == "cuda", **more)
        return self._loader

    def batches(self, epoch: int, local_batch: int, start_step: int) -> Iterator[Batch]:
        seed, world, key = self.config.train.seed, self.dist.world_size, self.dist.seed_key
        batches = epoch_batches(len(self.dataset), self.groups, local_batch * world, world, seed, epoch)
        self._batches[:] = [[(i, epoch) for i in b[self.dist.rank::world]] for b in batches[start_step:]]
        mine = list(self._batches)  # a resumed epoch skips its trained batches without loading them
        for step, (items, (images, targets)) in enumerate(zip(mine, self._train_loader()), start=start_step):
            # Sampling and the multi-scale choice draw per image (makd/detection/draws.py); the rest per step.
            seed_step(derive_seed(seed, epoch, step, 3, *key), self.device)
            yield ([x.to(self.device, non_blocking=True) for x in images],
                   [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets],
                   [derive_seed(seed, epoch, i, 11) for i, _ in items])

    def end_training(self) -> None:
        self._loader = None  # its persistent loader processes stop with it

    def split(self, batch: Batch, parts: int) -> list[Batch]:
        images, targets, seeds = batch
        bounds = np.linspace(0, len(images), parts + 1).round().astype(int)
        return [(images[a:b], targets[a:b], seeds[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def batch_size(self, batch: Batch) -> int:
        return len(batch[0])

    # -- loss -----------------------------------------------------------------------------------------
    def loss_names(self) -> list[str]:
        return list(self.terms)

    def loss(self, net: torch.nn.Module, batch: Batch, epoch: float) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        images, targets, seeds = batch
        with image_draws(self.seeded, seeds):
            losses = {k.removeprefix("loss_"): v for k, v in net(images, targets).items()}
        parts = {name: (self.aspect_weight if name == "aspect" else self.ce_weight) * losses[name].float()
                 for name in self.terms}
        return sum(parts.values()), parts, {}

    # -- validation, files, report --------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        val = self.splits["val"]
        detections, _ = detect(self.model, val, self.in_chans, self.config.train.eval_batch_size, self.device,
                               workers=self.workers, shard=self.evaluation_shard())
        return {f"val_{k}": v for k, v in box_map(val, detections, self.config.detection.map_backend).items()}

    @property
    def workers(self) -> int:
        """Loader processes of this run's training, validation and test (`data.num_workers`)."""
        return loader_workers(self.config.data.num_workers, False, self.device.type)

    def detector_meta(self, epoch: int) -> dict[str, Any]:
        q = self.questions
        train = self.splits["train"]
        return {"model": self.options.model_dump(mode="json"), "input": self.input, "classes": train.class_names,
                "category_ids": train.category_ids,
                "questions": [{"id": x.id, "text": x.text} for x in q.questions] if q else [],
                "question_set_hash": q.hash if q else None, "epoch": epoch, "run": self.config.name,
                "config": to_dict(self.config)}

    def export(self, which: str, epoch: int) -> None:
        save_detector(Path(self.config.out) / f"{which}.safetensors", self.model, self.detector_meta(epoch))

    def describe_data(self) -> dict[str, Any]:
        return describe_detection_splits(self.splits)

    def finish(self, run: Path, state: Any) -> dict[str, Any]:
        """Test the best-on-validation and last detectors (mAP on boxes and class scores; the aspect head against the
        teacher on the test boxes it labelled). Every DDP process tests its share; the main one writes the files."""
        cfg = self.config
        results: dict[str, Any] = {"name": cfg.name, "seed": cfg.train.seed, "best_epoch": state.best_epoch,
                                   "val_map_best": state.best_metric, "val_map_last": state.history[-1].get("val_map"),
                                   "train_seconds": round(state.seconds, 2)}
        for which in ("best",) if state.best_epoch == state.epoch else ("best", "last"):
            model, meta = load_detector(run / f"{which}.safetensors")
            metrics, _ = evaluate_detector(model.to(self.device), meta, self.splits["test"], self.store,
                                           batch_size=cfg.train.eval_batch_size, device=self.device,
                                           backend=cfg.detection.map_backend, workers=self.workers,
                                           shard=self.evaluation_shard())
            results.update({f"test_{k}_{which}": metrics[k] for k in ("map", "map50", "map75")})
            if "aspects" in metrics:
                results[f"aspect_agreement_{which}"] = metrics["aspects"]
        for key in [k for k in results if k.endswith("_best") and k.startswith(("test_", "aspect_"))]:
            results.setdefault(key.removesuffix("_best") + "_last", results[key])
        if not self.dist.main:
            return results
        write_json(run / "results.json", results)
        write_report(run, cfg, results, state.history)
        log.info("%s: test mAP %.2f (best-on-val epoch %d), %.2f (last)", cfg.name, results["test_map_best"],
                 state.best_epoch, results["test_map_last"])
        return results


def write_report(run: Path, config: Config, results: dict[str, Any], history: list[dict[str, Any]]) -> None:
    training_curves(history, run / "curves.png", metric="map", label="mAP@[.5:.95] (%)", title="validation mAP")
    terms = ", ".join(f"{name} × {term.weight:g}" for name, term in config.loss.items() if term.weight > 0)
    r = results
    lines = [
        f"# Run `{config.name}` (detection)",
        "",
        f"- detector: `{config.detection.model.get('name', 'tiny')}`, loss: {terms}, labels: "
        f"{config.labels.path or 'none'} (permute: {config.labels.permute})",
        f"- {config.train.epochs} epochs, batch {config.train.batch_size}, {config.optim.name} lr {config.optim.lr:g}, "
        f"{config.schedule.name} schedule, seed {config.train.seed}",
        "",
        "| checkpoint | epoch | val mAP | test mAP | test mAP50 | test mAP75 |",
        "|---|---|---|---|---|---|",
        f"| best on validation | {r['best_epoch']} | {r['val_map_best']:.2f} | {r['test_map_best']:.2f} | "
        f"{r['test_map50_best']:.2f} | {r['test_map75_best']:.2f} |",
        f"| last | {config.train.epochs} | {r['val_map_last']:.2f} | {r['test_map_last']:.2f} | {r['test_map50_last']:.2f} | "
        f"{r['test_map75_last']:.2f} |",
        "",
        "COCO box mAP from boxes and class scores only; the checkpoint is chosen on the validation split, never on test.",
    ]
    agreement = r.get("aspect_agreement_best")
    if agreement:
        lines += ["", f"Aspect head vs teacher on {agreement['num_boxes']} labelled test boxes (their region features): "
                      f"mean per-question correlation {agreement['mean_correlation']:.3f}, mean |p_student − p_teacher| "
                      f"{agreement['mean_abs_error']:.3f}."]
    lines += ["", "![training curves](curves.png)", ""]
    write_text(run / "report.md", "\n".join(lines))
