"""How sensible are a teacher's answers? Compare them with hand-written per-class answers.

The class-mean p(yes) of each question is correlated, over classes, with the question set's
`class_answers`; a negative correlation means the teacher answers that question the wrong way round.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from makd.evaluate import sigmoid
from makd.questions import QuestionSet


def teacher_quality(questions: QuestionSet, logodds: np.ndarray, labels: np.ndarray) -> dict[str, Any] | None:
    """None when the question set carries no hand-written answers."""
    reference = questions.reference_answers()
    if np.isnan(reference).all():
        return None
    p_yes = sigmoid(logodds.astype(np.float64))
    present = np.unique(labels)
    class_mean = np.stack([p_yes[labels == c].mean(axis=0) for c in present])
    reference = reference[present]
    per_question = []
    for j, q in enumerate(questions.questions):
        known = ~np.isnan(reference[:, j])
        r = float("nan")
        if known.sum() >= 3 and reference[known, j].std() > 0 and class_mean[known, j].std() > 0:
            r = float(np.corrcoef(class_mean[known, j], reference[known, j])[0, 1])
        per_question.append({"id": q.id, "text": q.text, "correlation": r,
                             "spread": float(p_yes[:, j].std()), "mean_p_yes": float(p_yes[:, j].mean())})
    r_all = np.array([row["correlation"] for row in per_question])
    return {
        "num_images": int(len(labels)),
        "mean_correlation": float(np.nanmean(r_all)),
        "wrong_way": int(np.sum(r_all < 0)),
        "num_scored": int(np.sum(~np.isnan(r_all))),
        "mean_spread": float(np.mean([row["spread"] for row in per_question])),
        "per_question": per_question,
    }
