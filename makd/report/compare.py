"""Multi-seed comparisons, the one way makd compares methods (the demo, `makd experiment`, the evidence):
mean ± std per method, and paired differences against a reference method over the seeds both ran, with a
Student-t and a paired-bootstrap 95 % interval, the number of seeds better, and a verdict read off the interval.

Seeds are the pairing unit: two methods with the same seed share the data split, the initialisation and the batch
order, so their difference cancels most of what varies between seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 10_000


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
    low: float  # Student-t interval of the mean difference
    high: float
    wins: int  # seeds where the method is better
    n: int
    boot_low: float = float("nan")  # paired bootstrap (percentile) interval
    boot_high: float = float("nan")

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def verdict(self) -> str:
        """What the t interval says: better, worse, or within noise (the interval contains zero)."""
        if self.n < 2:
            return "no paired seeds" if self.n == 0 else "one seed: no interval"
        return "better" if self.low > 0 else "worse" if self.high < 0 else "within noise"

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def summarize(values: Sequence[float]) -> Summary:
    v = np.asarray(values, dtype=np.float64)
    return Summary(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v))


def bootstrap_interval(d: np.ndarray, confidence: float = CONFIDENCE, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `d` over resampled seeds (seeded: the same numbers every time)."""
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(method: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE) -> PairedDifference:
    """Mean of per-seed differences with a Student-t and a paired-bootstrap interval."""
    d = np.asarray(method, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    n = len(d)
    if n < 2:  # no interval (and no mean without a seed both ran)
        return PairedDifference(float(d.mean()) if n else float("nan"), float("nan"), float("nan"), int((d > 0).sum()), n)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / np.sqrt(n)
    boot = bootstrap_interval(d, confidence)
    return PairedDifference(float(d.mean()), float(d.mean() - half), float(d.mean() + half), int((d > 0).sum()), n,
                            *boot)


def paired(runs: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Values of `key` for the seeds both lists ran, in seed order (a missing seed is left out, not mispaired)."""
    mine = {r["seed"]: r[key] for r in runs}
    theirs = {r["seed"]: r[key] for r in reference}
    seeds = sorted(set(mine) & set(theirs))
    return [mine[s] for s in seeds], [theirs[s] for s in seeds]


CHECKPOINTS = {"best": "best on validation", "last": "last epoch"}


def compare_methods(results: dict[str, list[dict[str, Any]]], reference: str, metric: str = "test_top1") -> dict[str, Any]:
    """Per method and checkpoint (best-on-validation, last): summary, per-seed values and, against the reference,
    the paired difference. `results` maps a method to its runs' results (each with `seed` and `<metric>_best/_last`)."""
    numbers: dict[str, Any] = {}
    for method, runs in results.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
        for which in CHECKPOINTS:
            key = f"{metric}_{which}"
            values = [r[key] for r in runs]
            part: dict[str, Any] = {"summary": asdict(summarize(values)), "per_seed": values}
            if method != reference and results.get(reference):
                d = paired_difference(*paired(runs, results[reference], key))
                part["difference"] = {**asdict(d), "significant": d.significant, "verdict": d.verdict}
            entry[which] = part
        numbers[method] = entry
    return numbers


def comparison_table(results: dict[str, list[dict[str, Any]]], reference: str, metric: str = "test_top1",
                     label: str = "test top-1") -> tuple[list[str], dict[str, Any]]:
    """Markdown rows — both checkpoints, the paired difference to `reference` with the t and bootstrap intervals,
    seeds better, the verdict — and the numbers behind them."""
    numbers = compare_methods(results, reference, metric)
    rows = [f"| method | seeds | {label}, best on val | {label}, last epoch | Δ vs {reference}, best on val "
            f"[95% t CI] [bootstrap] | Δ vs {reference}, last epoch [95% t CI] | seeds better (best / last) | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    for method, entry in numbers.items():
        best, last = entry["best"], entry["last"]
        cells = [method, str(len(entry["seeds"])), _summary(best["summary"]), _summary(last["summary"])]
        if "difference" in best:
            b, la = best["difference"], last["difference"]
            cells += [f"{_diff(b)} [{b['boot_low']:+.2f}, {b['boot_high']:+.2f}]", _diff(la),
                      f"{b['wins']}/{b['n']} / {la['wins']}/{la['n']}", f"{b['verdict']} / {la['verdict']}"]
        else:
            cells += ["—", "—", "—", "reference"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows, numbers


def _summary(s: dict[str, Any]) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def _diff(d: dict[str, Any]) -> str:
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
