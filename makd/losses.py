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
from makd.registry import Registry


@dataclass
class Batch:
    """Targets for one training batch; optional fields are None when no term needs them."""

    labels: torch.Tensor  # [B] class indices
    aspect_logodds: torch.Tensor | None = None  # [B, Q] teacher log-odds
    aspect_mass: torch.Tensor | None = None  # [B, Q] teacher answer mass
    teacher_logits: torch.Tensor | None = None  # [B, C] class logits of the KD teacher (kd_teacher)
    aspect_flags: torch.Tensor | None = None  # [B, Q] uint8 flags of the label store (nonzero: a bounded target)
    epoch: float = 0.0  # training progress in epochs, for terms with a warm-up


LossFn = Callable[..., torch.Tensor]
# Terms say what they need beside the labels: needs_aspects (teacher targets from the label store), needs_teacher
# (a KD teacher's class logits).
LOSSES: Registry[LossFn] = Registry("loss term", "loss", modules=("makd.losses",))
register = LOSSES.register


@register("ce")
def cross_entropy(out: StudentOutput, batch: Batch, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(out.class_logits, batch.labels, label_smoothing=label_smoothing)


@register("aspect_bce", needs_aspects=True)
def aspect_bce(out: StudentOutput, batch: Batch, temperature: float = 1.0, mass_weighting: bool = False,
               keep_bounded: bool = False) -> torch.Tensor:
    """The paper's term: mean BCE-with-logits of the aspect head against sigmoid(teacher log-odds / T).

    With `mass_weighting`, each (image, question) counts in proportion to how much probability the teacher
    put on answering Yes/No at all, so questions it did not answer in form barely teach. Pairs the label store
    flags (a teacher that saw only its top-k log-probabilities and found no Yes or no No among them: the log-odds
    are a bound, not a value) weigh 0 unless `keep_bounded`.
    """
    if out.aspect_logits is None or batch.aspect_logodds is None:
        raise MakdError("loss.aspect_bce needs an aspect head and teacher labels (set labels.path and questions)")
    target = torch.sigmoid(batch.aspect_logodds / temperature)
    weight = batch.aspect_mass if mass_weighting else None
    if batch.aspect_flags is not None and not keep_bounded:
        kept = (batch.aspect_flags == 0).to(target.dtype)
        weight = kept if weight is None else weight * kept
    loss = F.binary_cross_entropy_with_logits(out.aspect_logits.float(), target, weight=weight, reduction="sum")
    if weight is None:
        return loss / target.numel()
    return loss / shared_denominator(weight.sum()).clamp_min(1e-12)


def shared_denominator(local: torch.Tensor) -> torch.Tensor:
    """The denominator of a weighted mean over the global batch, for a loss that DDP then averages over processes:
    this process's total weight summed over every process, divided by their number (one process: the total). With
    each process's own total instead, processes whose shares weigh differently (kept pairs, positive boxes) would
    count alike, and N processes would not train as one."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    world = torch.distributed.get_world_size()
    if world == 1:
        return local
    total = local.detach().clone()
    torch.distributed.all_reduce(total)
    return total / world


def _teacher(out: StudentOutput, batch: Batch, term: str) -> tuple[torch.Tensor, torch.Tensor]:
    if batch.teacher_logits is None:
        raise MakdError(f"loss.{term} needs a KD teacher: set kd_teacher.checkpoint or kd_teacher.timm")
    return out.class_logits.float(), batch.teacher_logits.float()


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample z-score of the logits (Sun et al., CVPR 2024): only their shape is distilled, not their scale."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (1e-7 + logits.std(dim=1, keepdim=True))


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), summed over classes, averaged over the batch."""
    log_p = F.log_softmax(student / temperature, dim=1)
    q = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="none").sum(1).mean() * temperature**2


@register("kd", needs_teacher=True)
def kd(out: StudentOutput, batch: Batch, temperature: float = 4.0, standardized: bool = False) -> torch.Tensor:
    """Hinton et al. 2015: match the teacher's softened class distribution (T² keeps gradients T-independent)."""
    student, teacher = _teacher(out, batch, "kd")
    if standardized:
        student, teacher = standardize(student), standardize(teacher)
    return soft_kl(student, teacher, temperature)


@register("lskd", needs_teacher=True)
def lskd(out: StudentOutput, batch: Batch, temperature: float = 2.0) -> torch.Tensor:
    """KD on standardised logits (sunshangquan/logit-standardization-KD; their CIFAR setting: T = 2, weight 9)."""
    return kd(out, batch, temperature=temperature, standardized=True)


@register("dkd", needs_teacher=True)
def dkd(out: StudentOutput, batch: Batch, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
        warmup_epochs: float = 0.0, standardized: bool = False) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022, mdistiller): alpha · target-class KD + beta · non-target-class KD.

    TCKD compares the binary (target, rest) probabilities; NCKD the distribution over the other classes.
    mdistiller ramps the term up linearly over `warmup_epochs` (20 in its configs).
    """
    student, teacher = _teacher(out, batch, "dkd")
    if standardized:
        student, teacher = standardize(student), standardize(teacher)
    gt = F.one_hot(batch.labels, student.shape[1]).bool()
    p_s, p_t = F.softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1)
    binary_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1)
    binary_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(binary_s), binary_t, reduction="sum") / len(student) * temperature**2
    mask = 1000.0 * temperature * gt  # mdistiller subtracts 1000 after dividing by T: the target class drops out
    nckd = soft_kl(student - mask, teacher - mask, temperature)
    ramp = min(batch.epoch / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0
    return ramp * (alpha * tckd + beta * nckd)


class WeightedLoss:
    """sum_i w_i * term_i; returns the total and each weighted term's value for logging."""

    def __init__(self, terms: dict[str, LossTerm]) -> None:
        self.terms: list[tuple[str, float, LossFn, dict]] = []
        self.needs: set[str] = set()
        for name, term in terms.items():
            if name not in LOSSES:
                raise MakdError(f"loss.{name}: unknown loss term (choose from {', '.join(LOSSES.names())})")
            entry = LOSSES.entry(name)
            options = dict(term.model_extra or {})
            allowed = set(inspect.signature(entry.obj).parameters) - {"out", "batch"}
            unknown = sorted(set(options) - allowed)
            if unknown:
                raise MakdError(f"loss.{name}: unknown option {unknown[0]!r} (options: {', '.join(sorted(allowed)) or 'none'})")
            if term.weight > 0:
                self.terms.append((name, term.weight, entry.obj, options))
                self.needs |= {need for need in ("aspects", "teacher") if entry.info.get(f"needs_{need}")}
        if not self.terms:
            raise MakdError("loss: every term has weight 0")

    @property
    def needs_aspects(self) -> bool:
        return "aspects" in self.needs

    @property
    def needs_teacher(self) -> bool:
        return "teacher" in self.needs

    def __call__(self, out: StudentOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {name: weight * fn(out, batch, **options) for name, weight, fn, options in self.terms}
        return sum(parts.values()), parts
