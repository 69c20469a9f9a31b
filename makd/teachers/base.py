"""The teacher contract: images + questions in, per-(image, question) log-odds and answer mass out.

Every teacher (the offline bridge, Hugging Face VLMs, OpenAI-compatible servers, class-level text LLMs)
implements this, so the label store and everything downstream never depend on which one ran.

Inputs: a teacher declares what `score` needs in `inputs` (default {"images"}). A class-level teacher (the
"text" teacher asks about class names, not pictures) declares {"classes"}: it then gets each sample's class
index into `questions.classes` as `classes=` and an empty image list, so labelling never decodes images for it.
{"sample_ids"} passes the samples' ids as `sample_ids=` (the importer of the official JSON looks rows up by id);
{"encoded_images"} passes `encoded_images=`, per sample (the file's original bytes, MIME type) — for array
datasets a lossless PNG made once — for teachers that send images elsewhere (`ImageSplit.encoded`).
makd/labels/inputs.py (`shard_batches`) builds these batches for the label job, in DataLoader workers.

Optional hooks (a teacher without them is served as before):
- `start_shard()`: called by the label job before it scores each shard (the `hf` teacher re-checks its
  shared-prefix path on the shard's first image);
- `preparer()`: a picklable function, run in the label job's DataLoader workers on each batch's decoded images,
  whose result `score` gets as `images=` instead of the PIL list (the `hf` teacher's processor runs there, ahead
  of the model); `score` must still take a plain PIL list;
- `first_batch_size`: the size of a shard's first batch when it should differ from `batch_size` (the `hf`
  teacher checks its shared-prefix path on one image alone);
- `submit(...)`, with `score`'s arguments, returning an object whose `result()` is the scores (and `cancel()`
  drops them): the label job then submits the next shard before writing the current one (the `openai` teacher
  keeps its servers' windows full);
- `close()`: frees what the teacher holds (the server teachers' client loop and connections) once its owner, e.g.
  `label_from_config` for the teacher it built, is done with it (`close_teacher`).
Inputs "encoded_images" (each sample's file bytes and MIME type, `ImageSplit.encoded`) and "image_files" (the file
holding exactly each sample's image, or None: `ImageSplit.image_file`) serve teachers behind servers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from PIL import Image

from makd.questions import QuestionSet

IMAGES = frozenset({"images"})


@dataclass(frozen=True)
class AspectScores:
    """log-odds s = log P(yes) - log P(no), and mass m = P(yes) + P(no), each [images, questions] float32.

    `flags` (optional, uint8, same shape) records how each target was obtained where that varies per pair,
    e.g. the openai teacher's bits for "Yes/No missing from the top-k, bounded by the k-th logprob"; the
    teacher's describe() says what the bits mean, and the label store keeps them in a `flags` column.
    """

    logodds: np.ndarray
    mass: np.ndarray
    flags: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.logodds.shape != self.mass.shape or self.logodds.ndim != 2:
            raise ValueError(f"logodds {self.logodds.shape} and mass {self.mass.shape} must be equal 2-D shapes")
        if self.flags is not None and self.flags.shape != self.logodds.shape:
            raise ValueError(f"flags {self.flags.shape} must have the shape of logodds {self.logodds.shape}")


class Teacher(Protocol):
    name: ClassVar[str]
    batch_size: int
    inputs: ClassVar[frozenset[str]]  # optional; see the module docstring

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in the label store: model, revision, prompt, preprocessing, token ids...
        (A teacher whose provenance also depends on the question set adds `describe_questions(questions)`.)"""

    def score(self, images: Sequence[Image.Image], questions: QuestionSet, **inputs: Any) -> AspectScores:
        """Score every question for every image (one batch; the caller chunks by `batch_size`). `images` may be
        what the teacher's `preparer()` made of them (see the module docstring)."""


def provenance(teacher: Teacher, questions: QuestionSet) -> dict[str, Any]:
    """What the label store records about the teacher: `describe()`, plus, for a teacher that has it,
    `describe_questions(questions)` (what depends on the question set, e.g. the bridge's ImageNet stand-ins)."""
    extra = getattr(teacher, "describe_questions", None)
    return {**teacher.describe(), **(extra(questions) if extra else {})}


def teacher_inputs(teacher: Teacher) -> frozenset[str]:
    """What `teacher.score` needs: {"images"} unless the teacher declares otherwise."""
    return getattr(teacher, "inputs", IMAGES)


def close_teacher(teacher: Teacher) -> None:
    """The teacher's optional `close()` (module docstring), for whoever built it and is done with it."""
    close = getattr(teacher, "close", None)
    if close is not None:
        close()
