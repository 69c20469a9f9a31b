"""Question sets: the yes/no aspect questions whose answers are distilled."""

from makd.questions.questionset import Question, QuestionSet

__all__ = ["Question", "QuestionSet"]
