"""Yes/No answer tokens and the log-odds / answer-mass arithmetic every LLM teacher shares.

For (image, question): lp = log-softmax over the whole vocabulary at the first answer position;
ly = logsumexp of lp over the Yes variants, ln = the same over the No variants;
log-odds s = ly - ln (the paper's target is sigmoid(s)), mass m = exp(ly) + exp(ln).
Variants ("Yes", " Yes", "yes"...) are resolved from the model's own tokenizer at run time, never hard-coded
(the official code's fixed ids 9454/2753 are wrong for its own 8B teacher), and in context: as the first token
after the rendered prompt's generation prompt. A variant tokenized alone can be another token than the one the
model writes there (SentencePiece tokenizers prepend a word-start piece to text that starts a string, not to the
text that follows "<|im_start|>assistant\n").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydantic

from makd.clients.hf import HFModelOptions, adds_special_tokens, common_prefix_length
from makd.effects import RESULTS
from makd.errors import MakdError

log = logging.getLogger("makd")
DEFAULT_YES = ("Yes", "yes", " Yes", " yes")
DEFAULT_NO = ("No", "no", " No", " no")
DEFAULT_INSTRUCTION = "Answer with Yes or No."
FORMULA = ("lp = log_softmax(full-vocabulary logits at the first answer position); ly = logsumexp(lp[yes ids]), "
           "ln = logsumexp(lp[no ids]); logodds = ly - ln; mass = exp(ly) + exp(ln)")
# A shard whose mean answer mass is below this gets a warning (`warn_low_mass`): the teacher mostly answers
# neither Yes nor No (a prompt, template or answer-token problem), so its log-odds say little. 0.5 is also the
# data-driven question selection's default floor per question (select.min_mass).
LOW_MASS = 0.5


# Per-pair flags of teachers that see only the top-k log-probabilities (the openai teacher): the group had no
# variant among the top k, so its log-probability is the k-th one, an upper bound for each of its tokens.
YES_BOUNDED, NO_BOUNDED = 1, 2


class PromptOptions(pydantic.BaseModel):
    """The question wording and answer variants every LLM teacher takes."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    instruction: str = pydantic.Field(DEFAULT_INSTRUCTION, json_schema_extra=RESULTS,
                                      description="appended to every question")
    system: str | None = pydantic.Field(None, json_schema_extra=RESULTS,
                                        description="system prompt; null keeps the chat template's default")
    yes: tuple[str, ...] = pydantic.Field(DEFAULT_YES, min_length=1, json_schema_extra=RESULTS,
                                          description="Yes variants: those that are one token after the prompt count")
    no: tuple[str, ...] = pydantic.Field(DEFAULT_NO, min_length=1, json_schema_extra=RESULTS,
                                         description="No variants: those that are one token after the prompt count")

    def user_text(self, question: str) -> str:
        return f"{question} {self.instruction}".strip()


class HFOptions(HFModelOptions, PromptOptions):
    """Options every local transformers teacher takes."""


@dataclass(frozen=True)
class AnswerTokens:
    """Token ids of the Yes and No variants that are single tokens; the others are listed in `dropped`."""

    yes: dict[str, int]
    no: dict[str, int]
    dropped: dict[str, list[int]] = field(default_factory=dict)

    @property
    def yes_ids(self) -> list[int]:
        return sorted(set(self.yes.values()))

    @property
    def no_ids(self) -> list[int]:
        return sorted(set(self.no.values()))

    def describe(self) -> dict[str, Any]:
        return {"yes": self.yes, "no": self.no, "dropped_not_single_token": self.dropped}


def resolve_answer_tokens(tokenizer: Any, yes: Sequence[str], no: Sequence[str], prompt: str,
                          where: str = "teacher") -> AnswerTokens:
    """Each variant's token where the model writes its answer: `prompt` (a rendered prompt ending with the
    generation prompt) + the variant, tokenized as the prompt is; kept when the variant adds exactly one token
    after the prompt's own tokens. The others are listed in `dropped` with the tokens they add."""
    special = adds_special_tokens(tokenizer, prompt)
    context = list(tokenizer(prompt, add_special_tokens=special)["input_ids"])
    groups: dict[str, dict[str, int]] = {"yes": {}, "no": {}}
    dropped: dict[str, list[int]] = {}
    for group, variants in (("yes", yes), ("no", no)):
        for variant in variants:
            ids = [int(i) for i in tokenizer(prompt + variant, add_special_tokens=special)["input_ids"]]
            kept = ids[:len(context)] == context  # else the variant merged with the prompt's last token
            added = ids[common_prefix_length([ids, context]):]
            if kept and len(added) == 1:
                groups[group][variant] = added[0]
            else:
                dropped[variant] = added
        if not groups[group]:
            raise MakdError(f"{where}.{group}: none of the variants {list(variants)} is a single token of this model's "
                            f"tokenizer after its prompt (they add the tokens {[dropped[v] for v in variants]}); give "
                            "variants that are")
    overlap = set(groups["yes"].values()) & set(groups["no"].values())
    if overlap:
        raise MakdError(f"{where}: token ids {sorted(overlap)} are both a Yes and a No variant")
    return AnswerTokens(yes=groups["yes"], no=groups["no"], dropped=dropped)


def warn_low_mass(mass: np.ndarray, question_ids: Sequence[str], where: str) -> str | None:
    """Log (and return) a warning when the mean answer mass of a block of targets ([samples, Q], e.g. one shard) is
    below LOW_MASS, naming the questions with the least; None otherwise. The label job calls it per shard."""
    if not mass.size or not np.isfinite(mass).all() or float(mass.mean()) >= LOW_MASS:
        return None
    per_question = mass.mean(axis=0)
    worst = ", ".join(f"{question_ids[j]} {per_question[j]:.2f}" for j in np.argsort(per_question)[:3])
    message = (f"{where}: mean answer mass {float(mass.mean()):.3f} < {LOW_MASS}: the teacher mostly answers neither "
               f"Yes nor No (lowest: {worst}); check its prompt (instruction, system, chat_template_kwargs) and the "
               "answer tokens in labels.json")
    log.warning("warning: %s", message)
    return message


def logodds_and_mass(logits: Any, answers: AnswerTokens) -> tuple[np.ndarray, np.ndarray]:
    """[N, V] next-token logits (torch) -> (log-odds [N], mass [N]) float32, computed in float32."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    ly = torch.logsumexp(lp[:, answers.yes_ids], dim=-1)
    ln = torch.logsumexp(lp[:, answers.no_ids], dim=-1)
    return (ly - ln).cpu().numpy().astype(np.float32), (ly.exp() + ln.exp()).cpu().numpy().astype(np.float32)


def logodds_from_top(top: Sequence[tuple[str, float]], yes: Sequence[str], no: Sequence[str]) -> tuple[float, float, int]:
    """(log-odds, mass, flags) from a server's top-k (token string, logprob) list at the answer position.

    Every listed token whose string is a variant counts (two ids may decode to one string). A group with no
    variant in the list gets the k-th (smallest listed) logprob, and its flag bit is set.
    """
    kth = min(lp for _, lp in top)
    flags = 0
    groups = []
    for variants, bit in ((set(yes), YES_BOUNDED), (set(no), NO_BOUNDED)):
        found = [lp for token, lp in top if token in variants]
        if not found:
            flags |= bit
            found = [kth]
        groups.append(float(np.logaddexp.reduce(np.asarray(found, dtype=np.float64))))
    ly, ln = groups
    return ly - ln, float(np.exp(ly) + np.exp(ln)), flags
