"""Train / validation / test splits from a data config, with the few-shot subsets seeded and recorded."""

from __future__ import annotations

import numpy as np

from makd.config import DataConfig
from makd.data.base import ImageSplit, per_class_sample
from makd.data.fashion_mnist import load_fashion_mnist
from makd.data.imagefolder import list_classes, load_imagefolder
from makd.errors import MakdError


def _pools(config: DataConfig) -> tuple[ImageSplit, ImageSplit | None, ImageSplit]:
    """(train pool, val split if the dataset has one, test split)."""
    if config.dataset == "fashion_mnist":
        return load_fashion_mnist("train", config.root), None, load_fashion_mnist("test", config.root)
    if config.root is None:
        raise MakdError("data.root: required for dataset imagefolder")
    classes = list_classes(config.root)
    train = load_imagefolder(config.root, "train", classes)
    test = load_imagefolder(config.root, "test", classes)
    if test is None:
        raise MakdError(f"imagefolder root {config.root} has no test/ folder")
    return train, load_imagefolder(config.root, "val", classes), test


def _cap(split: ImageSplit, per_class: int | None, rng: np.random.Generator, exclude: np.ndarray | None = None) -> ImageSplit:
    if per_class is None:
        return split if exclude is None else split.subset(np.setdiff1d(np.arange(len(split)), exclude))
    return split.subset(per_class_sample(split.targets, per_class, rng, exclude))


def build_splits(config: DataConfig) -> dict[str, ImageSplit]:
    """Deterministic in `config.split_seed`: the same config always yields the same sample ids."""
    pool, val, test = _pools(config)
    rng = np.random.default_rng(config.split_seed)
    train_idx = (np.arange(len(pool)) if config.train_per_class is None
                 else per_class_sample(pool.targets, config.train_per_class, rng))
    train = pool.subset(train_idx, "train")
    if val is None:
        if config.val_per_class is None:
            raise MakdError("data.val_per_class: required when the dataset has no validation split")
        if config.train_per_class is None:
            raise MakdError("data.train_per_class: the whole training pool is used for training, so there is "
                            "nothing left to validate on; set data.train_per_class or provide a val/ split")
        val = pool.subset(per_class_sample(pool.targets, config.val_per_class, rng, exclude=train_idx), "val")
    else:
        val = _cap(val, config.val_per_class, rng)
    test = _cap(test, config.test_per_class, rng)
    return {"train": train, "val": val, "test": test}


def describe_splits(splits: dict[str, ImageSplit]) -> dict:
    """What `splits.json` records: counts per class and the exact train/val sample ids."""
    out = {}
    for name, split in splits.items():
        counts = np.bincount(split.targets, minlength=split.num_classes).tolist()
        entry = {"num_samples": len(split), "per_class": dict(zip(split.class_names, counts))}
        if name != "test" or len(split) <= 20000:
            entry["sample_ids"] = split.sample_ids
        out[name] = entry
    return out
