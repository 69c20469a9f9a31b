"""When the `hf` teacher shares an image prefix across questions, and how it keeps itself honest.

Decided once per model: `prefix_reuse: auto` reuses for the architectures whose equality with the naive
one-question-per-forward reference the tests prove (PROVEN_PREFIX_REUSE), `on` for any, `off` never; a model whose
layers a copied cache cannot continue (`SuffixLayout.form == "plain"`) never does.

Re-checked per shard: the first image of every shard (`start_shard`) is scored both ways, through the shared prefix
and by the processor on every full prompt, and compared (`reuse_mismatch`). A mismatch, or any failure of the
shared-prefix forward other than running out of memory, turns reuse off for the rest of THAT shard only (a warning
the first time for each reason; `prefix_reuse=on` stops instead): the next shard checks again. Running out of
memory is not a mismatch: the teacher retries the batch smaller and keeps reuse (`counters.out_of_memory`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from makd.errors import MakdError, first_line
from makd.teachers.hf_adapter import SuffixLayout

log = logging.getLogger("makd")

# model_type values for which tests/test_hf_teacher.py proves prefix reuse equal to the naive one-question-per-forward
# reference (README and docs/teachers.md list exactly these; a test checks it).
PROVEN_PREFIX_REUSE = frozenset({
    "aya_vision", "gemma3", "idefics3", "internvl", "llava", "llava_next", "llava_onevision", "mistral3", "qwen2_5_vl",
    "qwen2_vl", "qwen3_vl", "smolvlm"})


def reuse_mismatch(shared: np.ndarray, plain: np.ndarray, dtype: str, tolerance: float | None,
                   noise: float = 0.0) -> str | None:
    """Why shared-prefix log-odds of one image do not reproduce the plain forward's, or None when they do.

    float32: max |difference| <= 1e-3 (measured up to 1.6e-4 on a trained 30-layer LM, 3e-6 on the test models).
    16-bit: rounding alone moves log-odds by amounts that depend on the model (measured 0.02-0.06 on the test
    models, 0.3 on a trained 30-layer LM in bf16, where an off-by-one position moves them 1.3), so no fixed bound
    fits: the bound is 3x `noise` — the rounding measured on this image, scoring prompts alone vs in their padded
    batch (`HFVLMTeacher._rounding_noise`) — and at least 5 % of the spread of the plain log-odds over the
    questions, and 0.02 (docs/teachers.md gives the measurements).
    """
    diff = float(np.max(np.abs(shared - plain)))
    if tolerance is None:
        spread = float(np.ptp(plain)) if plain.size else 0.0
        tolerance = 1e-3 if dtype == "float32" else max(3 * noise, 0.05 * spread, 0.02)
    if diff <= tolerance:
        return None
    return f"its log-odds differ from the plain forward's by {diff:.3g} (> {tolerance:.3g})"


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or any RuntimeError that says "out of memory" (other backends, cuBLAS allocations)."""
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (isinstance(exc, RuntimeError)
                                                            and "out of memory" in str(exc).lower())


@dataclass
class ReuseCounters:
    """What happened so far in this process (`HFVLMTeacher.counters()`; a health signal for logs and tests)."""

    shared_images: int = 0  # scored through the shared prefix
    plain_images: int = 0  # scored with full prompts
    checks: int = 0  # shards whose first image was compared with the plain path
    check_failures: int = 0  # ... and differed (reuse off for that shard)
    forward_failures: int = 0  # shared-prefix forwards that raised (reuse off for that shard)
    out_of_memory: int = 0  # forwards retried smaller after running out of memory

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ReusePolicy:
    """Whether the next image goes through the shared prefix, and the per-shard check (module docstring)."""

    def __init__(self, mode: Literal["auto", "on", "off"], check: bool, model: str, model_type: str,
                 layout: SuffixLayout) -> None:
        self.mode = mode
        self.check = check
        self.describe_model = f"{model!r} ({model_type})"
        self.counters = ReuseCounters()
        self.enabled = mode == "on" or (mode == "auto" and model_type in PROVEN_PREFIX_REUSE)
        self._off: str | None = None  # why reuse is off for the current shard
        self._checked = False
        self._told: set[str] = set()
        if self.enabled and layout.form == "plain":
            self._give_up(layout.reason, for_good=True)
        elif self.enabled and layout.form == "batched":
            log.warning("question suffixes of %s run as batched rows, not packed: %s", self.describe_model, layout.reason)

    @property
    def active(self) -> bool:
        return self.enabled and self._off is None

    @property
    def wants_check(self) -> bool:
        return self.active and self.check and not self._checked

    def start_shard(self) -> None:
        self._off = None
        self._checked = False

    def verified(self, problem: str | None) -> bool:
        """Record the check of this shard's first image; a mismatch turns reuse off for the shard."""
        self._checked = True
        self.counters.checks += 1
        if problem is None:
            return True
        self.counters.check_failures += 1
        self._give_up(problem)
        return False

    def failed(self, exc: BaseException) -> None:
        """A shared-prefix forward raised (not out of memory): reuse off for the shard."""
        self.counters.forward_failures += 1
        self._give_up(f"the shared-prefix forward failed ({type(exc).__name__}: {first_line(exc)[:200]})")

    def _give_up(self, reason: str, for_good: bool = False) -> None:
        if self.mode == "on":
            raise MakdError(f"teacher.prefix_reuse=on: {self.describe_model} cannot share an image prefix: {reason}; "
                            "use prefix_reuse=off or auto")
        if for_good:
            self.enabled = False
        self._off = reason
        scope = "" if for_good else " for the rest of this shard (checked again on the next one)"
        if reason not in self._told:  # once per reason: a model that fails every shard logs it once
            self._told.add(reason)
            log.warning("prefix reuse off for %s%s: %s; scoring with the plain path", self.describe_model, scope, reason)
