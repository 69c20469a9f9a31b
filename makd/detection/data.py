"""Detection data: a COCO reader (images folder + instances JSON) and the embedded offline default, seeded canvases
of Fashion-MNIST items written as COCO JSON + PNGs, so that one reader serves both.

A split keeps, per image, the COCO image id, the file, its size, and the non-crowd boxes (x1, y1, x2, y2) with
contiguous class labels (0..C-1 in the order of the category ids) and their annotation ids — the box's sample id
in the label store is `<image id>/<annotation id>`. Crowd boxes are dropped from training; evaluation treats them
as COCO does (detections on them are ignored).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from makd.atomic import atomic_folder, read_json, write_json
from makd.cache import cache_dir
from makd.config import Config, DetectionConfig
from makd.data.base import load_image
from makd.data.fashion_mnist import load_fashion_mnist
from makd.errors import MakdError
from makd.registry import Registry

Splits = dict[str, "DetectionSplit"]
DETECTION_DATASETS: Registry[Callable[[Config], Splits]] = Registry(
    "detection dataset", "detection.dataset", modules=("makd.detection.data",))


@dataclass
class DetectionSplit:
    name: str
    image_ids: list[int]
    paths: list[Path]
    sizes: list[tuple[int, int]]  # (height, width) as the JSON says
    boxes: list[np.ndarray]  # [n, 4] float32 x1 y1 x2 y2, non-crowd
    labels: list[np.ndarray]  # [n] int64 in 0..C-1
    ann_ids: list[np.ndarray]  # [n] int64
    class_names: list[str]
    category_ids: list[int]  # COCO category id of each contiguous label
    crowd: list[np.ndarray] = field(default_factory=list)  # [m, 4] crowd boxes (evaluation only)
    crowd_labels: list[np.ndarray] = field(default_factory=list)  # [m]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.crowd:
            self.crowd = [np.zeros((0, 4), np.float32) for _ in self.image_ids]
            self.crowd_labels = [np.zeros(0, np.int64) for _ in self.image_ids]

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_boxes(self) -> int:
        return int(sum(len(b) for b in self.boxes))

    def image(self, i: int) -> Image.Image:
        return load_image(self.paths[i])

    def box_ids(self, i: int) -> list[str]:
        """Label-store sample ids of image i's boxes."""
        return [f"{self.image_ids[i]}/{a}" for a in self.ann_ids[i].tolist()]

    def all_box_ids(self) -> list[str]:
        return [sid for i in range(len(self)) for sid in self.box_ids(i)]

    def box_offsets(self) -> np.ndarray:
        """Row of image i's first box in the flattened box list (length len + 1)."""
        return np.concatenate([[0], np.cumsum([len(b) for b in self.boxes])]).astype(np.int64)

    def subset(self, indices: Sequence[int], name: str | None = None) -> "DetectionSplit":
        idx = [int(i) for i in indices]
        return DetectionSplit(name or self.name, [self.image_ids[i] for i in idx], [self.paths[i] for i in idx],
                              [self.sizes[i] for i in idx], [self.boxes[i] for i in idx], [self.labels[i] for i in idx],
                              [self.ann_ids[i] for i in idx], self.class_names, self.category_ids,
                              [self.crowd[i] for i in idx], [self.crowd_labels[i] for i in idx], dict(self.info))


# -- COCO ---------------------------------------------------------------------------------------------------
def _number(value: Any) -> bool:
    """A finite JSON number: Python's json reads NaN and Infinity, which no box or size may hold."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_coco(images: str | Path, annotations: str | Path, name: str) -> DetectionSplit:
    """A COCO instances file and its images folder; bad rows are one-line errors naming the file and the ids."""
    images, annotations = Path(images), Path(annotations)
    data = read_json(annotations, "COCO annotations")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise MakdError(f"{annotations}: not a COCO instances file (needs lists images, annotations, categories)")
    categories = sorted(data["categories"], key=lambda c: c.get("id", 0) if isinstance(c, dict) else 0)
    for c in categories:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise MakdError(f"{annotations}: category {c!r} needs an integer id and a name")
    category_ids = [c["id"] for c in categories]
    twice = sorted({cid for cid in category_ids if category_ids.count(cid) > 1})
    if twice:
        raise MakdError(f"{annotations}: category id {twice[0]} appears twice")
    label_of = {cid: k for k, cid in enumerate(category_ids)}
    rows: dict[int, int] = {}
    image_ids, paths, sizes = [], [], []
    for img in data["images"]:
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or not isinstance(img.get("file_name"), str) \
                or not isinstance(img.get("height"), int) or not isinstance(img.get("width"), int) \
                or img["height"] < 1 or img["width"] < 1:
            raise MakdError(f"{annotations}: image {str(img)[:80]} needs integer id, height and width >= 1, and a "
                            "file_name")
        if img["id"] in rows:
            raise MakdError(f"{annotations}: image id {img['id']} appears twice")
        rows[img["id"]] = len(image_ids)
        image_ids.append(img["id"])
        paths.append(images / img["file_name"])
        sizes.append((img["height"], img["width"]))
    boxes: list[list] = [[] for _ in image_ids]
    labels: list[list] = [[] for _ in image_ids]
    ann_ids: list[list] = [[] for _ in image_ids]
    crowd: list[list] = [[] for _ in image_ids]
    crowd_labels: list[list] = [[] for _ in image_ids]
    seen: set[int] = set()
    dropped = 0
    for ann in data["annotations"]:
        aid = ann.get("id") if isinstance(ann, dict) else None
        if not isinstance(aid, int):
            raise MakdError(f"{annotations}: annotation {str(ann)[:80]} has no integer id")
        where = f"{annotations}: annotation {aid} (image {ann.get('image_id')})"
        if aid in seen:
            raise MakdError(f"{where}: annotation id appears twice")
        seen.add(aid)
        row = rows.get(ann.get("image_id"))
        if row is None:
            raise MakdError(f"{where}: no image with this id")
        if ann.get("category_id") not in label_of:
            raise MakdError(f"{where}: unknown category_id {ann.get('category_id')!r}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0:
            raise MakdError(f"{where}: bbox must be [x, y, width, height] of finite numbers with width, height >= 0, "
                            f"got {bbox!r}")
        h, w = sizes[row]
        x1, y1 = min(max(bbox[0], 0.0), w), min(max(bbox[1], 0.0), h)
        x2, y2 = min(max(bbox[0] + bbox[2], 0.0), w), min(max(bbox[1] + bbox[3], 0.0), h)
        if ann.get("iscrowd", 0):
            crowd[row].append((x1, y1, x2, y2))
            crowd_labels[row].append(label_of[ann["category_id"]])
            continue
        if x2 - x1 < 1e-3 or y2 - y1 < 1e-3:  # empty once clipped to the image (COCO has a few): nothing to learn
            dropped += 1
            continue
        boxes[row].append((x1, y1, x2, y2))
        labels[row].append(label_of[ann["category_id"]])
        ann_ids[row].append(aid)
    def as_boxes(rows_: list) -> list[np.ndarray]:
        return [np.asarray(r, np.float32).reshape(-1, 4) for r in rows_]
    return DetectionSplit(name, image_ids, paths, sizes, as_boxes(boxes), [np.asarray(r, np.int64) for r in labels],
                          [np.asarray(r, np.int64) for r in ann_ids], [c["name"] for c in categories], category_ids,
                          as_boxes(crowd), [np.asarray(r, np.int64) for r in crowd_labels], {"dataset": "coco", "annotations": str(annotations), "images": str(images),
                                            "dropped_empty_boxes": dropped})


def coco_ground_truth(split: DetectionSplit) -> dict[str, Any]:
    """The split as an in-memory COCO instances dict (boxes xywh; crowd boxes with iscrowd = 1)."""
    annotations = []
    crowd_id = -1
    for i, image_id in enumerate(split.image_ids):
        for box, label, aid in zip(split.boxes[i].tolist(), split.labels[i].tolist(), split.ann_ids[i].tolist()):
            annotations.append(_annotation(aid, image_id, split.category_ids[label], box, 0))
        for box, label in zip(split.crowd[i].tolist(), split.crowd_labels[i].tolist()):
            annotations.append(_annotation(crowd_id, image_id, split.category_ids[label], box, 1))
            crowd_id -= 1
    return {"images": [{"id": image_id, "file_name": split.paths[i].name, "height": split.sizes[i][0],
                        "width": split.sizes[i][1]} for i, image_id in enumerate(split.image_ids)],
            "annotations": annotations,
            "categories": [{"id": cid, "name": n} for cid, n in zip(split.category_ids, split.class_names)]}


def _annotation(aid: int, image_id: int, category_id: int, box: list[float], crowd: int) -> dict[str, Any]:
    x1, y1, x2, y2 = box
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd}


# -- the offline default: canvases of Fashion-MNIST items -------------------------------------------------------
CANVAS_DEFAULTS: dict[str, Any] = {"train": 300, "val": 100, "test": 200, "size": 128, "min_items": 1, "max_items": 4,
                                   "min_item": 28, "max_item": 56, "max_iou": 0.1, "seed": 0}
CANVAS_FORMAT = "makd.canvases/2"  # 2: image and annotation ids unique across the splits
# Items come from disjoint pools: training and validation canvases from the Fashion-MNIST training split, test
# canvases from its test split.
POOLS = {"train": ("train", 0, 50000), "val": ("train", 50000, 60000), "test": ("test", 0, 10000)}


def canvas_options(config: DetectionConfig) -> dict[str, Any]:
    unknown = sorted(set(config.canvases) - set(CANVAS_DEFAULTS))
    if unknown:
        raise MakdError(f"detection.canvases: unknown option {unknown[0]!r} (options: {', '.join(CANVAS_DEFAULTS)})")
    opts = {**CANVAS_DEFAULTS, **config.canvases}
    for key, value in opts.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise MakdError(f"detection.canvases.{key}: must be a number >= 0, got {value!r}")
    if not (1 <= opts["min_items"] <= opts["max_items"]) or not (4 <= opts["min_item"] <= opts["max_item"] <= opts["size"]):
        raise MakdError("detection.canvases: need 1 <= min_items <= max_items and 4 <= min_item <= max_item <= size")
    return opts


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a with each row of b (x1 y1 x2 y2)."""
    w = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = w * h
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
    return inter / (area(a) + area(b) - inter)


def make_canvases(items: np.ndarray, item_labels: np.ndarray, count: int, opts: dict[str, Any],
                  rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """`count` grey canvases with 1..max_items resized items each (little overlap), and their tight boxes and labels."""
    size = int(opts["size"])
    canvases = np.zeros((count, size, size), np.uint8)
    all_boxes, all_labels = [], []
    for n in range(count):
        boxes: list[np.ndarray] = []
        labels: list[int] = []
        for _ in range(int(rng.integers(opts["min_items"], opts["max_items"] + 1))):
            k = int(rng.integers(len(items)))
            side = int(rng.integers(opts["min_item"], opts["max_item"] + 1))
            item = np.asarray(Image.fromarray(items[k]).resize((side, side), Image.BILINEAR))
            rows, cols = np.flatnonzero(item.max(1) > 16), np.flatnonzero(item.max(0) > 16)
            for _attempt in range(30):
                x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
                box = np.array([x + cols[0], y + rows[0], x + cols[-1] + 1, y + rows[-1] + 1], np.float32)
                if not boxes or _iou(box, np.stack(boxes)).max() < opts["max_iou"]:
                    region = canvases[n, y:y + side, x:x + side]
                    np.maximum(region, item, out=region)
                    boxes.append(box)
                    labels.append(int(item_labels[k]))
                    break
        all_boxes.append(np.stack(boxes) if boxes else np.zeros((0, 4), np.float32))
        all_labels.append(np.asarray(labels, np.int64))
    return canvases, all_boxes, all_labels


def write_coco(root: Path, split: str, images: np.ndarray, boxes: list[np.ndarray], labels: list[np.ndarray],
               class_names: list[str], first_id: int = 1) -> None:
    """PNGs in root/<split>/ and root/annotations/instances_<split>.json; image and annotation ids count from
    `first_id` (give each split its own range: box sample ids `<image id>/<annotation id>` must be unique, as COCO's are)."""
    (root / split).mkdir(parents=True, exist_ok=True)
    records, ann_ids, aid = [], [], first_id
    for i, img in enumerate(images):
        Image.fromarray(img).save(root / split / f"{first_id + i:07d}.png")
        records.append(first_id + i)
        ann_ids.append(np.arange(aid, aid + len(boxes[i]), dtype=np.int64))
        aid += len(boxes[i])
    h, w = images.shape[1:3]
    gt = DetectionSplit(split, records, [root / split / f"{i:07d}.png" for i in records], [(h, w)] * len(records),
                        boxes, labels, ann_ids, class_names, list(range(1, len(class_names) + 1)))
    write_json(root / "annotations" / f"instances_{split}.json", coco_ground_truth(gt))


def default_canvas_root(opts: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps([CANVAS_FORMAT, opts], sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / f"canvases-{key}"


def ensure_canvases(config: Config) -> Path:
    """The canvases folder for this config, generated (into a temporary folder, then renamed) if missing."""
    opts = canvas_options(config.detection)
    root = Path(config.detection.root) if config.detection.root else default_canvas_root(opts)
    manifest = {"format": CANVAS_FORMAT, "options": opts, "fashion_mnist": str(config.data.root or "default")}
    if (root / "canvases.json").is_file():
        found = read_json(root / "canvases.json", "canvas manifest")
        if found.get("options") != opts or found.get("format") != CANVAS_FORMAT:
            raise MakdError(f"detection.root {root} holds canvases made with other options ({found.get('options')}): "
                            "use another folder")
        return root
    if root.exists() and any(root.iterdir()):
        raise MakdError(f"detection.root {root} is not empty and holds no canvases.json: use another folder")
    with atomic_folder(root) as tmp:
        sources = {s: load_fashion_mnist(s, config.data.root) for s in ("train", "test")}
        for split in ("train", "val", "test"):
            source, start, stop = POOLS[split]
            items = sources[source]
            rng = np.random.default_rng([int(opts["seed"]), list(POOLS).index(split)])
            canvases, boxes, labels = make_canvases(items.array[start:stop], items.targets[start:stop], int(opts[split]),
                                                    opts, rng)
            write_coco(tmp, split, canvases, boxes, labels, items.class_names, first_id=1 + 1_000_000 * list(POOLS).index(split))
        write_json(tmp / "canvases.json", manifest)
    return root


@DETECTION_DATASETS.register("canvases")
def read_canvases(config: Config) -> Splits:
    root = ensure_canvases(config)
    return {s: read_coco(root / s, root / "annotations" / f"instances_{s}.json", s) for s in ("train", "val", "test")}


@DETECTION_DATASETS.register("coco")
def read_coco_splits(config: Config) -> Splits:
    """train (+ val, or val_holdout images held out of train, seeded by data.split_seed) + test."""
    d = config.detection
    if not (d.train_images and d.train_annotations):
        raise MakdError("detection.train_images and detection.train_annotations: both are needed for dataset coco")
    splits = {"train": read_coco(d.train_images, d.train_annotations, "train")}
    for name in ("val", "test"):
        images, annotations = getattr(d, f"{name}_images"), getattr(d, f"{name}_annotations")
        if annotations:
            splits[name] = read_coco(images or Path(annotations).parent, annotations, name)
    if "val" not in splits:
        train = splits["train"]
        if d.val_holdout >= len(train):
            raise MakdError(f"detection.val_holdout {d.val_holdout}: the training set has only {len(train)} images")
        rng = np.random.default_rng([config.data.split_seed, 0x7A1])
        held = np.sort(rng.choice(len(train), d.val_holdout, replace=False))
        splits["val"] = train.subset(held, "val")
        splits["train"] = train.subset(np.setdiff1d(np.arange(len(train)), held), "train")
    for name, split in splits.items():
        if split.class_names != splits["train"].class_names:
            raise MakdError(f"detection: the {name} annotations have other categories than the training ones")
    return splits


def build_detection_splits(config: Config) -> Splits:
    return DETECTION_DATASETS.get(config.detection.dataset)(config)


def describe_detection_splits(splits: Splits) -> dict[str, Any]:
    """What splits.json records: images, boxes and boxes per class of each split, and the image ids."""
    out = {}
    for name, split in splits.items():
        counts = np.bincount(np.concatenate(split.labels) if split.num_boxes else np.zeros(0, np.int64),
                             minlength=split.num_classes).tolist()
        out[name] = {"num_images": len(split), "num_boxes": split.num_boxes,
                     "boxes_per_class": dict(zip(split.class_names, counts)), "image_ids": split.image_ids,
                     "source": split.info}
    return out
