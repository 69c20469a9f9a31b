"""Labelling: score every sample of a split with a teacher into a label store (sharded, resumable), and
`makd label` as a library call: which samples a config labels, with which teacher, into which store — and
whether a store covers the samples a config trains and evaluates on (`split_coverage`)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from makd.config import Config, resolve_path
from makd.data import ImageSplit, build_splits
from makd.data.base import loader_workers, per_class_sample
from makd.errors import MakdError
from makd.labels.inputs import WorkerPool, shard_batches
from makd.labels.leases import DEFAULT_TIMEOUT_S
from makd.labels.listing import shared_samples
from makd.labels.store import LabelStore, Skipped, shard_name
from makd.labels.writer import LabelWriter
from makd.questions import QuestionSet
from makd.teachers import build_teacher
from makd.teachers.answers import warn_low_mass
from makd.teachers.base import AspectScores, Teacher, close_teacher, provenance

log = logging.getLogger("makd.labels")


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
    """How many of one split's samples have a row in a label store, and which do not (and why, when known)."""

    split: str
    total: int
    missing: list[str]
    required: str  # who needs these rows
    unreadable: dict[str, str] = field(default_factory=dict)  # of `missing`: skipped when labelled, with the reason

    def report(self) -> str:
        line = f"{self.split}: {self.total - len(self.missing)} of {self.total} samples have a row"
        if not self.missing:
            return line
        shown = ", ".join(repr(sid) for sid in self.missing[:5]) + (", ..." if len(self.missing) > 5 else "")
        line = f"{line}; {len(self.missing)} missing ({shown}): {self.required}"
        if len(self.unreadable) < len(self.missing):
            line += "; run `makd label` with this config to label them"
        if self.unreadable:
            sid, reason = next(iter(self.unreadable.items()))
            line += (f"; {len(self.unreadable)} of them skipped when labelled, their image could not be read "
                     f"({sid!r}: {reason}): repair them and run `makd label --retry-skipped`")
        return line


def split_coverage(config: Config, stored_ids: pa.Array, samples: Callable[[Config], ImageSplit] | None = None,
                   skipped: list[Skipped] | None = None) -> list[SplitCoverage]:
    """Per split of labels.splits: the samples that the config trains on (every training sample: `makd train`
    looks each one up) or evaluates on (those `makd label` would label) without a row among `stored_ids`, with
    the reason of those the store records as `skipped`. With `samples` (e.g. detection's box crops), one entry
    for all the samples it makes."""
    splits = {"+".join(config.labels.splits): samples(config)} if samples else samples_by_split(config, uncapped=("train",))
    reasons = {s.sample_id: s.reason for s in skipped or []}
    coverage = []
    for name, split in splits.items():
        has_row = pc.is_in(pa.array(split.sample_ids, pa.string()), value_set=stored_ids).to_numpy(zero_copy_only=False)
        missing = [split.sample_ids[i] for i in np.flatnonzero(~has_row)]
        required = ("`makd train` needs a row for every training sample" if name.startswith("train")
                    else f"the aspect agreement on {name} leaves them out")
        coverage.append(SplitCoverage(name, len(split), missing, required,
                                      {sid: reasons[sid] for sid in missing if sid in reasons}))
    return coverage


def label_from_config(config: Config, *, rank: int | None = None, world_size: int | None = None,
                      overwrite: bool = False, retry_skipped: bool = False,
                      samples: Callable[[Config], ImageSplit] = samples_to_label) -> LabelStore:
    """`makd label`: every sample `samples(config)` makes (the configured splits' images, or e.g. box crops for
    detection), answered by the configured teacher, into the label store at `labels.path`. The sample list is
    shared by the job's workers through the store's listing (`makd.labels.listing`)."""
    if not config.labels.path:
        raise MakdError("labels.path: where should the label store go? (e.g. labels.path=labels/my-dataset)")
    if not config.questions:
        raise MakdError("questions: a question-set JSON is needed to label (see `makd questions --help`)")
    unknown = set(config.labels.max_per_class) - set(config.labels.splits)
    if unknown:
        raise MakdError(f"labels.max_per_class: {sorted(unknown)[0]!r} is not one of labels.splits {config.labels.splits}")
    questions = QuestionSet.load(resolve_path(config.questions))
    split = shared_samples(config, Path(config.labels.path), samples, lease_timeout=config.labels.lease_timeout,
                           overwrite=overwrite)
    if list(questions.classes) != split.class_names:
        raise MakdError(f"question set {config.questions} is for classes {list(questions.classes)[:3]}..., "
                        f"the dataset has {split.class_names[:3]}...")
    teacher = build_teacher(config.teacher)
    try:
        return label_split(split, teacher, questions, config.labels.path, shard_size=config.labels.shard_size,
                           rank=rank, world_size=world_size, overwrite=overwrite, progress=config.train.progress,
                           lease_timeout=config.labels.lease_timeout, retry_skipped=retry_skipped,
                           workers=loader_workers(config.data.num_workers, split.array is not None,
                                                  str(getattr(teacher, "device", "cpu")).split(":")[0]))
    finally:
        close_teacher(teacher)  # built here, used by no one else (label_split leaves a caller's teacher open)


def label_split(split: ImageSplit, teacher: Teacher, questions: QuestionSet, out: str | Path, *,
                shard_size: int = 512, rank: int | None = None, world_size: int | None = None,
                overwrite: bool = False, progress: bool = True, lease_timeout: float = DEFAULT_TIMEOUT_S,
                retry_skipped: bool = False, share_only: bool = False, workers: int = 0) -> LabelStore:
    """Score every sample of `split` with `teacher` into the store at `out`: each shard this worker claims
    (`LabelWriter.claim_shards`: its rank's share first, then any other; finished shards are never redone), then
    the consolidated table once the last shard is written. Samples whose image cannot be read are recorded as
    skipped (`labels check` lists them); a shard none of whose images (two or more) can be read stops the job."""
    if world_size is not None and rank is not None and not 0 <= rank < world_size:
        raise MakdError(f"shard {rank}/{world_size}: rank must be in [0, {world_size})")
    writer = LabelWriter.open(out, questions, provenance(teacher, questions), split.sample_ids, shard_size=shard_size,
                              dataset=split.info, overwrite=overwrite)
    todo = writer.missing_shards()
    total = sum(len(writer.shard_rows(i)) for i in todo)
    # A teacher with `submit` (teachers/base.py) gets the next shard before this one is written, so that a server's
    # window never drains between shards: this worker then holds two shards' leases at a time.
    submit = getattr(teacher, "submit", None)
    shards = writer.claim_shards(rank=rank, world_size=world_size, lease_timeout=lease_timeout,
                                 retry_skipped=retry_skipped, share_only=share_only, hold=2 if submit else 1)
    ahead: deque[_Shard] = deque()
    try:
        with tqdm(total=total, desc=f"labelling ({teacher.name})", unit="img", disable=not progress) as bar:
            for index in shards:
                if index is not None:
                    ahead.append(_start_shard(writer, index, split, teacher, questions, bar, workers, submit))
                while ahead and (index is None or len(ahead) > (1 if submit else 0)):
                    ahead[0].finish(writer, teacher, questions, split, bar)
                    ahead.popleft()  # once written: if finishing fails, its batches still out are cancelled too
            while ahead:
                ahead[0].finish(writer, teacher, questions, split, bar)
                ahead.popleft()
    except BaseException:
        for shard in ahead:  # the one that failed and those submitted ahead: dropped, not left running
            shard.cancel()
        raise
    finally:
        shards.close()
        WorkerPool.stop()  # kept between this job's shards only
    return writer.finish(lease_timeout)


@dataclass
class _Shard:
    """A shard's batches as given to the teacher: their scores, or what `submit` returned for them."""

    index: int
    rows: range
    batches: list[tuple[list[int], Any]] = field(default_factory=list)  # (positions, scores or submitted)
    skipped: dict[str, str] = field(default_factory=dict)

    def cancel(self) -> None:
        for _, part in self.batches:
            getattr(part, "cancel", lambda: None)()

    def finish(self, writer: LabelWriter, teacher: Teacher, questions: QuestionSet, split: ImageSplit,
               bar: tqdm) -> None:
        """Writes the shard (waiting for the answers of batches submitted ahead)."""
        parts = [part if isinstance(part, AspectScores) else _checked(part.result(), teacher, positions, questions, bar)
                 for positions, part in self.batches]
        done = [i for positions, _ in self.batches for i in positions]
        if not done and len(self.rows) > 1:
            first = next(iter(self.skipped.items()))
            raise MakdError(f"none of the {len(self.rows)} images of {shard_name(self.index)} could be read "
                            f"({first[0]}: {first[1]}): is the dataset where the config says? (single unreadable "
                            "images are skipped and recorded)")
        if self.skipped:
            log.warning("%s: %d image(s) could not be read and were skipped (first %s: %s)", shard_name(self.index),
                        len(self.skipped), *next(iter(self.skipped.items())))
        q = len(questions)
        flags = np.concatenate([p.flags for p in parts]) if parts and parts[0].flags is not None else None
        mass = np.concatenate([p.mass for p in parts]) if parts else np.zeros((0, q), np.float32)
        warn_low_mass(mass, questions.ids, shard_name(self.index))
        writer.write_shard(self.index, [split.sample_ids[i] for i in done],
                           np.concatenate([p.logodds for p in parts]) if parts else np.zeros((0, q), np.float32),
                           mass, flags, self.skipped)


def _checked(scores: AspectScores, teacher: Teacher, positions: list[int], questions: QuestionSet,
             bar: tqdm) -> AspectScores:
    if scores.logodds.shape != (len(positions), len(questions)):
        raise RuntimeError(f"teacher {teacher.name} returned {scores.logodds.shape} scores "
                           f"for {len(positions)} images x {len(questions)} questions")
    bar.update(len(positions))
    return scores


def _start_shard(writer: LabelWriter, index: int, split: ImageSplit, teacher: Teacher, questions: QuestionSet,
                 bar: tqdm, workers: int, submit: Any) -> _Shard:
    """Shard `index`'s batches given to the teacher: scored now, or submitted (`submit`) to be waited for later."""
    if hasattr(teacher, "start_shard"):  # optional hook (teachers/base.py)
        teacher.start_shard()
    shard = _Shard(index, writer.shard_rows(index))
    for batch in shard_batches(split, shard.rows, teacher, workers=workers):
        shard.skipped.update((split.sample_ids[i], reason) for i, reason in batch.failed)
        bar.update(len(batch.failed))
        if batch.positions:
            inputs = dict(batch.inputs)
            images = inputs.pop("images", [])
            shard.batches.append((batch.positions, submit(images, questions, **inputs) if submit else
                                  _checked(teacher.score(images, questions, **inputs), teacher, batch.positions,
                                           questions, bar)))
    return shard
