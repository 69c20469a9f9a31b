"""Loss terms by name, combined as a weighted sum; every term is logged under its name.

A term is a function `(output, batch, **options) -> scalar`; its keyword options come from the config
(`loss.<name>.<option>`), and unknown options are rejected with the term's name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from makd.config import LossTerm
from makd.errors import MakdError
from makd.models import StudentOutput


@dataclass
class Batch:
    """Targets for one training batch; optional fields are None when no term needs them."""

    labels: torch.Tensor  # [B] class indices
    aspect_logodds: torch.Tensor | None = None  # [B, Q] teacher log-odds
    aspect_mass: torch.Tensor | None = None  # [B, Q] teacher answer mass


LossFn = Callable[..., torch.Tensor]
LOSS_TERMS: dict[str, LossFn] = {}
NEEDS_ASPECTS: set[str] = set()


def register(name: str, needs_aspects: bool = False) -> Callable[[LossFn], LossFn]:
    def decorator(fn: LossFn) -> LossFn:
        LOSS_TERMS[name] = fn
        if needs_aspects:
            NEEDS_ASPECTS.add(name)
        return fn

    return decorator


@register("ce")
def cross_entropy(out: StudentOutput, batch: Batch, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(out.class_logits, batch.labels, label_smoothing=label_smoothing)


@register("aspect_bce", needs_aspects=True)
def aspect_bce(out: StudentOutput, batch: Batch, temperature: float = 1.0, mass_weighting: bool = False) -> torch.Tensor:
    """The paper's term: mean BCE-with-logits of the aspect head against sigmoid(teacher log-odds / T).

    With `mass_weighting`, each (image, question) counts in proportion to how much probability the teacher
    put on answering Yes/No at all, so questions it did not answer in form barely teach.
    """
    if out.aspect_logits is None or batch.aspect_logodds is None:
        raise MakdError("loss.aspect_bce needs an aspect head and teacher labels (set labels.path and questions)")
    target = torch.sigmoid(batch.aspect_logodds / temperature)
    weight = batch.aspect_mass if mass_weighting else None
    loss = F.binary_cross_entropy_with_logits(out.aspect_logits.float(), target, weight=weight, reduction="sum")
    return loss / (weight.sum().clamp_min(1e-12) if weight is not None else target.numel())


class WeightedLoss:
    """sum_i w_i * term_i; returns the total and each weighted term's value for logging."""

    def __init__(self, terms: dict[str, LossTerm]) -> None:
        self.terms: list[tuple[str, float, LossFn, dict]] = []
        for name, term in terms.items():
            if name not in LOSS_TERMS:
                raise MakdError(f"loss.{name}: unknown loss term (choose from {', '.join(sorted(LOSS_TERMS))})")
            options = dict(term.model_extra or {})
            allowed = set(inspect.signature(LOSS_TERMS[name]).parameters) - {"out", "batch"}
            unknown = sorted(set(options) - allowed)
            if unknown:
                raise MakdError(f"loss.{name}: unknown option {unknown[0]!r} (options: {', '.join(sorted(allowed)) or 'none'})")
            if term.weight > 0:
                self.terms.append((name, term.weight, LOSS_TERMS[name], options))
        if not self.terms:
            raise MakdError("loss: every term has weight 0")

    @property
    def needs_aspects(self) -> bool:
        return any(name in NEEDS_ASPECTS for name, *_ in self.terms)

    def __call__(self, out: StudentOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {name: weight * fn(out, batch, **options) for name, weight, fn, options in self.terms}
        return sum(parts.values()), parts
