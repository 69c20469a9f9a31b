"""COCO box mAP (@[.5:.95]), mAP50 and mAP75, in percent, from class scores and boxes only (aspect logits never
enter). Two backends, checked against each other in the tests:

- `faster_coco_eval`: the split's ground truth and the detections as COCO JSON (in memory), COCOeval_faster;
- `torchmetrics`: `MeanAveragePrecision` from tensors (its own conversion to COCO; its faster_coco_eval engine, as
  pycocotools is not installed — give `backend="pycocotools"` where it is).

Crowd boxes are ground truth with iscrowd = 1 in both: detections on them are neither true nor false positives.
Areas are box areas (makd keeps no masks), which only matters for the small/medium/large breakdown.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch

from makd.detection.data import DetectionSplit, coco_ground_truth

Detections = list[dict[str, np.ndarray]]  # per image: boxes [n, 4] xyxy, scores [n], labels [n] in 0..C-1


def coco_results(split: DetectionSplit, detections: Detections) -> list[dict[str, Any]]:
    out = []
    for image_id, det in zip(split.image_ids, detections):
        for (x1, y1, x2, y2), score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            out.append({"image_id": image_id, "category_id": split.category_ids[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": score})
    return out


def _empty(split: DetectionSplit) -> dict[str, float] | None:
    if split.num_boxes == 0:
        return {"map": float("nan"), "map50": float("nan"), "map75": float("nan")}
    return None


def map_faster_coco_eval(split: DetectionSplit, detections: Detections) -> dict[str, float]:
    from faster_coco_eval import COCO, COCOeval_faster

    if (empty := _empty(split)) is not None:
        return empty
    results = coco_results(split, detections)
    if not results:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(coco_ground_truth(split))
        evaluator = COCOeval_faster(gt, gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"map": 100.0 * float(stats[0]), "map50": 100.0 * float(stats[1]), "map75": 100.0 * float(stats[2])}


def map_torchmetrics(split: DetectionSplit, detections: Detections, backend: str = "faster_coco_eval") -> dict[str, float]:
    from torchmetrics.detection import MeanAveragePrecision

    if (empty := _empty(split)) is not None:
        return empty
    # COCO's own thresholds (float64): torchmetrics' float32 defaults move recall points that fall exactly on them.
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=backend,
                                  iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
                                  rec_thresholds=np.linspace(0.0, 1.0, 101).tolist())
    cats = np.asarray(split.category_ids, np.int64)
    preds, targets = [], []
    for i, det in enumerate(detections):
        preds.append({"boxes": torch.as_tensor(det["boxes"], dtype=torch.float32).reshape(-1, 4),
                      "scores": torch.as_tensor(det["scores"], dtype=torch.float32),
                      "labels": torch.as_tensor(cats[det["labels"]], dtype=torch.int64)})
        boxes = np.concatenate([split.boxes[i], split.crowd[i]])
        labels = np.concatenate([split.labels[i], split.crowd_labels[i]])
        targets.append({"boxes": torch.from_numpy(boxes).float().reshape(-1, 4), "labels": torch.from_numpy(cats[labels]),
                        "iscrowd": torch.tensor([0] * len(split.boxes[i]) + [1] * len(split.crowd[i]), dtype=torch.int64)})
    metric.update(preds, targets)
    with contextlib.redirect_stdout(io.StringIO()):
        result = metric.compute()
    return {"map": 100.0 * float(result["map"]), "map50": 100.0 * float(result["map_50"]),
            "map75": 100.0 * float(result["map_75"])}


BACKENDS = {"faster_coco_eval": map_faster_coco_eval, "torchmetrics": map_torchmetrics}


def box_map(split: DetectionSplit, detections: Detections, backend: str = "faster_coco_eval") -> dict[str, float]:
    return BACKENDS[backend](split, detections)
