"""The teacher's inputs for the samples of one shard, batch by batch (the label loop's one source of batches).

With `workers` > 0 the batches are made in DataLoader worker processes, ahead of the teacher: images decoded, and
whatever the teacher's optional `preparer()` does with them (the `hf` teacher's processor: resizing, tiling,
tokenising the prompt head), so the model never waits for the CPU; `workers=0` makes them in the calling process,
by the same code. Batches come in order, `teacher.batch_size` samples each (a shard's first one
`teacher.first_batch_size` if the teacher has it), with the inputs it declares (teachers/base.py).

A sample that cannot be read (a corrupt or truncated file, one that is not an image, one the teacher's processor
rejects) is not fatal: it is reported in `InputBatch.failed` with a one-line reason, the label store records it as
skipped, and the rest of its batch is scored.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from PIL import Image

from makd.data.base import ImageSplit
from makd.errors import MakdError, first_line
from makd.teachers.base import Teacher, teacher_inputs
from makd.transport import pack, unpack

UNREADABLE = (MakdError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what reading a file raises
PREFETCH = 4  # batches each worker prepares ahead
SWITCH_INTERVAL_S = 2e-4  # workers' interpreter switch interval (responsive_worker)


@dataclass
class InputBatch:
    """One `teacher.score` call's worth of samples: those that loaded, their inputs, and those that did not."""

    positions: list[int]  # indices into `split` of the samples of this batch that loaded
    inputs: dict[str, Any]  # keyword inputs for teacher.score: "images", "classes", "sample_ids", "encoded_images",
    # "image_files" (teachers/base.py)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index into split, one-line reason)

    def __reduce__(self) -> tuple:
        """PIL images (the inputs of teachers without a preparer) travel as one shared buffer (makd/transport.py)."""
        images = self.inputs.get("images")
        if not (isinstance(images, list) and images and all(isinstance(i, Image.Image) and i.mode in ("L", "RGB")
                                                            for i in images)):
            return InputBatch, (self.positions, self.inputs, self.failed)
        import numpy as np
        import torch

        buffer, layout = pack([torch.from_numpy(np.array(img)) for img in images])
        rest = {k: v for k, v in self.inputs.items() if k != "images"}
        return unpack_batch, (self.positions, rest, self.failed, buffer, layout)

    def pin_memory(self) -> InputBatch:
        """Page-locked tensors for a GPU teacher (the DataLoader's pin_memory thread calls this)."""
        images = self.inputs.get("images")
        if hasattr(images, "pin_memory"):
            return InputBatch(self.positions, {**self.inputs, "images": images.pin_memory()}, self.failed)
        return self


def unpack_batch(positions: list[int], inputs: dict[str, Any], failed: list[tuple[int, str]], buffer: Any,
                 layout: list) -> InputBatch:
    """The inverse of `InputBatch.__reduce__` (grey images are 2-D arrays, RGB ones 3-D)."""
    return InputBatch(positions, {"images": [Image.fromarray(t.numpy()) for t in unpack(buffer, layout)], **inputs},
                      failed)


def shard_batches(split: ImageSplit, rows: range, teacher: Teacher, *, workers: int = 0) -> Iterator[InputBatch]:
    """The samples `rows` of `split` in batches, with the inputs the teacher declares (module docstring)."""
    first = getattr(teacher, "first_batch_size", teacher.batch_size)
    bounds = [rows.start, *range(min(rows.start + first, rows.stop), rows.stop, teacher.batch_size), rows.stop]
    batches = [list(range(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]
    if workers <= 0:
        make = BatchMaker(split, teacher_inputs(teacher), preparer(teacher))
        yield from (make.__getitems__(batch) for batch in batches)
    else:
        yield from WorkerPool.of(split, teacher, workers).batches(batches)


def preparer(teacher: Teacher) -> Callable[[list[Image.Image]], Any] | None:
    return teacher.preparer() if "images" in teacher_inputs(teacher) and hasattr(teacher, "preparer") else None


class WorkerPool:
    """DataLoader worker processes kept for the shards of one label job (same split, same teacher): starting them
    costs ~0.2 s, a shard of a small model's work on a CPU. A job with another split or teacher replaces the pool
    (its workers stop); the label job stops it when it ends (`stop`)."""

    _current: ClassVar[WorkerPool | None] = None

    def __init__(self, split: ImageSplit, teacher: Teacher, workers: int) -> None:
        import torch

        self.key = (weakref.ref(split), weakref.ref(teacher), workers)
        self.sampler = ShardSampler()
        device = str(getattr(teacher, "device", "cpu"))
        self.loader = torch.utils.data.DataLoader(
            BatchMaker(split, teacher_inputs(teacher), preparer(teacher)), batch_sampler=self.sampler,
            collate_fn=as_made, num_workers=workers, prefetch_factor=PREFETCH, persistent_workers=True,
            pin_memory=device.startswith("cuda"), worker_init_fn=responsive_worker)

    @classmethod
    def of(cls, split: ImageSplit, teacher: Teacher, workers: int) -> WorkerPool:
        pool = cls._current
        if pool is None or pool.key[0]() is not split or pool.key[1]() is not teacher or pool.key[2] != workers:
            cls._current = None  # the old pool's workers stop as it goes
            pool = cls._current = cls(split, teacher, workers)
        return pool

    @classmethod
    def stop(cls) -> None:
        """Stops the kept pool's workers now: the process may go on (e.g. to train) and must not keep them."""
        pool, cls._current = cls._current, None
        if pool is not None:
            # persistent_workers: the loader keeps the iterator that owns the workers (torch's DataLoader._iterator)
            iterator, pool.loader._iterator = pool.loader._iterator, None
            if iterator is not None:
                iterator._shutdown_workers()

    def batches(self, batches: list[list[int]]) -> Iterator[InputBatch]:
        self.sampler.batches = batches
        yield from self.loader


class ShardSampler:
    """The batch sampler of a WorkerPool: the current shard's batches of sample indices."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


def responsive_worker(_worker_id: int) -> None:
    """In a worker process only: hand the interpreter lock over more often (Python's default is every 5 ms). The
    worker's threads that send a finished batch (the queue's feeder, the shared-memory handshake) otherwise wait for
    the worker's main thread to let go of it while it makes the next batch, and the model waits with them (measured:
    5-7 ms per image on a busy 2-core machine, 1.6-2.4 with this and batches sent as one buffer)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def as_made(batch: InputBatch) -> InputBatch:
    """The DataLoader's collate function: BatchMaker already made the batch."""
    return batch


@dataclass
class BatchMaker:
    """A batch of sample indices -> InputBatch (`__getitems__`, as DataLoader workers call it)."""

    split: ImageSplit
    wanted: frozenset[str]
    prepare: Callable[[list[Image.Image]], Any] | None

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, batch: list[int]) -> InputBatch:
        split = self.split
        loaded: dict[int, Any] = {}
        failed: list[tuple[int, str]] = []
        for i in batch:
            try:
                loaded[i] = {
                    **({"images": split.image(i)} if "images" in self.wanted else {}),
                    **({"encoded_images": split.encoded(i)} if "encoded_images" in self.wanted else {}),
                }
            except UNREADABLE as exc:
                failed.append((i, first_line(exc)))
        if "images" in self.wanted and self.prepare is not None:
            prepared, rejected = prepare_each(self.prepare, [(i, loaded[i]["images"]) for i in loaded])
            failed += rejected
            for i, _ in rejected:
                del loaded[i]
        positions = list(loaded)
        inputs: dict[str, Any] = {}
        if "images" in self.wanted:
            inputs["images"] = prepared if self.prepare is not None else [loaded[i]["images"] for i in positions]
        if "encoded_images" in self.wanted:
            inputs["encoded_images"] = [loaded[i]["encoded_images"] for i in positions]
        if "image_files" in self.wanted:
            inputs["image_files"] = [split.image_file(i) for i in positions]
        if "classes" in self.wanted:
            inputs["classes"] = split.targets[positions]
        if "sample_ids" in self.wanted:
            inputs["sample_ids"] = [split.sample_ids[i] for i in positions]
        return InputBatch(positions, inputs, sorted(failed))


def prepare_each(prepare: Callable[[list[Image.Image]], Any],
                 images: Sequence[tuple[int, Image.Image]]) -> tuple[Any, list[tuple[int, str]]]:
    """The teacher's preparation of a batch; when it fails, each image alone finds the ones it rejects, and the
    others are prepared together."""
    try:
        return prepare([img for _, img in images]), []
    except Exception as batch_error:  # noqa: BLE001 - a processor's errors have no common type
        rejected = []
        for i, img in images:
            try:
                prepare([img])
            except Exception as exc:  # noqa: BLE001
                rejected.append((i, f"the teacher's processor rejects it: {first_line(exc)}"))
        if not rejected:
            raise batch_error
        bad = {i for i, _ in rejected}
        return prepare([img for i, img in images if i not in bad]), rejected
