"""Train / validation / test splits from a data config, with the few-shot subsets seeded and recorded."""

from __future__ import annotations

import numpy as np

from makd.data.base import ImageSplit, per_class_sample
from makd.data.config import DataConfig
from makd.data.registry import DATASETS
from makd.errors import MakdError


def _pools(config: DataConfig) -> tuple[ImageSplit, ImageSplit | None, ImageSplit]:
    """(train pool, val split if the dataset has one, test split — held out of the pool if the dataset has none)."""
    pool, val, test = DATASETS.get(config.dataset)(config)
    if test is None:
        rng = np.random.default_rng([config.split_seed, 0x7E57])  # its own stream: the other draws stay as they were
        held = holdout(pool.targets, config.holdout_fraction, rng)
        pool, test = pool.subset(np.setdiff1d(np.arange(len(pool)), held), "train"), pool.subset(held, "test")
    return pool, val, test


def holdout(targets: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of round(fraction · n_c) random samples of every class c (at least one, never all)."""
    chosen = []
    for cls in np.unique(targets):
        pool = np.flatnonzero(targets == cls)
        k = min(max(1, round(fraction * len(pool))), len(pool) - 1)
        chosen.append(rng.choice(pool, size=k, replace=False) if k > 0 else pool[:0])
    return np.sort(np.concatenate(chosen))


def _cap(split: ImageSplit, per_class: int | None, rng: np.random.Generator, exclude: np.ndarray | None = None) -> ImageSplit:
    if per_class is None:
        return split if exclude is None else split.subset(np.setdiff1d(np.arange(len(split)), exclude))
    return split.subset(per_class_sample(split.targets, per_class, rng, exclude))


def build_splits(config: DataConfig) -> dict[str, ImageSplit]:
    """Deterministic in `config.split_seed`: the same config always yields the same sample ids."""
    pool, val, test = _pools(config)
    rng = np.random.default_rng(config.split_seed)
    if val is None and config.val_per_class is None:
        raise MakdError("data.val_per_class: required when the dataset has no validation split")
    if val is None and config.train_per_class is None:
        # Full training pool: validation images come out of it first, training takes the rest.
        val_idx = per_class_sample(pool.targets, config.val_per_class, rng)
        train, val = _cap(pool, None, rng, exclude=val_idx), pool.subset(val_idx, "val")
    else:
        train_idx = (np.arange(len(pool)) if config.train_per_class is None
                     else per_class_sample(pool.targets, config.train_per_class, rng))
        train = pool.subset(train_idx, "train")
        val = (pool.subset(per_class_sample(pool.targets, config.val_per_class, rng, exclude=train_idx), "val")
               if val is None else _cap(val, config.val_per_class, rng))
    test = _cap(test, config.test_per_class, rng)
    if config.train_complement:
        train = complement(pool, train, val)
    return {"train": train, "val": val, "test": test}


def complement(pool: ImageSplit, train: ImageSplit, val: ImageSplit) -> ImageSplit:
    """The pool without the drawn training subset and the validation images (by sample id)."""
    used = set(train.sample_ids) | set(val.sample_ids)
    keep = [i for i, sid in enumerate(pool.sample_ids) if sid not in used]
    if not keep:
        raise MakdError("data.train_complement: the training subset and the validation split use the whole pool")
    return pool.subset(keep, "train")


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
