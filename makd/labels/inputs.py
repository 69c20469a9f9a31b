"""The teacher's inputs for the samples of one shard, batch by batch (the label loop's one source of batches).

With `workers` > 0 the batches are made in DataLoader worker processes, ahead of the teacher: images decoded, and
whatever the teacher's optional `preparer()` does with them (the `hf` teacher's processor: resizing, tiling,
tokenising the prompt head), so the model never waits for the CPU; `workers=0` makes them in the calling process,
by the same code. Batches come in order, `teacher.batch_size` samples each (a shard's first one
`teacher.first_batch_size` if the teacher has it), with the inputs it declares (teachers/base.py).

A sample that cannot be read (a corrupt or truncated file, one that is not an image, one the teacher's processor
rejects) is not fatal: it is reported in `InputBatch.failed` with a one-line reason, and the rest of its batch is
scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from makd.data.base import ImageSplit
from makd.errors import MakdError
from makd.teachers.base import Teacher, teacher_inputs

UNREADABLE = (MakdError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what reading a file raises
PREFETCH = 4  # batches each worker prepares ahead


@dataclass
class InputBatch:
    """One `teacher.score` call's worth of samples: those that loaded, their inputs, and those that did not."""

    positions: list[int]  # indices into `split` of the samples of this batch that loaded
    inputs: dict[str, Any]  # keyword inputs for teacher.score: "images", "classes", "sample_ids", "encoded_images"
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index into split, one-line reason)

    def pin_memory(self) -> InputBatch:
        """Page-locked tensors for a GPU teacher (the DataLoader's pin_memory thread calls this)."""
        images = self.inputs.get("images")
        if hasattr(images, "pin_memory"):
            return InputBatch(self.positions, {**self.inputs, "images": images.pin_memory()}, self.failed)
        return self


def shard_batches(split: ImageSplit, rows: range, teacher: Teacher, *, workers: int = 0) -> Iterator[InputBatch]:
    """The samples `rows` of `split` in batches, with the inputs the teacher declares (module docstring)."""
    first = getattr(teacher, "first_batch_size", teacher.batch_size)
    bounds = [rows.start, *range(min(rows.start + first, rows.stop), rows.stop, teacher.batch_size), rows.stop]
    batches = [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    wanted = teacher_inputs(teacher)
    make = BatchMaker(split, batches, wanted, teacher.preparer() if "images" in wanted and hasattr(teacher, "preparer")
                      else None)
    if workers <= 0 or len(batches) <= 1:
        yield from (make[i] for i in range(len(batches)))
        return
    import torch

    device = str(getattr(teacher, "device", "cpu"))
    loader = torch.utils.data.DataLoader(make, batch_size=None, shuffle=False, num_workers=min(workers, len(batches)),
                                         prefetch_factor=PREFETCH, pin_memory=device.startswith("cuda"))
    yield from loader


@dataclass
class BatchMaker:
    """batches[k] -> InputBatch; a map-style dataset, so DataLoader workers make batches in order."""

    split: ImageSplit
    batches: list[range]
    wanted: frozenset[str]
    prepare: Callable[[list[Image.Image]], Any] | None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> InputBatch:
        split = self.split
        loaded: dict[int, Any] = {}
        failed: list[tuple[int, str]] = []
        for i in self.batches[k]:
            try:
                loaded[i] = {
                    **({"images": split.image(i)} if "images" in self.wanted else {}),
                    **({"encoded_images": encoded(split, i)} if "encoded_images" in self.wanted else {}),
                }
            except UNREADABLE as exc:
                failed.append((i, one_line(exc)))
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
                rejected.append((i, f"the teacher's processor rejects it: {one_line(exc)}"))
        if not rejected:
            raise batch_error
        bad = {i for i, _ in rejected}
        return prepare([img for i, img in images if i not in bad]), rejected


def encoded(split: ImageSplit, i: int) -> tuple[bytes, str]:
    """(the file's bytes, MIME type) of sample i, as `ImageSplit.encoded` gives them."""
    if not hasattr(split, "encoded"):  # ImageSplit.encoded comes with the openai teacher's upload path
        raise MakdError("this makd has no ImageSplit.encoded: the encoded_images input is not available")
    return split.encoded(i)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
