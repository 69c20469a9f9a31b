"""The question-set file: class list + question records, identified by a content hash.

The hash covers only what changes teacher targets (classes, question ids and texts), so editing a
question's category or reference answers does not invalidate a label store. A set never holds the same
question twice (texts compared after `clean.normalise`: case, spaces, punctuation, "the item"/"it").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydantic
from pydantic import BaseModel, Field

from makd.atomic import read_json, write_json
from makd.errors import MakdError
from makd.questions.clean import clean, normalise
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
    # Why the cleaning rules would refuse it, for a question imported anyway (`questions import --keep-invalid`).
    kept_despite: str | None = None


def content_hash(classes: Sequence[str], questions: Iterable[tuple[str, str]]) -> str:
    """The hash of what changes teacher targets: the class list and the (id, text) of every question, in order.
    A label store records it, and checks its own question list against it."""
    payload = {"classes": list(classes), "questions": [[qid, text] for qid, text in questions]}
    return "sha256:" + hashlib.sha256(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()[:16]


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
        texts: dict[str, str] = {}
        for i, q in enumerate(self.questions):
            if q.id in seen:
                raise ValueError(f"questions[{i}]: duplicate id {q.id!r}")
            seen.add(q.id)
            same = texts.setdefault(normalise(q.text), q.id)
            if same != q.id:
                raise ValueError(f"questions[{i}] ({q.id}): the same question as {same} ({q.text!r}); keep one of them")
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
        return content_hash(self.classes, ((q.id, q.text) for q in self.questions))

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
    def from_txt(cls, path: str | Path, classes: list[str], name: str = "", keep_invalid: bool = False) -> "QuestionSet":
        """Import the official code's one-question-per-line file through the cleaning rules that generated
        questions pass (`questions/clean.py`, each line judged whole). Lines that are not single yes/no
        questions about the image (or that name a class) are refused, all listed with line number, text and
        reason — or, with `keep_invalid`, kept with the reason in `kept_despite`. A repeated question is
        always refused: one question cannot be two aspects."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MakdError(f"cannot read question list {path}: {exc}") from None
        candidates = clean([(path.name, text)], classes, one_per_line=True).candidates
        if not candidates:
            raise MakdError(f"{path}: no questions found")
        first_line: dict[str, str] = {}
        repeated = []
        for c in candidates:  # valid or not: a kept line must not repeat another either
            line = c.origin.rsplit(":", 1)[1]
            earlier = first_line.setdefault(normalise(c.text), line)
            if earlier != line:
                repeated.append(f"line {line} {c.text!r} repeats line {earlier}")
        if repeated:
            raise MakdError(f"{path}: {'; '.join(repeated)}: remove the repeats")
        refused = [c for c in candidates if not c.accepted]
        if refused and not keep_invalid:
            listing = "; ".join(f"line {c.origin.rsplit(':', 1)[1]} {c.text!r}: {verdict(c.reason, c.detail)}"
                                for c in refused)
            raise MakdError(f"{path}: {len(refused)} of {len(candidates)} lines are not usable yes/no questions "
                            f"({listing}); rewrite or remove them, or keep them flagged with --keep-invalid")
        width = len(str(len(candidates)))
        data = {
            "name": name or path.stem,
            "classes": classes,
            "generation": {"source": f"imported from {path.name}", "kept_despite_cleaning": len(refused)},
            "questions": [
                {"id": f"q{i + 1:0{width}d}", "text": c.text, "source": f"{path.name}:{i + 1}",
                 **({} if c.accepted else {"kept_despite": verdict(c.reason, c.detail)})}
                for i, c in enumerate(candidates)
            ],
        }
        return validate(cls, data, str(path))


def verdict(reason: str | None, detail: str | None) -> str:
    """'not a yes/no question', or 'compound (alternatives joined by 'or')'."""
    return f"{reason} ({detail})" if detail else str(reason)
