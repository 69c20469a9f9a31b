"""Detection training data: per-box targets, augmentations that keep boxes, labels and aspect rows aligned, and the
epoch's batches (aspect-ratio groups, split over DDP processes).

Every random draw is a function of (seed, epoch, image) for augmentation — whichever process or worker loads the
image — and of (seed, epoch) for the order, so a resumed epoch replays exactly and skips trained batches
without loading them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from makd.detection.data import DetectionSplit
from makd.engine.seeding import derive_seed
from makd.errors import MakdError

# Everything with one entry per box travels with the boxes: SanitizeBoundingBoxes filters these along with them.
PER_BOX = ("labels", "aspect_logodds", "aspect_mass", "aspect_weight", "box_index")
AUGMENTATIONS = {
    "hflip": lambda: v2.RandomHorizontalFlip(0.5),
    "zoom_out": lambda: v2.RandomZoomOut(fill=0, side_range=(1.0, 2.0), p=0.5),
    "iou_crop": lambda: v2.RandomIoUCrop(),
    "scale_jitter": lambda: v2.RandomChoice([v2.RandomZoomOut(fill=0, side_range=(1.0, 1.5), p=1.0),
                                             v2.RandomIoUCrop(min_scale=0.6, sampler_options=[0.3, 0.5, 0.7])]),
}


def per_box(sample: tuple[Any, dict[str, Tensor]]) -> tuple[Tensor, ...]:
    target = sample[1]
    return tuple(target[k] for k in PER_BOX if k in target)


def build_augment(names: Sequence[str]) -> v2.Compose | None:
    """The configured augmentations, then the removal of boxes they emptied (with their rows)."""
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise MakdError(f"detection.augment: unknown augmentation {unknown[0]!r} (choose from {', '.join(AUGMENTATIONS)})")
    if not names:
        return None
    return v2.Compose([AUGMENTATIONS[n]() for n in names] + [v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=per_box)])


@dataclass
class BoxTargets:
    """Teacher rows of a split's boxes in flattened box order (image i's boxes at offsets[i]:offsets[i + 1])."""

    logodds: np.ndarray  # [B, Q] float32
    mass: np.ndarray  # [B, Q]
    weight: np.ndarray  # [B, Q] 1 where the label store has the box's answer (and it is not a flagged bound), else 0

    @property
    def num_questions(self) -> int:
        return self.logodds.shape[1]


def image_target(split: DetectionSplit, i: int, offsets: np.ndarray, aspects: BoxTargets | None) -> dict[str, Tensor]:
    """Image i's target as torchvision wants it (labels 1..C: 0 is the background) plus its boxes' aspect rows."""
    target = {"boxes": torch.from_numpy(split.boxes[i].copy()), "labels": torch.from_numpy(split.labels[i] + 1),
              "box_index": torch.arange(offsets[i], offsets[i + 1])}
    if aspects is not None:
        rows = slice(offsets[i], offsets[i + 1])
        target["aspect_logodds"] = torch.from_numpy(aspects.logodds[rows].copy())
        target["aspect_mass"] = torch.from_numpy(aspects.mass[rows].copy())
        target["aspect_weight"] = torch.from_numpy(aspects.weight[rows].copy())
    return target


def load_tensor(split: DetectionSplit, i: int, in_chans: int) -> Tensor:
    """Image i as uint8 [C, H, W] in the model's channels."""
    img = split.image(i)
    mode = "L" if in_chans == 1 else "RGB"
    return TF.pil_to_tensor(img if img.mode == mode else img.convert(mode))


def augment_sample(image: Tensor, target: dict[str, Tensor], augment: v2.Compose | None,
                   seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Apply `augment` with torch's generator seeded by `seed` (restored afterwards); floats in [0, 1] out."""
    if augment is not None:
        h, w = image.shape[-2:]
        sample = (tv_tensors.Image(image),
                  {**target, "boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w))})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image, target = augment(sample)
        image = image.as_subclass(Tensor)
        target = {**target, "boxes": target["boxes"].as_subclass(Tensor)}
    return image.float().div_(255.0), target


class DetectionDataset(Dataset):
    """Items are (image index, epoch): an image's augmentation is seeded by (seed, epoch, index)."""

    def __init__(self, split: DetectionSplit, in_chans: int, augment: v2.Compose | None, aspects: BoxTargets | None,
                 seed: int) -> None:
        self.split, self.in_chans, self.augment, self.aspects, self.seed = split, in_chans, augment, aspects, seed
        self.offsets = split.box_offsets()

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, dict[str, Tensor]]:
        i, epoch = item
        target = image_target(self.split, i, self.offsets, self.aspects)
        return augment_sample(load_tensor(self.split, i, self.in_chans), target, self.augment,
                              derive_seed(self.seed, epoch, i, 7))


def collate(items: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    return [x for x, _ in items], [t for _, t in items]


def orientation_groups(split: DetectionSplit) -> np.ndarray:
    """0 for landscape or square images, 1 for portrait ones (torchvision's reference groups by aspect ratio too)."""
    return np.array([int(h > w) for h, w in split.sizes], dtype=np.int64)


def epoch_batches(num: int, groups: np.ndarray | None, batch: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's global batches of image indices: a permutation seeded by (seed, epoch), padded (by repeating its
    start) to a multiple of the process count as DistributedSampler does; with groups, each batch is filled from one
    group as images arrive, and the leftovers form the last batches. There are ceil(padded / batch) batches, every
    one's size a multiple of `world`, so process r takes batch[r::world] and all processes take equal shares."""
    order = np.random.default_rng(derive_seed(seed, epoch, 1)).permutation(num)
    order = np.concatenate([order, order[: (-num) % world]])
    if groups is None:
        return [order[k:k + batch].tolist() for k in range(0, len(order), batch)]
    buffers: dict[int, list[int]] = {}
    out: list[list[int]] = []
    for i in order.tolist():
        buf = buffers.setdefault(int(groups[i]), [])
        buf.append(i)
        if len(buf) == batch:
            out.append(buf)
            buffers[int(groups[i])] = []
    rest = [i for g in sorted(buffers) for i in buffers[g]]
    return out + [rest[k:k + batch] for k in range(0, len(rest), batch)]
