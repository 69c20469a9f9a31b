"""Turn raw LLM output into clean, distinct, single yes/no questions — and say why each line was dropped.

LLM output (especially from small models) mixes numbered lists, bullets, prose, repeated lines, open
questions ("What colour is it?"), double questions ("Does it have wheels and a handle?") and text that names
the class ("Is it a sneaker?", which leaks the label). Every candidate keeps its verdict, so a user can audit
what was thrown away and why.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

# Yes/no questions open with an auxiliary or modal verb.
YES_NO_OPENERS = ("is", "are", "was", "were", "does", "do", "did", "has", "have", "had", "can", "could", "will",
                  "would", "should", "shall", "may", "might", "must")
LIST_MARKER = re.compile(r"^\s*(?:(?:q(?:uestion)?\s*)?\d+\s*[.):\-]|\(\d+\)|[-*•·]+|#+)\s*", re.IGNORECASE)
QUESTION_SPAN = re.compile(r"[^?.!\n]*\?")
SECOND_CLAUSE = re.compile(rf"\b(?:and|but)\s+(?:{'|'.join(YES_NO_OPENERS)})\b", re.IGNORECASE)
TWO_THINGS = re.compile(r"\band\s+(?:a|an|the|its|some|any)\b", re.IGNORECASE)
ALTERNATIVE = re.compile(r"\bor\b", re.IGNORECASE)
TO_THE_READER = re.compile(r"\b(?:i|me|my|we|us|you|your)\b", re.IGNORECASE)  # chat filler: "Can I help you?"
SUBJECT_WORDS = re.compile(r"\b(?:the\s+(?:object|item|thing|image|picture|photo)|it|this)\b", re.IGNORECASE)
MAX_WORDS, MIN_WORDS, MAX_CHARS = 16, 4, 120


@dataclass
class Candidate:
    """One question-like span of raw output, with its verdict."""

    text: str
    origin: str  # which response and line it came from
    accepted: bool = False
    reason: str | None = None  # why it was rejected: a short category...
    detail: str | None = None  # ...and the specifics
    duplicate_of: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def extract_candidates(raw: str, origin: str, one_per_line: bool = False) -> list[Candidate]:
    """Question-like spans: list items (numbered or bulleted), and every '...?' sentence in prose; with
    `one_per_line` (a file of one question per line), each non-empty line as it is, so that a line holding
    two questions or none is judged (and reported) as the line the user wrote."""
    found: list[Candidate] = []
    for line_no, line in enumerate(raw.splitlines(), start=1):
        line = LIST_MARKER.sub("", line.strip()).strip().strip('"“”').strip()
        if not line:
            continue
        spans = [] if one_per_line else [s.strip() for s in QUESTION_SPAN.findall(line)]
        if not spans:  # keep non-questions too, to report why they were dropped
            spans = [line]
        for span in spans:
            found.append(Candidate(text=tidy(span), origin=f"{origin}:{line_no}"))
    return found


def tidy(text: str) -> str:
    """Collapse whitespace, capitalise the first letter, strip list debris."""
    text = re.sub(r"\s+", " ", text).strip(" -*•\"'“”")
    return text[:1].upper() + text[1:] if text else text


def normalise(text: str) -> str:
    """For exact-duplicate detection: case, punctuation and the usual subject words don't matter."""
    text = SUBJECT_WORDS.sub("it", text.lower())
    return re.sub(r"[^a-z0-9 ]+", "", re.sub(r"\s+", " ", text)).strip()


def class_mentioned(text: str, classes: Sequence[str]) -> str | None:
    """The class a question names (whole words, singular or plural), which would leak the label."""
    lowered = text.lower()
    for name in classes:
        for variant in {v.strip() for v in re.split(r"[/,]", name.lower()) if len(v.strip()) > 2}:
            stem = re.escape(variant.rstrip("s"))
            if re.search(rf"\b{stem}(?:s|es)?\b", lowered):
                return name
    return None


def rejection_reason(text: str, classes: Sequence[str]) -> tuple[str, str | None] | None:
    """(reason, detail) why `text` is not a usable question, or None if it is."""
    words = text.split()
    if not text.endswith("?"):
        return "not a question", None
    if text.count("?") > 1:
        return "several questions", None
    if words[0].lower().strip(",") not in YES_NO_OPENERS:
        return "not a yes/no question", None
    if len(words) < MIN_WORDS:
        return "too short", None
    if len(words) > MAX_WORDS or len(text) > MAX_CHARS:
        return "too long", f"{len(words)} words"
    if TO_THE_READER.search(text):
        return "not about the image", "talks to the reader"
    lowered = [w.lower().strip("?,.") for w in words]
    if len(set(lowered)) < 0.7 * len(lowered):
        return "repetitive", None
    if ALTERNATIVE.search(text):
        return "compound", "alternatives joined by 'or'"
    if SECOND_CLAUSE.search(text) or TWO_THINGS.search(text):
        return "compound", "two questions joined by 'and'"
    named = class_mentioned(text, classes)
    if named is not None:
        return "names a class", f"{named!r}: it would leak the label"
    return None


@dataclass
class CleaningResult:
    accepted: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)

    def rejection_counts(self) -> dict[str, int]:
        return dict(Counter(c.reason for c in self.candidates if not c.accepted))


def clean(responses: Sequence[tuple[str, str]], classes: Sequence[str],
          embed: Callable[[list[str]], np.ndarray] | None = None, similarity: float = 0.9,
          already: Sequence[str] = (), one_per_line: bool = False) -> CleaningResult:
    """Parse `(origin, raw text)` responses into accepted questions, in order of first appearance.

    Exact duplicates (after `normalise`) are dropped; with `embed` (unit-norm sentence embeddings), so are
    paraphrases whose cosine similarity to an earlier accepted question is at least `similarity`.
    `already` holds questions accepted earlier (e.g. in previous sampling rounds). `one_per_line` judges
    whole lines (imported question files) instead of the question spans found in free text.
    """
    result = CleaningResult()
    seen = {normalise(q): q for q in already}
    for origin, raw in responses:
        for cand in extract_candidates(raw, origin, one_per_line):
            result.candidates.append(cand)
            cand.reason, cand.detail = rejection_reason(cand.text, classes) or (None, None)
            if cand.reason is None and normalise(cand.text) in seen:
                cand.reason, cand.duplicate_of = "duplicate", seen[normalise(cand.text)]
            if cand.reason is None:
                seen[normalise(cand.text)] = cand.text
                result.accepted.append(cand.text)
                cand.accepted = True
    if embed is not None and result.accepted:
        drop_paraphrases(result, embed, similarity, list(already))
    return result


def drop_paraphrases(result: CleaningResult, embed: Callable[[list[str]], np.ndarray], similarity: float,
                     already: list[str]) -> None:
    """Greedy in order: a question too close to an earlier kept one is rejected as a paraphrase of it."""
    texts = already + result.accepted
    vectors = embed(texts)
    kept: list[int] = list(range(len(already)))
    by_text = {c.text: c for c in result.candidates if c.accepted}
    for i in range(len(already), len(texts)):
        sims = vectors[kept] @ vectors[i] if kept else np.array([])
        if len(sims) and sims.max() >= similarity:
            cand = by_text[texts[i]]
            cand.accepted, cand.reason, cand.detail = False, "paraphrase", f"cosine {sims.max():.2f}"
            cand.duplicate_of = texts[kept[int(sims.argmax())]]
        else:
            kept.append(i)
    result.accepted = [texts[i] for i in kept[len(already):]]
