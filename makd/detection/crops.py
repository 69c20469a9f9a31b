"""Box crops as samples of the existing label store: each ground-truth box (grown by a context margin, at least a
minimum side, clipped to its image) is one sample with id `<image id>/<annotation id>` and its class as target, so
`label_split` — sharding, resume, the merge check, the official JSON — and every teacher work unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from makd.config import Config
from makd.data.base import ImageSplit, load_image, per_class_sample
from makd.detection.data import DetectionSplit, build_detection_splits
from makd.errors import MakdError
from makd.labels import LabelStore, label_from_config


def crop_box(box: np.ndarray, size: tuple[int, int], margin: float, min_side: int) -> tuple[int, int, int, int]:
    """The crop of a box (x1, y1, x2, y2) in an image of (height, width): grown by `margin` of its width/height on each
    side, then to at least `min_side` around its centre, then clipped to the image (integer pixels)."""
    h, w = size
    x1, y1, x2, y2 = (float(v) for v in box)
    bw, bh = x2 - x1, y2 - y1
    x1, x2, y1, y2 = x1 - margin * bw, x2 + margin * bw, y1 - margin * bh, y2 + margin * bh
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w, half_h = max(x2 - x1, min_side) / 2, max(y2 - y1, min_side) / 2
    left, top = max(0, int(np.floor(cx - half_w))), max(0, int(np.floor(cy - half_h)))
    right, bottom = min(w, int(np.ceil(cx + half_w))), min(h, int(np.ceil(cy + half_h)))
    return left, top, max(right, left + 1), max(bottom, top + 1)


@dataclass
class BoxCrops(ImageSplit):
    """An ImageSplit whose samples are crops of images (`paths` repeats each crop's source image)."""

    crops: list[tuple[int, int, int, int]] = field(default_factory=list)
    _cached: tuple[Path, Image.Image] | None = field(default=None, repr=False)

    def image(self, i: int) -> Image.Image:
        path = self.paths[i]
        if self._cached is None or self._cached[0] != path:  # a job walks each image's boxes in a row
            self._cached = (path, load_image(path))
        return self._cached[1].crop(self.crops[i])

    def image_file(self, i: int) -> None:
        return None  # a crop is part of its file: servers get a PNG of the crop (ImageSplit.encoded)


def box_crops(split: DetectionSplit, margin: float, min_side: int, images: np.ndarray | None = None) -> BoxCrops:
    """The crops of every box of the split's images (all images, or `images`), in image then box order."""
    ids, targets, paths, crops = [], [], [], []
    for i in range(len(split)) if images is None else images.tolist():
        for box, label, sid in zip(split.boxes[i], split.labels[i].tolist(), split.box_ids(i)):
            ids.append(sid)
            targets.append(label)
            paths.append(split.paths[i])
            crops.append(crop_box(box, split.sizes[i], margin, min_side))
    info = {**split.info, "split": split.name, "crops": {"margin": margin, "min_side": min_side}}
    return BoxCrops(split.name, ids, np.asarray(targets, np.int64), split.class_names, paths=paths, info=info, crops=crops)


def concat_crops(parts: list[BoxCrops], name: str) -> BoxCrops:
    return BoxCrops(name, [s for p in parts for s in p.sample_ids], np.concatenate([p.targets for p in parts]),
                    parts[0].class_names, paths=[x for p in parts for x in p.paths], info={**parts[0].info, "split": name},
                    crops=[c for p in parts for c in p.crops])


def crops_to_label(config: Config) -> BoxCrops:
    """The boxes of the configured `labels.splits` (train first); `labels.max_per_class` caps boxes per class, drawn
    with a seed, whole images' boxes never split from the store's sample order."""
    splits = build_detection_splits(config)
    d = config.detection
    parts = []
    for name in config.labels.splits:
        crops = box_crops(splits[name], d.crop_margin, d.crop_min_side)
        cap = config.labels.max_per_class.get(name)
        if cap is not None and len(crops):
            rng = np.random.default_rng([config.data.split_seed, 0x1A])
            keep = per_class_sample(crops.targets, cap, rng, at_most=True)
            crops = BoxCrops(name, [crops.sample_ids[k] for k in keep], crops.targets[keep], crops.class_names,
                             paths=[crops.paths[k] for k in keep], info=crops.info, crops=[crops.crops[k] for k in keep])
        parts.append(crops)
    crops = concat_crops(parts, "+".join(config.labels.splits))
    if len(set(crops.sample_ids)) != len(crops):
        seen: set[str] = set()
        twice = next(sid for sid in crops.sample_ids if sid in seen or seen.add(sid))
        raise MakdError(f"labels.splits {config.labels.splits}: box {twice!r} (<image id>/<annotation id>) occurs twice; "
                        "image and annotation ids must be unique across the COCO files, as COCO's own are")
    if not len(crops):
        raise MakdError(f"labels.splits {config.labels.splits}: these splits have no boxes to label")
    return crops


def label_boxes_from_config(config: Config, *, rank: int = 0, world_size: int = 1, overwrite: bool = False) -> LabelStore:
    """`makd label` for `task: detection`: every box crop of the configured splits, answered by the configured
    teacher, into the label store at `labels.path`."""
    return label_from_config(config, rank=rank, world_size=world_size, overwrite=overwrite, samples=crops_to_label)
