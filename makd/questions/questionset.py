"""The question-set file: class list + question records, identified by a content hash.

The hash covers only what changes teacher targets (classes, question ids and texts), so editing a
question's category or reference answers does not invalidate a label store.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pydantic
from pydantic import BaseModel, Field

from makd.atomic import read_json, write_json
from makd.errors import MakdError
from makd.validation import validate

FORMAT = "makd.questions/1"


class Question(BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    text: str = Field(min_length=3)
    category: str | None = None
    source: str | None = None
    # Hand-written per-class answers (0 = no, 1 = yes, 0.5 = depends): ground truth for judging a teacher.
    class_answers: dict[str, float] | None = None


class QuestionSet(BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    format: str = FORMAT
    name: str = ""
    classes: tuple[str, ...] = Field(min_length=1)
    dataset: dict = Field(default_factory=dict)
    generation: dict = Field(default_factory=dict)
    questions: tuple[Question, ...] = Field(min_length=1)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "QuestionSet":
        if self.format != FORMAT:
            raise ValueError(f"unsupported format {self.format!r}, expected {FORMAT!r}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("class names must be unique")
        seen: set[str] = set()
        for i, q in enumerate(self.questions):
            if q.id in seen:
                raise ValueError(f"questions[{i}]: duplicate id {q.id!r}")
            seen.add(q.id)
            for cls, value in (q.class_answers or {}).items():
                if cls not in self.classes:
                    raise ValueError(f"questions[{i}] ({q.id}): class_answers names unknown class {cls!r}")
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"questions[{i}] ({q.id}): class_answers[{cls!r}] = {value} is not in [0, 1]")
        return self

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def texts(self) -> list[str]:
        return [q.text for q in self.questions]

    @property
    def ids(self) -> list[str]:
        return [q.id for q in self.questions]

    @property
    def hash(self) -> str:
        payload = {"classes": list(self.classes), "questions": [[q.id, q.text] for q in self.questions]}
        digest = hashlib.sha256(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()
        return f"sha256:{digest[:16]}"

    def reference_answers(self) -> np.ndarray:
        """[C, Q] hand-written answers, NaN where none was given."""
        ref = np.full((len(self.classes), len(self.questions)), np.nan, dtype=np.float32)
        for j, q in enumerate(self.questions):
            for i, cls in enumerate(self.classes):
                if q.class_answers and cls in q.class_answers:
                    ref[i, j] = q.class_answers[cls]
        return ref

    def save(self, path: str | Path) -> None:
        write_json(path, self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def load(cls, path: str | Path) -> "QuestionSet":
        path = Path(path)
        if path.suffix == ".txt":
            raise MakdError(f"{path} is a plain-text question list: import it with `makd questions import`")
        return validate(cls, read_json(path, "question set"), str(path))

    @classmethod
    def from_txt(cls, path: str | Path, classes: list[str], name: str = "") -> "QuestionSet":
        """Import the official code's one-question-per-line file."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise MakdError(f"cannot read question list {path}: {exc}") from None
        texts = [line.strip() for line in lines if line.strip()]
        if not texts:
            raise MakdError(f"{path}: no questions found")
        width = len(str(len(texts)))
        data = {
            "name": name or path.stem,
            "classes": classes,
            "generation": {"source": f"imported from {path.name}"},
            "questions": [
                {"id": f"q{i + 1:0{width}d}", "text": text, "source": f"{path.name}:{i + 1}"}
                for i, text in enumerate(texts)
            ],
        }
        return validate(cls, data, str(path))
