"""Evaluation on class logits only; the aspect head is judged separately, against the teacher."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.fx.experimental.optimization import fuse
from torch.utils.data import DataLoader

from makd.config import Config, load_config, relocate, to_dict
from makd.data import build_splits
from makd.data.base import ImageSplit, loader_workers
from makd.data.transforms import InputSpec, SplitDataset, build_transform
from makd.errors import MakdError
from makd.labels import LabelStore
from makd.models import Student, load_student
from makd.models.stacked import StackedStudent

log = logging.getLogger("makd.evaluate")


@dataclass
class Predictions:
    class_logits: np.ndarray  # [N, C]
    aspect_logits: np.ndarray | None  # [N, Q]
    targets: np.ndarray  # [N]


def _alone(value: Any) -> list[Any]:
    return [value]


@dataclass(frozen=True)
class Shard:
    """This process's part of an evaluation (DDP): the batches `rank, rank + world, ...` of the one-process order, and
    `gather`, which returns every process's value in rank order (the training loop passes its all-gather). Each
    process evaluates exactly the batches one process would — no padding, no sample twice, the same batch
    compositions — so N processes give the one-process numbers to the bit."""

    rank: int = 0
    world: int = 1
    gather: Callable[[Any], list[Any]] = _alone

    def batches(self, count: int, batch_size: int) -> list[list[int]]:
        every = [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]
        return every[self.rank::self.world]

    def in_order(self, mine: list[Any]) -> list[Any]:
        """Every process's per-batch values (`mine`: this process's, one per batch of `batches`), in batch order."""
        parts = self.gather(mine)
        total = sum(len(p) for p in parts)
        return [parts[k % self.world][k // self.world] for k in range(total)]


ONE_PROCESS = Shard()


def predict(model: Student, split: ImageSplit, spec: InputSpec, batch_size: int = 512, device: str | torch.device = "cpu",
            channels_last: bool = False, num_workers: int = 0, shard: Shard = ONE_PROCESS) -> Predictions:
    return _predict(model, None, split, spec, batch_size, device, channels_last, num_workers, shard)[0]


def predict_members(stacked: StackedStudent, split: ImageSplit, spec: InputSpec, batch_size: int = 512,
                    device: str | torch.device = "cpu", num_workers: int = 0) -> list[Predictions]:
    """Each member of a stacked student on the same images, in one pass (what seed batches validate and test with)."""
    return _predict(stacked, stacked.members, split, spec, batch_size, device, False, num_workers, ONE_PROCESS)


@torch.inference_mode()
def _predict(model: torch.nn.Module, members: int | None, split: ImageSplit, spec: InputSpec, batch_size: int,
             device: str | torch.device, channels_last: bool, num_workers: int, shard: Shard) -> list[Predictions]:
    """Images are decoded and transformed in `num_workers` loader processes, ahead of the model."""
    device = torch.device(device)
    batches = shard.batches(len(split), batch_size)
    loader = DataLoader(SplitDataset(split, build_transform(spec, train=False), spec), batch_sampler=batches,
                        num_workers=num_workers if batches else 0, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    net = fold_batch_norms(model)
    outputs = []  # per batch: (class logits [K, B, C], aspect logits [K, B, Q] or None)
    for x, _, _ in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = net(x) if members is None else net(x.unsqueeze(0).expand(members, *x.shape))
        lead = (lambda t: t.unsqueeze(0)) if members is None else (lambda t: t)  # [K, B, ...] either way
        aspects = None if out.aspect_logits is None else lead(out.aspect_logits).float().cpu().numpy()
        outputs.append((lead(out.class_logits).float().cpu().numpy(), aspects))
    model.train(was_training)
    outputs = shard.in_order(outputs)
    classes = np.concatenate([c for c, _ in outputs], axis=1)
    aspects = np.concatenate([a for _, a in outputs], axis=1) if outputs[0][1] is not None else None
    return [Predictions(classes[k], None if aspects is None else aspects[k], split.targets.copy())
            for k in range(len(classes))]


def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of an eval-mode model with each batch norm folded into the convolution before it: the same outputs
    to float rounding (~1e-7 relative), ~13 % faster on a CPU for the small ResNets. A model torch.fx cannot trace
    (control flow on values) is returned as it is."""
    if not any(type(m) is torch.nn.BatchNorm2d for m in model.modules()):
        return model
    try:
        return fuse(model)
    except Exception as exc:  # noqa: BLE001 — fx raises many kinds; folding is only an optimisation
        log.debug("batch norms not folded (%s: %s)", type(exc).__name__, exc)
        return model


def topk_accuracy(class_logits: np.ndarray, targets: np.ndarray, k: int = 1) -> float:
    """Percentage of samples whose label is among the k highest class logits."""
    k = min(k, class_logits.shape[1])
    topk = np.argpartition(-class_logits, k - 1, axis=1)[:, :k]
    return float(100.0 * np.mean(np.any(topk == targets[:, None], axis=1)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def pearson_per_column(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correlation of matching columns; NaN where either column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(axis=0) / denom, np.nan)


def expected_calibration_error(class_logits: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): |accuracy - confidence| of the top class, averaged over equal-width confidence bins
    weighted by their share of samples; in percent, like the accuracies."""
    z = class_logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    confidence, correct = p.max(axis=1), p.argmax(axis=1) == targets
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # bins (lo, hi]
    ece = 0.0
    for b in np.unique(which):
        members = which == b
        ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(100.0 * ece)


def auroc_per_column(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Area under the ROC curve of each column (Mann-Whitney, ties averaged); NaN where a column has one class."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=0)
    n_pos = positive.sum(axis=0).astype(np.float64)
    n_neg = len(positive) - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * positive).sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


@dataclass
class AspectAgreement:
    """Per-question agreement of the student's aspect probabilities with the teacher's."""

    correlation: np.ndarray  # [Q] Pearson r
    mean_abs_error: np.ndarray  # [Q]
    auroc: np.ndarray  # [Q] student logits ranking the teacher's yes (p > 0.5) above its no; NaN if all one answer
    summary: dict = field(default_factory=dict)


def aspect_agreement(aspect_logits: np.ndarray, teacher_logodds: np.ndarray) -> AspectAgreement:
    student, teacher = sigmoid(aspect_logits.astype(np.float64)), sigmoid(teacher_logodds.astype(np.float64))
    corr = pearson_per_column(student, teacher)
    mae = np.abs(student - teacher).mean(axis=0)
    auroc = auroc_per_column(aspect_logits.astype(np.float64), teacher_logodds > 0)
    scored = int(np.isfinite(auroc).sum())
    return AspectAgreement(corr, mae, auroc, {"mean_correlation": float(np.nanmean(corr)), "mean_abs_error": float(mae.mean()),
                                              "mean_auroc": float(np.nanmean(auroc)) if scored else None,
                                              "auroc_questions": scored})


def nan_to_none(values: np.ndarray, digits: int = 4) -> list[float | None]:
    """JSON-safe list: NaN (a constant question) becomes null."""
    return [None if not np.isfinite(v) else round(float(v), digits) for v in values]


def class_metrics(preds: Predictions) -> dict[str, float]:
    """Top-1, top-5 and calibration of the class logits (the aspect logits never enter)."""
    return {"top1": topk_accuracy(preds.class_logits, preds.targets, 1), "top5": topk_accuracy(preds.class_logits, preds.targets, 5),
            "ece": expected_calibration_error(preds.class_logits, preds.targets)}


def aspect_report(aspect_logits: np.ndarray, teacher_logodds: np.ndarray) -> dict:
    """What a run and `makd evaluate` record about the aspect head: the summary and per-question lists."""
    agreement = aspect_agreement(aspect_logits, teacher_logodds)
    return {**agreement.summary, "num_images": int(len(aspect_logits)),
            "per_question_correlation": nan_to_none(agreement.correlation),
            "per_question_auroc": nan_to_none(agreement.auroc)}


@dataclass
class Evaluation:
    metrics: dict  # top1, top5, ece (class logits only) and, when teacher rows exist, "aspects": aspect_report(...)
    predictions: Predictions


def evaluate_student(model: Student, spec: InputSpec, split: ImageSplit, teacher: LabelStore | None = None, *,
                     batch_size: int = 256, device: str | torch.device = "cpu", channels_last: bool = False,
                     num_workers: int = 0, shard: Shard = ONE_PROCESS) -> Evaluation:
    """The one way makd scores a student on a split: class metrics, and the aspect head against the teacher's
    answers on the samples the label store covers (a subset is enough). Used by training (every DDP process
    predicts its `shard`; every process gets the whole split's numbers), `makd evaluate` and the demo."""
    preds = predict(model, split, spec, batch_size, device, channels_last, num_workers, shard)
    return Evaluation(score_predictions(preds, split, teacher), preds)


def score_predictions(preds: Predictions, split: ImageSplit, teacher: LabelStore | None = None) -> dict:
    """Class metrics of predictions on `split` and, where the label store has rows, the aspect head's agreement."""
    metrics: dict = {"split": split.name, "num_images": len(split), **class_metrics(preds)}
    if preds.aspect_logits is not None and teacher is not None:
        positions, logodds, _ = teacher.available(split.sample_ids)
        if len(positions):
            metrics["aspects"] = aspect_report(preds.aspect_logits[positions], logodds)
    return metrics


def _check_data_found(config: Config, missing: dict[str, list[str]], model_path: str) -> None:
    """One line naming every place a moved dataset was looked for (unless an override says where it is now)."""
    resolved = to_dict(config)["data"]
    for key, looked in missing.items():
        if key.startswith("data.") and resolved[key.removeprefix("data.")] == looked[0]:
            raise MakdError(f"{key}: not found (looked in {' and '.join(looked)}): the data {model_path} was trained "
                            f"on is not where it was; say where it is now with {key}=...")


def _open_store(looked: list[str], question_set_hash: str) -> LabelStore:
    """The label store at the first of `looked` (a recorded path, then the same place relative to the model)."""
    found = next((p for p in looked if Path(p).is_dir()), None)
    if found is None:
        raise MakdError(f"label store not found (looked in {' and '.join(dict.fromkeys(looked))}): give --labels "
                        "<folder> (or labels.path=...) to score the aspect head against the teacher")
    store = LabelStore.open(found)
    if store.meta["question_set_hash"] != question_set_hash:
        raise MakdError(f"label store {found} is for question set {store.meta['question_set_hash']}, "
                        f"the model's aspect head for {question_set_hash}: give --labels the store it was trained with")
    return store


def evaluate_file(model_path: str, split: str = "test", labels: str | None = None,
                  overrides: list[str] | None = None) -> dict:
    """Evaluate a student file, or a run folder's best-on-validation and last students, on a split of its data."""
    path = Path(model_path)
    if path.is_dir():
        files = {which: path / f"{which}.safetensors" for which in ("best", "last")}
        if not files["best"].is_file():
            raise MakdError(f"{path} holds no best.safetensors: not a finished makd run folder")
        return {which: evaluate_file(str(f), split, labels, overrides) for which, f in files.items() if f.is_file()}
    model, meta = load_student(model_path)
    base, missing = relocate(meta["config"], meta.get("paths", {}), path.absolute().parent)
    config = load_config(base=base, overrides=overrides)
    _check_data_found(config, missing, model_path)
    data = build_splits(config.data, needed=(split,))[split]
    if data.class_names != meta["classes"]:
        raise MakdError(f"{model_path} was trained on classes {meta['classes'][:3]}..., the data has {data.class_names[:3]}...")
    store = None
    if model.aspect_head is not None and (labels or config.labels.path):
        looked = [labels] if labels else [config.labels.path, *missing.get("labels.path", [])[1:]]
        store = _open_store(looked, meta["question_set_hash"])
    result = evaluate_student(model, InputSpec(**meta["input"]), data, store, batch_size=config.train.eval_batch_size,
                              num_workers=loader_workers(config.data.num_workers, data.array is not None, "cpu"))
    report = {"model": str(model_path), "epoch": meta.get("epoch"), **result.metrics}
    if "aspects" in report:
        report["aspects"]["questions"] = [q["text"] for q in meta["questions"]]
    return report
