"""`makd label` as a library call: which samples a config labels, with which teacher, into which store."""

from __future__ import annotations

import numpy as np

from makd.config import Config, resolve_path
from makd.data import ImageSplit, build_splits
from makd.data.base import per_class_sample
from makd.errors import MakdError
from makd.labels.store import LabelStore, label_split
from makd.questions import QuestionSet
from makd.teachers import build_teacher


def samples_to_label(config: Config) -> ImageSplit:
    """The configured splits (train first), each optionally capped per class with a seeded subset."""
    splits = build_splits(config.data)
    parts = []
    for name in config.labels.splits:
        split = splits[name]
        cap = config.labels.max_per_class.get(name)
        if cap is not None:
            rng = np.random.default_rng([config.data.split_seed, 0x1A])
            split = split.subset(per_class_sample(split.targets, cap, rng, at_most=True))
        parts.append(split)
    return ImageSplit.concat(parts, "+".join(config.labels.splits))


def label_from_config(config: Config, *, rank: int = 0, world_size: int = 1, overwrite: bool = False) -> LabelStore:
    if not config.labels.path:
        raise MakdError("labels.path: where should the label store go? (e.g. labels.path=labels/my-dataset)")
    if not config.questions:
        raise MakdError("questions: a question-set JSON is needed to label (see `makd questions --help`)")
    unknown = set(config.labels.max_per_class) - set(config.labels.splits)
    if unknown:
        raise MakdError(f"labels.max_per_class: {sorted(unknown)[0]!r} is not one of labels.splits {config.labels.splits}")
    questions = QuestionSet.load(resolve_path(config.questions))
    samples = samples_to_label(config)
    if list(questions.classes) != samples.class_names:
        raise MakdError(f"question set {config.questions} is for classes {list(questions.classes)[:3]}..., "
                        f"the dataset has {samples.class_names[:3]}...")
    teacher = build_teacher(config.teacher)
    return label_split(samples, teacher, questions, config.labels.path, shard_size=config.labels.shard_size,
                       rank=rank, world_size=world_size, overwrite=overwrite, progress=config.train.progress)
