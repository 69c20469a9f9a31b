"""Image -> tensor pipelines. Normalisation lives in the model, so a checkpoint alone can predict."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from makd.data.base import ImageSplit


@dataclass(frozen=True)
class InputSpec:
    """What the model expects: channels and size, and whether images are resized (else used at native size)."""

    in_chans: int
    height: int
    width: int
    resized: bool

    def to_dict(self) -> dict:
        return asdict(self)


def input_spec(split: ImageSplit, image_size: int | None) -> InputSpec:
    if image_size is not None:
        return InputSpec(split.channels, image_size, image_size, True)
    if split.array is None:
        raise ValueError("file-based datasets need data.image_size")
    return InputSpec(split.channels, split.array.shape[1], split.array.shape[2], False)


def build_transform(spec: InputSpec, train: bool, augment: str = "auto") -> v2.Compose:
    size = (spec.height, spec.width)
    if augment == "auto":
        augment = "resized_crop_flip" if spec.resized else "crop_flip"
    steps: list = [v2.ToImage()]
    if train and augment == "crop_flip":
        steps += [v2.Resize(size, antialias=True)] if spec.resized else []
        steps += [v2.RandomCrop(size, padding=max(1, round(0.125 * min(size)))), v2.RandomHorizontalFlip()]
    elif train and augment == "resized_crop_flip":
        steps += [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    elif spec.resized:
        steps += [v2.Resize(round(min(size) / 0.875), antialias=True), v2.CenterCrop(size)]
    else:
        steps += [v2.Resize(size, antialias=True)]  # no-op at native size; fits foreign images (predict)
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def to_model_mode(img: Image.Image, spec: InputSpec) -> Image.Image:
    mode = "L" if spec.in_chans == 1 else "RGB"
    return img if img.mode == mode else img.convert(mode)


class SplitDataset(Dataset):
    """(image tensor, class index, row index); the row index joins the batch to per-sample teacher targets."""

    def __init__(self, split: ImageSplit, transform: v2.Compose, spec: InputSpec) -> None:
        self.split, self.transform, self.spec = split, transform, spec

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        if self.split.array is not None:
            arr = torch.from_numpy(np.array(self.split.array[i]))  # copy: the IDX buffer is read-only
            img = v2.functional.to_image(arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1))
        else:
            img = to_model_mode(self.split.image(i), self.spec)
        return self.transform(img), int(self.split.targets[i]), i


def channel_stats(split: ImageSplit) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of an in-memory split in [0, 1]; ImageNet's (or their grey average) for files."""
    if split.array is None:
        return ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if split.channels == 3 else ((0.449,), (0.226,))
    arr = split.array.astype(np.float32) / 255.0
    axes = tuple(range(arr.ndim)) if arr.ndim == 3 else tuple(range(arr.ndim - 1))
    mean, std = np.atleast_1d(arr.mean(axis=axes)), np.atleast_1d(arr.std(axis=axes))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)
