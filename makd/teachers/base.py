"""The teacher contract: images + questions in, per-(image, question) log-odds and answer mass out.

Every teacher (the offline bridge, Hugging Face VLMs, OpenAI-compatible servers, class-level text LLMs)
implements this, so the label store and everything downstream never depend on which one ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from PIL import Image

from makd.questions import QuestionSet


@dataclass(frozen=True)
class AspectScores:
    """log-odds s = log P(yes) - log P(no), and mass m = P(yes) + P(no), each [images, questions] float32."""

    logodds: np.ndarray
    mass: np.ndarray

    def __post_init__(self) -> None:
        if self.logodds.shape != self.mass.shape or self.logodds.ndim != 2:
            raise ValueError(f"logodds {self.logodds.shape} and mass {self.mass.shape} must be equal 2-D shapes")


class Teacher(Protocol):
    name: ClassVar[str]
    batch_size: int

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in the label store: model, revision, prompt, preprocessing, token ids..."""

    def score(self, images: Sequence[Image.Image], questions: QuestionSet) -> AspectScores:
        """Score every question for every image (one batch; the caller chunks by `batch_size`)."""
