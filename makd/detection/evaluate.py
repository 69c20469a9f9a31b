"""Detection evaluation: COCO mAP from class scores and boxes only; the aspect head is judged separately, on the
ground-truth boxes the teacher answered about (their region features), against the teacher's rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection import FasterRCNN

from makd.config import load_config
from makd.data.base import loader_workers
from makd.detection.data import DetectionSplit, build_detection_splits
from makd.detection.metrics import Detections, box_map
from makd.detection.model_file import load_detector
from makd.detection.models import aspect_module, ground_truth_aspects
from makd.detection.pipeline import load_tensor
from makd.errors import MakdError
from makd.evaluate import ONE_PROCESS, Shard, aspect_report
from makd.labels import LabelStore


class SplitImages(Dataset):
    """A split's images as uint8 [C, H, W] in the model's channels, decoded in loader processes."""

    def __init__(self, split: DetectionSplit, in_chans: int) -> None:
        self.split, self.in_chans = split, in_chans

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> Tensor:
        return load_tensor(self.split, i, self.in_chans)


def _as_list(items: list[Tensor]) -> list[Tensor]:
    return items


@torch.inference_mode()
def detect(model: nn.Module, split: DetectionSplit, in_chans: int, batch_size: int = 16, device: str | torch.device = "cpu",
           box_aspects: bool = False, workers: int = 0, shard: Shard = ONE_PROCESS) -> tuple[Detections, np.ndarray | None]:
    """Detections per image (labels 0..C-1, numpy) and, with `box_aspects`, the aspect logits of every ground-truth
    box in the split's flattened box order. Images are decoded in `workers` loader processes; under DDP each process
    detects its `shard` of the batches and every process gets the whole split's results."""
    device = torch.device(device)
    batches = shard.batches(len(split), batch_size)
    loader = DataLoader(SplitImages(split, in_chans), batch_sampler=batches, collate_fn=_as_list,
                        num_workers=workers if batches else 0, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    outputs = []  # per batch: (detections, ground-truth box aspects)
    for idx, loaded in zip(batches, loader):
        images = [x.to(device, non_blocking=True).float().div_(255.0) for x in loaded]
        detections = []
        for out in model(images):
            keep = out["labels"] > 0  # FCOS may score the never-trained background class 0
            detections.append({k: v[keep].float().cpu().numpy() if k != "labels" else (v[keep] - 1).cpu().numpy()
                               for k, v in out.items()})
        aspects = []
        if box_aspects:
            boxes = [torch.from_numpy(split.boxes[i]).to(device) for i in idx]
            aspects = [a.float().cpu().numpy() for a in ground_truth_aspects(model, images, boxes)]
        outputs.append((detections, aspects))
    model.train(was_training)
    outputs = shard.in_order(outputs)
    detections = [d for batch, _ in outputs for d in batch]
    return detections, (np.concatenate([a for _, batch in outputs for a in batch]) if box_aspects else None)


def evaluate_detector(model: nn.Module, meta: dict[str, Any], split: DetectionSplit, store: LabelStore | None = None, *,
                      batch_size: int = 16, device: str | torch.device = "cpu", backend: str = "faster_coco_eval",
                      workers: int = 0, shard: Shard = ONE_PROCESS) -> tuple[dict[str, Any], Detections]:
    """The one way makd scores a detector on a split: mAP, mAP50, mAP75 (%) and, when the label store has rows
    for the split's boxes and the detector has an aspect head on RoI features, the head's agreement with them."""
    gt_aspects = store is not None and aspect_module(model) is not None and isinstance(model, FasterRCNN)
    detections, aspects = detect(model, split, meta["input"]["in_chans"], batch_size, device, gt_aspects, workers, shard)
    metrics: dict[str, Any] = {"split": split.name, "num_images": len(split), "num_boxes": split.num_boxes,
                               **box_map(split, detections, backend)}
    if aspects is not None:
        positions, logodds, _ = store.available(split.all_box_ids())
        if len(positions):
            metrics["aspects"] = {**aspect_report(aspects[positions], logodds), "num_boxes": int(len(positions))}
    return metrics, detections


def evaluate_detector_file(model_path: str, split: str = "test", labels: str | None = None,
                           overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate a detector file, or a run folder's best-on-validation and last detectors, on a split of its data."""
    path = Path(model_path)
    if path.is_dir():
        files = {which: path / f"{which}.safetensors" for which in ("best", "last")}
        return {which: evaluate_detector_file(str(f), split, labels, overrides) for which, f in files.items() if f.is_file()}
    model, meta = load_detector(path)
    config = load_config(base=meta["config"], overrides=overrides)
    data = build_detection_splits(config)[split]
    if data.class_names != meta["classes"]:
        raise MakdError(f"{model_path} was trained on classes {meta['classes'][:3]}..., the data has {data.class_names[:3]}...")
    store = None
    store_path = labels or config.labels.path
    if meta["questions"] and store_path and Path(store_path).is_dir():
        store = LabelStore.open(store_path)
        if store.meta["question_set_hash"] != meta["question_set_hash"]:
            raise MakdError(f"label store {store_path} is for question set {store.meta['question_set_hash']}, "
                            f"the model's aspect head for {meta['question_set_hash']}")
    metrics, _ = evaluate_detector(model, meta, data, store, batch_size=config.train.eval_batch_size,
                                   backend=config.detection.map_backend,
                                   workers=loader_workers(config.data.num_workers, False, "cpu"))
    report = {"model": str(model_path), "epoch": meta.get("epoch"), **metrics}
    if "aspects" in report:
        report["aspects"]["questions"] = [q["text"] for q in meta["questions"]]
    return report
