"""Train / validation / test splits from a data config, with the few-shot subsets seeded and recorded."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

import numpy as np

from makd.data.base import ImageSplit, MissingSplit, per_class_sample
from makd.data.config import DataConfig
from makd.data.registry import DATASETS
from makd.errors import MakdError

SPLITS = ("train", "val", "test")


def _pools(config: DataConfig) -> tuple[ImageSplit, ImageSplit | None, ImageSplit | MissingSplit]:
    """(train pool, val split if the dataset has one, test split — held out of the pool if the dataset has none)."""
    pool, val, test = DATASETS.get(config.dataset)(config)
    if test is None:
        rng = np.random.default_rng([config.split_seed, 0x7E57])  # its own stream: the other draws stay as they were
        held = holdout(pool.targets, config.holdout_fraction, rng)
        pool, test = pool.subset(np.setdiff1d(np.arange(len(pool)), held), "train"), pool.subset(held, "test")
    return pool, val, test


def holdout(targets: np.ndarray, fraction: float, rng: np.random.Generator, exclude: np.ndarray | None = None,
            too_few: Callable[[int, int], str] | None = None) -> np.ndarray:
    """Sorted indices of round(fraction · n_c) random samples of every class c (at least one, never all of it),
    drawn from the samples not in `exclude`; `too_few(class, available)` is the error when they are not enough."""
    available = np.ones(len(targets), dtype=bool)
    if exclude is not None:
        available[exclude] = False
    chosen = []
    for cls in np.unique(targets):
        members = np.flatnonzero(targets == cls)
        k = min(max(1, round(fraction * len(members))), len(members) - 1)
        pool = members[available[members]]
        if len(pool) < k:
            raise MakdError(too_few(int(cls), len(pool)) if too_few else f"class {cls}: {len(pool)} samples, {k} needed")
        chosen.append(rng.choice(pool, size=k, replace=False) if k > 0 else pool[:0])
    return np.sort(np.concatenate(chosen))


def _too_few(split: ImageSplit, what: str, request: str, advice: str) -> Callable[[int, int], str]:
    """The error of a per-class draw that asks for more images than a class has: the class by name, the option."""
    return lambda cls, n: f"class {split.class_names[cls]!r} has only {n} {what}; {request}: {advice}"


def _per_class(split: ImageSplit, option: str, per_class: int, rng: np.random.Generator, what: str, advice: str,
               exclude: np.ndarray | None = None) -> np.ndarray:
    """`per_class` seeded images of every class of `split`, or an error naming the class and `option`."""
    return per_class_sample(split.targets, per_class, rng, exclude,
                            too_few=_too_few(split, what, f"{option}={per_class} asks for {per_class}", advice))


FEW_SHOT_ADVICE = "lower it or set it to null"
VAL_ADVICE = "lower it, set it to null (then data.val_fraction applies) or to 0 (no validation)"


def _train_and_val(config: DataConfig, pool: ImageSplit, rng: np.random.Generator) -> tuple[ImageSplit, ImageSplit]:
    """Training images (a few-shot subset when asked) and validation images held out of the same pool."""
    every = np.arange(len(pool))
    few_shot = config.train_per_class is not None
    train_idx = (_per_class(pool, "data.train_per_class", config.train_per_class, rng, "training images", FEW_SHOT_ADVICE)
                 if few_shot else every)
    taken = train_idx if few_shot else None
    left = "training images left for validation" + (
        f" after the data.train_per_class={config.train_per_class} training images" if few_shot else "")
    if config.val_per_class is not None:
        val_idx = _per_class(pool, "data.val_per_class", config.val_per_class, rng, left, VAL_ADVICE, exclude=taken)
    elif config.val_fraction > 0:
        val_idx = holdout(pool.targets, config.val_fraction, rng, exclude=taken, too_few=_too_few(
            pool, left, f"data.val_fraction={config.val_fraction:g} asks for "
            f"{config.val_fraction:g} of each class's {'pool' if few_shot else 'images'}",
            "lower data.train_per_class, or set data.val_fraction=0 (no validation)"))
    else:
        val_idx = every[:0]
    if not few_shot:
        train_idx = np.setdiff1d(every, val_idx)  # the whole pool: validation comes out of it first
    return pool.subset(train_idx, "train"), pool.subset(val_idx, "val")


def build_splits(config: DataConfig, needed: Collection[str] = SPLITS) -> dict[str, ImageSplit]:
    """Deterministic in `config.split_seed`: the same config always yields the same sample ids.

    `needed` names the splits the caller will use: a split whose files are missing (an imagefolder root without
    `test/`) is an error only when needed, and is then left out of the result."""
    pool, val, test = _pools(config)
    rng = np.random.default_rng(config.split_seed)
    if val is None:
        train, val = _train_and_val(config, pool, rng)
    else:
        train = dataclasses.replace(pool, name="train")
        if config.train_per_class is not None:
            train = pool.subset(_per_class(pool, "data.train_per_class", config.train_per_class, rng, "training images",
                                           FEW_SHOT_ADVICE), "train")
        if config.val_per_class is not None:
            val = val.subset(_per_class(val, "data.val_per_class", config.val_per_class, rng, "validation images",
                                        VAL_ADVICE))
    if config.train_complement:
        train = complement(pool, train, val)
    splits = {"train": train, "val": val}
    if isinstance(test, MissingSplit):
        if "test" in needed:
            raise MakdError(f"{test.reason}: the test split is needed here")
    else:
        if config.test_per_class is not None:
            test = test.subset(_per_class(test, "data.test_per_class", config.test_per_class, rng, "test images",
                                          FEW_SHOT_ADVICE))
        splits["test"] = test
    if config.channels != "auto":
        for split in splits.values():
            if split.array is not None and split.channels != config.channels:
                raise MakdError(f"data.channels={config.channels}: the {config.dataset} images have {split.channels} "
                                "channel(s); set it to auto")
            split.info["channels"] = config.channels
    return splits


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
