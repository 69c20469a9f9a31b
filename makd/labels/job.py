"""Labelling: score every sample of a split with a teacher into a label store (sharded, resumable), and
`makd label` as a library call: which samples a config labels, with which teacher, into which store — and
whether a store covers the samples a config trains and evaluates on (`split_coverage`)."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from makd.atomic import atomic_path, read_json, remove_stale_temporaries, write_json
from makd.config import Config, resolve_path
from makd.data import ImageSplit, build_splits
from makd.data.base import per_class_sample
from makd.errors import MakdError
from makd.labels.inputs import shard_batches
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
from makd.teachers.answers import warn_low_mass
from makd.teachers.base import AspectScores, Teacher, provenance


def samples_by_split(config: Config, uncapped: tuple[str, ...] = ()) -> dict[str, ImageSplit]:
    """The samples of each of labels.splits as the config builds them (train after few-shot subsetting), each
    but the `uncapped` ones optionally capped per class by labels.max_per_class with a seeded subset. Only the
    splits labelled need to exist."""
    splits = build_splits(config.data, needed=config.labels.splits)
    parts = {}
    for name in config.labels.splits:
        split = splits[name]
        cap = None if name in uncapped else config.labels.max_per_class.get(name)
        if cap is not None:
            rng = np.random.default_rng([config.data.split_seed, 0x1A])
            split = split.subset(per_class_sample(split.targets, cap, rng, at_most=True))
        parts[name] = split
    return parts


def samples_to_label(config: Config) -> ImageSplit:
    """The configured splits (train first), each optionally capped per class with a seeded subset."""
    return ImageSplit.concat(list(samples_by_split(config).values()), "+".join(config.labels.splits))


@dataclass
class SplitCoverage:
    """How many of one split's samples have a row in a label store, and which do not."""

    split: str
    total: int
    missing: list[str]
    required: str  # who needs these rows

    def report(self) -> str:
        line = f"{self.split}: {self.total - len(self.missing)} of {self.total} samples have a row"
        if not self.missing:
            return line
        shown = ", ".join(repr(sid) for sid in self.missing[:5]) + (", ..." if len(self.missing) > 5 else "")
        return f"{line}; {len(self.missing)} missing ({shown}): {self.required}"


def split_coverage(config: Config, stored_ids: pa.Array,
                   samples: Callable[[Config], ImageSplit] | None = None) -> list[SplitCoverage]:
    """Per split of labels.splits: the samples that the config trains on (every training sample: `makd train`
    looks each one up) or evaluates on (those `makd label` would label) without a row among `stored_ids`.
    With `samples` (e.g. detection's box crops), one entry for all the samples it makes."""
    splits = {"+".join(config.labels.splits): samples(config)} if samples else samples_by_split(config, uncapped=("train",))
    coverage = []
    for name, split in splits.items():
        has_row = pc.is_in(pa.array(split.sample_ids, pa.string()), value_set=stored_ids).to_numpy(zero_copy_only=False)
        required = ("`makd train` needs a row for every training sample" if name.startswith("train")
                    else f"the aspect agreement on {name} leaves them out")
        coverage.append(SplitCoverage(name, len(split), [split.sample_ids[i] for i in np.flatnonzero(~has_row)],
                                      f"{required}; run `makd label` with this config to label them"))
    return coverage


def label_from_config(config: Config, *, rank: int = 0, world_size: int = 1, overwrite: bool = False,
                      samples: Callable[[Config], ImageSplit] = samples_to_label) -> LabelStore:
    """`makd label`: every sample `samples(config)` makes (the configured splits' images, or e.g. box crops for
    detection), answered by the configured teacher, into the label store at `labels.path`."""
    if not config.labels.path:
        raise MakdError("labels.path: where should the label store go? (e.g. labels.path=labels/my-dataset)")
    if not config.questions:
        raise MakdError("questions: a question-set JSON is needed to label (see `makd questions --help`)")
    unknown = set(config.labels.max_per_class) - set(config.labels.splits)
    if unknown:
        raise MakdError(f"labels.max_per_class: {sorted(unknown)[0]!r} is not one of labels.splits {config.labels.splits}")
    questions = QuestionSet.load(resolve_path(config.questions))
    split = samples(config)
    if list(questions.classes) != split.class_names:
        raise MakdError(f"question set {config.questions} is for classes {list(questions.classes)[:3]}..., "
                        f"the dataset has {split.class_names[:3]}...")
    teacher = build_teacher(config.teacher)
    return label_split(split, teacher, questions, config.labels.path, shard_size=config.labels.shard_size,
                       rank=rank, world_size=world_size, overwrite=overwrite, progress=config.train.progress,
                       workers=config.data.num_workers)


def _metadata(split: ImageSplit, teacher: Teacher, questions: QuestionSet, shard_size: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "question_set_hash": questions.hash,
        "questions": [{"id": q.id, "text": q.text} for q in questions.questions],
        "classes": list(questions.classes),
        "teacher": provenance(teacher, questions),
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
                progress: bool = True, workers: int = 0) -> LabelStore:
    """Score every sample of `split` with `teacher`, writing shards this worker owns; skip finished ones. The
    teacher's inputs are made by `workers` DataLoader processes ahead of it (makd/labels/inputs.py)."""
    if not 0 <= rank < world_size:
        raise MakdError(f"shard {rank}/{world_size}: rank must be in [0, {world_size})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _start_or_resume(out, _metadata(split, teacher, questions, shard_size), overwrite)
    store = LabelStore.open(out)
    remove_stale_temporaries(out)  # of killed writers; those of live workers stay
    todo = [i for i in store.missing_shards() if i % world_size == rank]
    total = sum(min(shard_size, len(split) - i * shard_size) for i in todo)
    with tqdm(total=total, desc=f"labelling ({teacher.name})", unit="img", disable=not progress) as bar:
        for index in todo:
            if hasattr(teacher, "start_shard"):  # optional hook (teachers/base.py)
                teacher.start_shard()
            rows = range(index * shard_size, min((index + 1) * shard_size, len(split)))
            parts: list[AspectScores] = []
            for batch in shard_batches(split, rows, teacher, workers=workers):
                if batch.failed:  # the leases branch records and skips them; here, as before, they stop the job
                    raise MakdError(batch.failed[0][1])
                scores = teacher.score(batch.inputs.pop("images", []), questions, **batch.inputs)
                if scores.logodds.shape != (len(batch.positions), len(questions)):
                    raise RuntimeError(f"teacher {teacher.name} returned {scores.logodds.shape} scores "
                                       f"for {len(batch.positions)} images x {len(questions)} questions")
                parts.append(scores)
                bar.update(len(batch.positions))
            flags = np.concatenate([p.flags for p in parts]) if parts[0].flags is not None else None
            mass = np.concatenate([p.mass for p in parts])
            warn_low_mass(mass, questions.ids, f"shard {index}")
            table = shard_table([split.sample_ids[i] for i in rows], np.concatenate([p.logodds for p in parts]),
                                mass, flags)
            problems = store.validate_rows([(index, table)])[1]
            if problems:
                raise MakdError(f"teacher {teacher.name} returned targets a label store cannot hold (not written): "
                                f"{problems[0]}")
            with atomic_path(out / shard_name(index)) as tmp:
                pq.write_table(table, tmp)
    if not store.missing_shards():  # the last worker to finish builds the memory-mapped table for readers
        store.consolidate()
    return store
