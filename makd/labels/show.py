"""What the teacher said: per image its most confident yes and no answers, per class the mean P(yes) of each
question (a table, and a heatmap PNG), and how its class-level answers compare with the hand-written
`class_answers` of the question set (a warning when they are too weak to teach anything).

Nothing here imports torch: `makd labels show` reads the store, and with `-c` the config's data (for each
sample's class) and question set (for the hand-written answers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import expit

from makd.config import Config, resolve_path
from makd.errors import MakdError
from makd.labels.job import samples_to_label
from makd.labels.store import LabelStore
from makd.questions import QuestionSet
from makd.report.teacher import agreement_sentence, teacher_quality, weakness, wrong_way_questions

if TYPE_CHECKING:
    from makd.data.base import ImageSplit
SampleSource = Callable[[Config], "ImageSplit"]  # what a config labels: its images, or box crops for detection

log = logging.getLogger("makd.labels")


@dataclass
class Answers:
    """The store's answers as P(yes), with each sample's class when a config says which it is (-1 otherwise)."""

    ids: list[str]
    logodds: np.ndarray  # [N, Q]
    targets: np.ndarray  # [N] class index, -1 = unknown
    classes: list[str]
    questions: list[str]

    @property
    def p_yes(self) -> np.ndarray:
        return expit(self.logodds.astype(np.float64))


def read_answers(store: LabelStore, config: Config | None = None, samples_of: SampleSource = samples_to_label) -> Answers:
    """The store's rows; with a config, each sample's class from the data it describes (joined by sample id)."""
    ids, logodds, _ = store.read()
    targets = np.full(len(ids), -1, dtype=np.int64)
    if config is not None:
        samples = samples_of(config)
        index = dict(zip(samples.sample_ids, samples.targets))
        targets = np.array([index.get(i, -1) for i in ids], dtype=np.int64)
        if (targets < 0).all():
            raise MakdError(f"none of the samples of label store {store.path} is among those the config labels "
                            f"({samples.name} of data.root {config.data.root}): is it the store's config?")
    return Answers(ids, logodds, targets, list(store.meta["classes"]),
                   [q["text"] for q in store.meta["questions"]])


def image_lines(answers: Answers, rows: list[int], per_side: int) -> list[str]:
    """Per image: its `per_side` most confident yes answers and its `per_side` clearest no answers."""
    lines, p_yes = [], answers.p_yes
    for i in rows:
        cls = f" [{answers.classes[answers.targets[i]]}]" if answers.targets[i] >= 0 else ""
        lines.append(f"{answers.ids[i]}{cls}")
        order = np.argsort(-p_yes[i], kind="stable")
        picks = list(order[:per_side]) + [j for j in order[::-1][:per_side] if j not in order[:per_side]][::-1]
        lines += [f"  {'yes' if p_yes[i, j] >= 0.5 else 'no ':>3} {p_yes[i, j]:.2f}  "
                  f"{answers.questions[j]}" for j in picks]
    return lines


def class_means(answers: Answers) -> tuple[np.ndarray, list[int]]:
    """[Q, C'] mean P(yes) per question over the images of each class present (and those classes' indices)."""
    present = [c for c in range(len(answers.classes)) if (answers.targets == c).any()]
    p_yes = answers.p_yes
    return np.stack([p_yes[answers.targets == c].mean(axis=0) for c in present], axis=1), present


def class_table(answers: Answers, max_width: int = 14) -> list[str]:
    """Mean P(yes) per question (rows) and class (columns), columns as wide as the longest class name (cut beyond
    `max_width`)."""
    means, present = class_means(answers)
    width = min(max_width, max(7, *(len(answers.classes[c]) + 2 for c in present)))
    names = [answers.classes[c][: width - 1] for c in present]
    lines = ["mean P(yes) per class".ljust(48) + "".join(n.rjust(width) for n in names)]
    for j, text in enumerate(answers.questions):
        label = text if len(text) <= 47 else text[:44] + "..."
        lines.append(label.ljust(48) + "".join(f"{v:{width}.2f}" for v in means[j]))
    return lines


def agreement_lines(questions: QuestionSet, answers: Answers) -> list[str]:
    """The teacher against the question set's hand-written class answers; a warning when it is weak."""
    known = answers.targets >= 0
    quality = teacher_quality(questions, answers.logodds[known], answers.targets[known])
    if quality is None:
        return ["(the question set has no hand-written class_answers: the teacher cannot be checked against them)"]
    lines = [f"{agreement_sentence(quality)} ({quality['num_images']} images)."]
    weak = weakness(quality)
    if weak:
        worst = "; ".join(f"{q['text']!r} ({q['correlation']:.2f})" for q in wrong_way_questions(quality, 3))
        log.warning("warning: the teacher's answers look weak (%s)%s: its targets may teach the student little; see "
                    "`makd labels show` and docs/teachers.md for stronger teachers", weak,
                    f"; most wrong: {worst}" if worst else "")
    return lines


def show(store_path: str | Path, config: Config | None = None, images: int = 5, per_side: int = 3,
         sample_ids: list[str] | None = None, plot: str | Path | None = None,
         samples_of: SampleSource = samples_to_label) -> list[str]:
    """The lines `makd labels show` prints (and the heatmap PNG when asked)."""
    store = LabelStore.open(store_path)
    answers = read_answers(store, config, samples_of)
    rows = _rows(answers, images, sample_ids)
    lines = [f"label store {store.path}: {len(answers.ids)} images x {len(answers.questions)} questions, teacher "
             f"{store.meta['teacher'].get('name', '?')}", "", *image_lines(answers, rows, per_side), ""]
    if not (answers.targets >= 0).any():
        return lines + ["per class: give the store's config (-c my.yaml) so each sample's class is known"]
    lines += class_table(answers)
    questions = _questions_of(store, config)
    if questions is not None:
        lines += ["", *agreement_lines(questions, answers)]
    if plot:
        from makd.report.plots import class_heatmap

        means, present = class_means(answers)
        reference = questions.reference_answers()[present].T if questions is not None else None
        class_heatmap(means, answers.questions, [answers.classes[c] for c in present], Path(plot),
                      f"teacher {store.meta['teacher'].get('name', '?')}: mean P(yes) per class", reference)
        lines.append(f"heatmap: {plot}")
    return lines


def _questions_of(store: LabelStore, config: Config) -> QuestionSet | None:
    """The config's question set when it is the one the store was labelled with (it carries the class answers)."""
    if not config.questions:
        return None
    questions = QuestionSet.load(resolve_path(config.questions))
    return questions if questions.hash == store.meta["question_set_hash"] else None


def label_report(config: Config, store: LabelStore, samples_of: SampleSource = samples_to_label) -> list[str]:
    """What `makd label` says when a store is complete: the teacher against the hand-written class answers."""
    questions = _questions_of(store, config)
    if questions is None or np.isnan(questions.reference_answers()).all():
        return []
    return agreement_lines(questions, read_answers(store, config, samples_of))


def _rows(answers: Answers, images: int, sample_ids: list[str] | None) -> list[int]:
    """The rows to show: the given sample ids, else `images` of them spread over the classes (or the store)."""
    if sample_ids:
        where = {sid: i for i, sid in enumerate(answers.ids)}
        unknown = [s for s in sample_ids if s not in where]
        if unknown:
            raise MakdError(f"sample {unknown[0]!r} is not in the label store (its ids look like {answers.ids[0]!r})")
        return [where[s] for s in sample_ids]
    if (answers.targets >= 0).any():  # round-robin over classes: the first image of each class, then the second...
        by_class = [np.flatnonzero(answers.targets == c) for c in range(len(answers.classes))]
        order = [int(m[k]) for k in range(max(map(len, by_class))) for m in by_class if k < len(m)]
        return order[:images]
    return list(range(min(images, len(answers.ids))))
