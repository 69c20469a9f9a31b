"""How sensible are a teacher's answers? Compare them with hand-written per-class answers.

The class-mean p(yes) of each question is correlated, over classes, with the question set's
`class_answers`; a negative correlation means the teacher answers that question the wrong way round.

A teacher is called weak when its class-level answers correlate below WEAK_CORRELATION with the hand-written
ones on average, or when more than WEAK_WRONG_WAY of the scored questions point the wrong way. The thresholds
come from measurements (docs/teachers.md): the offline bridge on Fashion-MNIST, whose targets still carry class
information, scores 0.42 with 7 of 40 questions the wrong way; on natural photos with coarse class names it
scored near 0 and its targets taught the student nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import expit

from makd.questions import QuestionSet

WEAK_CORRELATION = 0.3
WEAK_WRONG_WAY = 0.25


def teacher_quality(questions: QuestionSet, logodds: np.ndarray, labels: np.ndarray) -> dict[str, Any] | None:
    """None when the question set carries no hand-written answers."""
    reference = questions.reference_answers()
    if np.isnan(reference).all():
        return None
    p_yes = expit(logodds.astype(np.float64))
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
    scored = int(np.sum(~np.isnan(r_all)))
    return {
        "num_images": int(len(labels)),
        "mean_correlation": float(np.nanmean(r_all)) if scored else float("nan"),
        "wrong_way": int(np.sum(r_all < 0)),
        "num_scored": scored,
        "mean_spread": float(np.mean([row["spread"] for row in per_question])),
        "per_question": per_question,
    }


def agreement_sentence(quality: dict[str, Any]) -> str:
    """One sentence: how the teacher's class-level answers compare with the hand-written ones."""
    return (f"Against the hand-written per-class answers in the question set, the teacher's class-mean answers "
            f"correlate {quality['mean_correlation']:.2f} on average over {quality['num_scored']} questions; "
            f"{quality['wrong_way']} point the wrong way")


def weakness(quality: dict[str, Any]) -> str | None:
    """Why the teacher's answers are too weak to teach aspects, or None when they are not."""
    if quality["num_scored"] == 0:
        return "no question could be scored (each needs answers for 3 classes that differ)"
    reasons = []
    if not quality["mean_correlation"] >= WEAK_CORRELATION:
        reasons.append(f"mean correlation {quality['mean_correlation']:.2f} < {WEAK_CORRELATION}")
    if quality["wrong_way"] > WEAK_WRONG_WAY * quality["num_scored"]:
        reasons.append(f"{quality['wrong_way']} of {quality['num_scored']} questions point the wrong way "
                       f"(more than {WEAK_WRONG_WAY:.0%})")
    return "; ".join(reasons) or None


def wrong_way_questions(quality: dict[str, Any], count: int = 5) -> list[dict[str, Any]]:
    """The questions the teacher answers most clearly the wrong way round, worst first."""
    wrong = [q for q in quality["per_question"] if q["correlation"] < 0]
    return sorted(wrong, key=lambda q: q["correlation"])[:count]
