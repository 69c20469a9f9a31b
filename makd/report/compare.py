"""Multi-seed comparisons: mean ± std per method and paired differences with a t confidence interval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    low: float
    high: float
    wins: int
    n: int

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def summarize(values: list[float]) -> Summary:
    v = np.asarray(values, dtype=np.float64)
    return Summary(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v))


def paired_difference(method: list[float], baseline: list[float], confidence: float = 0.95) -> PairedDifference:
    """Mean of per-seed differences with a Student-t interval (seeds are the pairing unit)."""
    d = np.asarray(method, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    n = len(d)
    if n < 2:
        return PairedDifference(float(d.mean()), float("nan"), float("nan"), int((d > 0).sum()), n)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / np.sqrt(n)
    return PairedDifference(float(d.mean()), float(d.mean() - half), float(d.mean() + half), int((d > 0).sum()), n)


def comparison_table(results: dict[str, list[dict[str, Any]]], baseline: str) -> tuple[list[str], dict[str, Any]]:
    """Markdown rows (test top-1 of the best-on-validation and last checkpoints, paired difference to `baseline`)
    and the numbers behind them."""
    base = [r["test_top1_best"] for r in results[baseline]]
    rows = [f"| method | test top-1, best on val (mean ± std) | test top-1, last epoch | Δ vs {baseline}, paired "
            "[95% CI] | seeds better |", "|---|---|---|---|---|"]
    numbers: dict[str, Any] = {}
    for method, runs in results.items():
        best = [r["test_top1_best"] for r in runs]
        last = [r["test_top1_last"] for r in runs]
        entry: dict[str, Any] = {"best": summarize(best).__dict__, "last": summarize(last).__dict__, "per_seed_best": best}
        diff = better = "—"
        if method != baseline:
            d = paired_difference(best, base)
            entry["paired_difference"] = {**d.__dict__, "significant": d.significant}
            diff = f"{d}" + ("" if d.significant else " (within noise)")
            better = f"{d.wins}/{d.n}"
        rows.append(f"| {method} | {summarize(best)} | {summarize(last)} | {diff} | {better} |")
        numbers[method] = entry
    return rows, numbers
