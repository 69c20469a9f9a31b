"""Cheaper seeds: K seeds of the embedded default's student trained one after another vs as one stacked model.

Both arms train the same runs (the demo's recipe: ResNet-8 width 16, Fashion-MNIST 20 images/class, CE + aspect
BCE on bridge-teacher-like synthetic targets, validation and the full test set at the end) into fresh folders, and
alternate round by round so that load on a shared machine hits both alike. Last line:
`runs_per_hour_vs_sequential=<x>` (finished runs per hour of the batched arm over the sequential one).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from makd.config import builtin_config, load_config
from makd.data import build_splits
from makd.data.base import ImageSplit
from makd.engine import train
from makd.engine.seed_batch import train_seeds
from makd.labels import label_split
from makd.questions import QuestionSet
from makd.teachers.base import AspectScores

QUESTIONS = 40


class SyntheticTeacher:
    """Fixed random log-odds per image (the bridge's cost is not what is measured here)."""

    name = "synthetic"
    batch_size = 4096

    def describe(self) -> dict:
        return {"name": self.name}

    def score(self, images, questions: QuestionSet) -> AspectScores:
        rng = np.random.default_rng(len(images))
        logodds = rng.normal(0, 1.5, size=(len(images), len(questions))).astype(np.float32)
        return AspectScores(logodds, np.ones_like(logodds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4, help="K: seeds per round (default 4)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run (default 20; the demo trains 120)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both arms (default 2)")
    args = parser.parse_args()
    base = builtin_config("demo")
    print(f"# seed_batch: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, K={args.seeds}, {args.epochs} epochs, {args.rounds} rounds", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = [f"train.epochs={args.epochs}", "train.eval_every=10", "train.progress=false",
                  "train.tensorboard=false", f"labels.path={root / 'labels'}"]
        config = load_config(base=base, overrides=common)
        questions = QuestionSet.load(Path(str(builtin_questions())))
        splits = build_splits(config.data)
        label_split(ImageSplit.concat([splits["train"], splits["test"]], "all"), SyntheticTeacher(), questions,
                    root / "labels", shard_size=20000, progress=False)

        def runs(arm: str, r: int) -> list:
            return [load_config(base=base, overrides=common + [f"out={root / arm / f'r{r}-s{s}'}", f"name=r{r}-s{s}",
                                                               f"train.seed={s}"]) for s in range(args.seeds)]

        times: dict[str, list[float]] = {"sequential": [], "batched": []}
        for r in range(args.rounds):
            start = time.perf_counter()
            for c in runs("sequential", r):
                train(c)
            times["sequential"].append(time.perf_counter() - start)
            start = time.perf_counter()
            train_seeds(runs("batched", r))
            times["batched"].append(time.perf_counter() - start)
            print(f"round {r}: sequential {times['sequential'][-1]:.1f} s, batched {times['batched'][-1]:.1f} s "
                  f"for {args.seeds} runs", flush=True)
    seq, bat = sum(times["sequential"]), sum(times["batched"])
    print("| arm | seconds per run | runs per hour |")
    print("|---|---|---|")
    for arm, total in (("sequential", seq), ("batched", bat)):
        per_run = total / (args.rounds * args.seeds)
        print(f"| {arm} | {per_run:.1f} | {3600 / per_run:.0f} |")
    print(f"runs_per_hour_vs_sequential={seq / bat:.2f}")
    return 0


def builtin_questions() -> Path:
    from makd.config import resolve_path

    return resolve_path("makd:fashion_mnist/questions.json")


if __name__ == "__main__":
    sys.exit(main())
