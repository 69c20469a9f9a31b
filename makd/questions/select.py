"""Choosing Q questions from a candidate pool: by data (teacher answers on training images), by an LLM (the
paper's method) or at random. The algorithms only: makd/selection.py runs them from a config.

Data-driven selection (in the spirit of LaBo's submodular concept selection) keeps questions the teacher
answers in form (answer mass), whose answers vary across images (spread), and then greedily takes the
question with the most information about the class label, discounted by its redundancy with the questions
already chosen (max |Pearson r| of their answers over images): score = information × (1 − λ·redundancy).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from makd.errors import MakdError

if TYPE_CHECKING:
    from makd.questions.llm import Prompt, TextLLM
    from makd.questions.questionset import QuestionSet


def entropy_bits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def class_information(p_yes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """I(class; answer) in bits per question, the answer of image i drawn as Bernoulli(p_yes[i])."""
    classes, counts = np.unique(labels, return_counts=True)
    prior = counts / counts.sum()
    per_class = np.stack([p_yes[labels == c].mean(axis=0) for c in classes])  # [C, Q]
    return entropy_bits(p_yes.mean(axis=0)) - prior @ entropy_bits(per_class)


def abs_correlation(p_yes: np.ndarray) -> np.ndarray:
    """[Q, Q] |Pearson r| between questions' answers over images (0 for constant questions)."""
    centred = p_yes - p_yes.mean(axis=0)
    norms = np.linalg.norm(centred, axis=0)
    safe = np.where(norms > 0, norms, 1.0)
    r = (centred.T @ centred) / np.outer(safe, safe)
    return np.abs(np.where(np.outer(norms > 0, norms > 0), r, 0.0))


@dataclass
class SelectionReport:
    """Per candidate question: the statistics and the verdict, in pool order."""

    mass: np.ndarray
    spread: np.ndarray
    information: np.ndarray
    redundancy: np.ndarray  # max |r| with the questions chosen before it (NaN if never considered)
    rank: np.ndarray  # 1-based selection order, 0 if not chosen
    dropped: list[str | None]  # why a question was filtered out before the greedy step

    def rows(self, texts: list[str]) -> list[dict]:
        return [{"question": t, "mass": float(m), "spread": float(s), "information_bits": float(i),
                 "redundancy": None if np.isnan(r) else float(r), "rank": int(k), "dropped": d}
                for t, m, s, i, r, k, d in zip(texts, self.mass, self.spread, self.information, self.redundancy,
                                                  self.rank, self.dropped)]


def select_by_data(logodds: np.ndarray, mass: np.ndarray, labels: np.ndarray, k: int, *, min_mass: float = 0.5,
                   min_spread: float = 0.02, redundancy_weight: float = 1.0) -> tuple[list[int], SelectionReport]:
    """Indices of `k` questions (in selection order) and the report behind the choice."""
    p_yes = 1.0 / (1.0 + np.exp(-logodds.astype(np.float64)))
    stats_mass, spread = mass.mean(axis=0), p_yes.std(axis=0)
    information = class_information(p_yes, labels)
    dropped: list[str | None] = [
        f"answer mass {m:.2f} < {min_mass}" if m < min_mass else
        f"near-constant answers (spread {s:.3f} < {min_spread})" if s < min_spread else None
        for m, s in zip(stats_mass, spread)]
    eligible = [j for j, d in enumerate(dropped) if d is None]
    if len(eligible) < k:
        raise MakdError(f"only {len(eligible)} of {len(dropped)} candidate questions pass the mass/spread filters, "
                        f"{k} requested: generate more candidates or lower min_mass/min_spread")
    corr = abs_correlation(p_yes)
    chosen: list[int] = []
    redundancy = np.full(len(dropped), np.nan)
    while len(chosen) < k:
        best, best_score = -1, -np.inf
        for j in eligible:
            if j in chosen:
                continue
            red = corr[j, chosen].max() if chosen else 0.0
            score = information[j] * (1.0 - redundancy_weight * red)
            if score > best_score:
                best, best_score, best_red = j, score, red
        chosen.append(best)
        redundancy[best] = best_red
    rank = np.zeros(len(dropped), dtype=np.int64)
    rank[chosen] = np.arange(1, k + 1)
    return chosen, SelectionReport(stats_mass, spread, information, redundancy, rank, dropped)


def select_random(num_candidates: int, k: int, seed: int) -> list[int]:
    if num_candidates < k:
        raise MakdError(f"only {num_candidates} candidate questions, {k} requested")
    return sorted(np.random.default_rng(seed).choice(num_candidates, size=k, replace=False).tolist())


SELECT_PROMPT = ("Select {Q} of the most relevant and distinct questions from the list, focusing on various key "
                 "features that distinguish different class in the dataset.")


def selection_prompt(pool: "QuestionSet", k: int, style: str) -> "Prompt":
    """The paper's selection instruction over the numbered candidates (chat), or its completion form."""
    listing = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(pool.texts))
    head = f"The dataset consists of {len(pool.classes)} classes: {', '.join(pool.classes)}.\nQuestions:\n{listing}\n"
    if style == "paper":
        return [{"role": "user", "content": f"{head}\n{SELECT_PROMPT.format(Q=k)} Answer with the numbers of the "
                                            "selected questions, one per line."}]
    return f"{head}\n{SELECT_PROMPT.format(Q=k)}\nThe {k} selected question numbers are:"


def parse_selection(text: str, pool: "QuestionSet") -> list[int]:
    """0-based indices named in an LLM's answer (by number, or by repeating the question), in order, once each."""
    from makd.questions.clean import normalise

    by_text = {normalise(t): i for i, t in enumerate(pool.texts)}
    picks: list[int] = []
    for line in text.splitlines():
        key = normalise(re.sub(r"^\s*\d+\s*[.):-]?\s*", "", line))
        index = by_text.get(key)
        if index is None:
            numbers = [int(n) - 1 for n in re.findall(r"\b(\d{1,4})\b", line)]
            candidates = [n for n in numbers if 0 <= n < len(pool)]
        else:
            candidates = [index]
        picks += [c for c in candidates if c not in picks]
    return picks


def select_by_llm(pool: "QuestionSet", k: int, llm: "TextLLM", style: str, seed: int, max_rounds: int = 4
                  ) -> tuple[list[int], dict]:
    """The paper's method. A weak LLM may name fewer than k valid questions: more rounds are sampled, and any
    shortfall is filled at random (seeded) and reported, never hidden."""
    picks: list[int] = []
    responses = []
    for round_no in range(max_rounds):
        for text in llm.generate(selection_prompt(pool, k, style), 1, seed=seed * 100_003 + round_no):
            responses.append(text)
            picks += [i for i in parse_selection(text, pool) if i not in picks]
        if len(picks) >= k:
            break
    from_llm = picks[:k]
    rest = [i for i in range(len(pool)) if i not in from_llm]
    filled = np.random.default_rng(seed).choice(rest, size=k - len(from_llm), replace=False).tolist() if len(from_llm) < k else []
    return from_llm + filled, {"chosen_by_llm": len(from_llm), "filled_at_random": len(filled), "responses": responses}
