"""Multi-seed comparisons: mean ± std per method and paired differences with a t confidence interval."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

if TYPE_CHECKING:
    from makd.config import Config


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


def train_grid(make_config: Callable[[str, int], "Config"], methods: list[str], seeds: int,
               progress: bool = True, jobs: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Train every (seed, method), seed-major so an interrupted comparison has balanced partial results; a run whose
    folder already holds results.json is read, not retrained.

    `jobs` > 1 trains that many runs at once in worker processes, each on cpu_count / jobs torch threads (unless
    the config sets `train.threads`): small students use many cores poorly, so parallel runs finish sooner."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from makd.atomic import read_json

    grid = [(seed, method) for seed in range(seeds) for method in methods]
    configs = {key: make_config(key[1], key[0]) for key in grid}
    results: dict[tuple[int, str], dict[str, Any]] = {}
    with logging_redirect_tqdm(), tqdm(total=len(grid), desc="training", unit="run", disable=not progress) as bar:
        def finished(key: tuple[int, str], result: dict[str, Any]) -> None:
            results[key] = result
            bar.update(1)
            bar.set_postfix_str(f"{configs[key].name}: {result['test_top1_best']:.2f}")

        todo = []
        for key in grid:
            done = Path(configs[key].out) / "results.json"
            if done.is_file():
                finished(key, read_json(done, "results"))
            else:
                todo.append(key)
        for key, result in _train_all([configs[key] for key in todo], todo, jobs):
            finished(key, result)
    return {m: [results[(seed, m)] for seed in range(seeds)] for m in methods}


def _train_all(configs: list["Config"], keys: list[Any], jobs: int):
    """Yield (key, results) as runs finish: in this process, or in `jobs` worker processes."""
    from makd.engine import train

    if jobs <= 1 or len(configs) <= 1:
        for key, config in zip(keys, configs):
            yield key, train(config)
        return
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_setup)
    try:
        futures = {pool.submit(_train_quietly, config, threads): key for key, config in zip(keys, configs)}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_setup() -> None:
    """A worker dies with the demo that started it (no orphan keeps writing into a run folder a resumed demo
    retrains), and logs makd's one-line run summaries like the parent."""
    import logging
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("makd").setLevel(logging.INFO)


def _train_quietly(config: "Config", threads: int) -> dict[str, Any]:
    """One run in a worker: no per-epoch progress bar (several would garble the terminal)."""
    from makd.engine import train

    train_section = config.train.model_copy(update={"progress": False, "threads": config.train.threads or threads})
    return train(config.model_copy(update={"train": train_section}))


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
