"""Labelling: score every sample of a split with a teacher into a label store (sharded, resumable), and
`makd label` as a library call: which samples a config labels, with which teacher, into which store."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from makd.atomic import atomic_path, read_json, write_json
from makd.config import Config, resolve_path
from makd.data import ImageSplit, build_splits
from makd.data.base import per_class_sample
from makd.errors import MakdError
from makd.labels.store import (
    FORMAT,
    IDENTITY_KEYS,
    META_FILE,
    LabelStore,
    ids_hash,
    shard_name,
    shard_table,
    software_versions,
)
from makd.questions import QuestionSet
from makd.teachers import build_teacher
from makd.teachers.base import AspectScores, Teacher, teacher_inputs


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


def _metadata(split: ImageSplit, teacher: Teacher, questions: QuestionSet, shard_size: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "question_set_hash": questions.hash,
        "questions": [{"id": q.id, "text": q.text} for q in questions.questions],
        "classes": list(questions.classes),
        "teacher": teacher.describe(),
        "dataset": split.info,
        "num_samples": len(split),
        "sample_ids_hash": ids_hash(split.sample_ids),
        "shard_size": shard_size,
        "software": software_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _start_or_resume(out: Path, meta: dict[str, Any], overwrite: bool) -> None:
    meta_path = out / META_FILE
    if meta_path.is_file() and not overwrite:
        old = read_json(meta_path, "label store metadata")
        for key in IDENTITY_KEYS:
            if old.get(key) != meta[key]:
                raise MakdError(f"label store {out} was started with a different {key} "
                                f"({str(old.get(key))[:80]} vs {str(meta[key])[:80]}): use another folder, or --overwrite")
        return
    if overwrite:
        for stale in out.glob("shard-*.parquet"):
            stale.unlink()
    write_json(meta_path, meta)


def label_split(split: ImageSplit, teacher: Teacher, questions: QuestionSet, out: str | Path, *,
                shard_size: int = 512, rank: int = 0, world_size: int = 1, overwrite: bool = False,
                progress: bool = True) -> LabelStore:
    """Score every sample of `split` with `teacher`, writing shards this worker owns; skip finished ones."""
    if not 0 <= rank < world_size:
        raise MakdError(f"shard {rank}/{world_size}: rank must be in [0, {world_size})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _start_or_resume(out, _metadata(split, teacher, questions, shard_size), overwrite)
    store = LabelStore.open(out)
    todo = [i for i in store.missing_shards() if i % world_size == rank]
    total = sum(min(shard_size, len(split) - i * shard_size) for i in todo)
    for index in todo:  # leftovers of a killed writer of this worker's shards
        for stale in out.glob(f".{shard_name(index)}.*.tmp"):
            stale.unlink()
    inputs = teacher_inputs(teacher)
    with tqdm(total=total, desc=f"labelling ({teacher.name})", unit="img", disable=not progress) as bar:
        for index in todo:
            if hasattr(teacher, "start_shard"):  # optional hook (teachers/base.py)
                teacher.start_shard()
            rows = range(index * shard_size, min((index + 1) * shard_size, len(split)))
            parts: list[AspectScores] = []
            for start in range(rows.start, rows.stop, teacher.batch_size):
                batch = range(start, min(start + teacher.batch_size, rows.stop))
                extra: dict[str, Any] = {}
                if "classes" in inputs:
                    extra["classes"] = split.targets[start:batch.stop]
                if "sample_ids" in inputs:
                    extra["sample_ids"] = split.sample_ids[start:batch.stop]
                scores = teacher.score(split.images(batch) if "images" in inputs else [], questions, **extra)
                if scores.logodds.shape != (len(batch), len(questions)):
                    raise RuntimeError(f"teacher {teacher.name} returned {scores.logodds.shape} scores "
                                       f"for {len(batch)} images x {len(questions)} questions")
                parts.append(scores)
                bar.update(len(batch))
            flags = np.concatenate([p.flags for p in parts]) if parts[0].flags is not None else None
            table = shard_table([split.sample_ids[i] for i in rows], np.concatenate([p.logodds for p in parts]),
                                np.concatenate([p.mass for p in parts]), flags)
            with atomic_path(out / shard_name(index)) as tmp:
                pq.write_table(table, tmp)
    if not store.missing_shards():  # the last worker to finish builds the memory-mapped table for readers
        store.consolidate()
    return store
