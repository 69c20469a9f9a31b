"""The teacher's inputs for the samples of one shard, batch by batch (the label loop's one source of batches).

A sample whose image cannot be read (a corrupt or truncated file, one that is not an image) is not fatal: it is
reported in `InputBatch.failed` with a one-line reason, the label store records it as skipped, and the rest of
the batch is scored. This first version decodes in the calling process; `workers` is the hook for decoding ahead
of the model in DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from makd.data.base import ImageSplit
from makd.errors import MakdError
from makd.teachers.base import Teacher, teacher_inputs


@dataclass
class InputBatch:
    """One `teacher.score` call's worth of samples: those that loaded, their inputs, and those that did not."""

    positions: list[int]  # indices into `split` of the samples of this batch that loaded
    inputs: dict[str, Any]  # keyword inputs for teacher.score: "images", "classes", "sample_ids" (teachers/base.py)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index into split, one-line reason)


def shard_batches(split: ImageSplit, rows: range, teacher: Teacher, *, workers: int = 0) -> Iterator[InputBatch]:
    """The samples `rows` of `split` in batches of `teacher.batch_size`, with the inputs the teacher declares."""
    wanted = teacher_inputs(teacher)
    for start in range(rows.start, rows.stop, teacher.batch_size):
        batch = range(start, min(start + teacher.batch_size, rows.stop))
        images, positions, failed = [], [], []
        for i in batch:
            if "images" in wanted:
                try:
                    images.append(split.image(i))
                except MakdError as exc:
                    failed.append((i, str(exc).splitlines()[0]))
                    continue
            positions.append(i)
        inputs: dict[str, Any] = {"images": images} if "images" in wanted else {}
        if "classes" in wanted:
            inputs["classes"] = split.targets[positions]
        if "sample_ids" in wanted:
            inputs["sample_ids"] = [split.sample_ids[i] for i in positions]
        yield InputBatch(positions, inputs, failed)
