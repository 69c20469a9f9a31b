"""Running many training runs: each an ordinary run folder, finished ones read back instead of retrained."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from makd.atomic import read_json
from makd.config import Config
from makd.engine import train


def train_grid(make_config: Callable[[str, int], Config], methods: list[str], seeds: int,
               progress: bool = True, headline: str = "test_top1_best") -> dict[str, list[dict[str, Any]]]:
    """Train every (seed, method), seed-major so an interrupted comparison has balanced partial results; a run whose
    folder already holds results.json is read, not retrained. `headline` is the result shown in the progress bar."""
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    jobs = [(seed, method) for seed in range(seeds) for method in methods]
    with logging_redirect_tqdm(), tqdm(jobs, desc="training", unit="run", disable=not progress) as bar:
        for seed, method in bar:
            config = make_config(method, seed)
            done = Path(config.out) / "results.json"
            result = read_json(done, "results") if done.is_file() else train(config)
            results[method].append(result)
            bar.set_postfix_str(f"{config.name}: {result[headline]:.2f}")
    return results
