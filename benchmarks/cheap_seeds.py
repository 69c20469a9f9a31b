"""Cheaper seeds: the same small runs (the demo's setting, a few seeds) trained five ways, in one process tree.

Arms, each training the same runs into fresh folders, alternating round by round so that load on a shared
machine hits them alike:
- `sequential`: the way before — one run after another, torch's default threads, float32, NCHW, a checkpoint per
  epoch, 256 images per evaluation batch;
- `stacked`: the seeds as one stacked model (`executor.batch_seeds`, makd/models/stacked.py), float32;
- `workers`: two worker processes with one torch thread each (`executor.workers: 2, threads: 1`);
- `bf16`: one run after another with bfloat16 autocast (`train.amp: bf16`; test accuracy still in float32). Faster,
  but it costs CE about one point of validation accuracy on this setting (configs/evidence/recipe-search.yaml), so
  neither the demo nor the evidence use it;
- `demo`: what `makd demo` and the evidence grids do: two 1-thread workers, float32, channels-last (NHWC), a
  checkpoint every 10 epochs, 128 images per evaluation batch (makd/configs/demo.yaml).
Last line: `runs_per_hour_vs_sequential=<x>` of the `demo` arm.
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

from makd.config import builtin_config, load_config, resolve_path
from makd.data import build_splits
from makd.data.base import ImageSplit
from makd.experiment.executors import job_configs, run_job, run_local
from makd.experiment.grid import Executor
from makd.labels import label_split
from makd.questions import QuestionSet
from makd.teachers.base import AspectScores

# What runs did before this benchmark's changes: NCHW, a checkpoint every epoch, 256 images per evaluation batch.
BEFORE = ["train.channels_last=false", "train.checkpoint_every=1", "train.eval_batch_size=256"]
FP32, BF16 = ["train.amp='off'", *BEFORE], ["train.amp=bf16", *BEFORE]
ARMS = {"sequential": (FP32, Executor(workers=1)), "stacked": (FP32, Executor(workers=1, batch_seeds=99)),
        "workers": (FP32, Executor(workers=2, threads=1)), "bf16": (BF16, Executor(workers=1)),
        "demo": (["train.amp='off'", "train.checkpoint_every=10"], Executor(workers=2, threads=1))}
HEADLINE = "demo"


class SyntheticTeacher:
    """Fixed random log-odds per image (the teacher's cost is not what is measured here)."""

    name = "synthetic"
    batch_size = 4096

    def describe(self) -> dict:
        return {"name": self.name}

    def score(self, images, questions: QuestionSet) -> AspectScores:
        rng = np.random.default_rng(len(images))
        logodds = rng.normal(0, 1.5, size=(len(images), len(questions))).astype(np.float32)
        return AspectScores(logodds, np.ones_like(logodds))


def run_arm(arm: str, configs: list, workdir: Path) -> float:
    """Seconds to finish `configs` the arm's way."""
    executor = ARMS[arm][1]
    start = time.perf_counter()
    if executor.batch_seeds > 1:
        run_job(job_configs(configs))
    else:
        for _, _, error in run_local([job_configs([c]) for c in configs], executor, workdir):
            if error:
                raise SystemExit(f"{arm}: {error}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4, help="runs per arm and round (default 4)")
    parser.add_argument("--epochs", type=int, default=120, help="epochs per run (default 120, as in the demo)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every arm (default 1)")
    parser.add_argument("--arms", nargs="+", default=["sequential", "bf16", HEADLINE], choices=list(ARMS),
                        help="arms to run (default: sequential, bf16, demo)")
    args = parser.parse_args()
    base = builtin_config("demo")
    print(f"# cheap_seeds: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} default threads, {args.seeds} runs x {args.epochs} epochs per arm, "
          f"{args.rounds} round(s)", flush=True)
    times: dict[str, float] = {arm: 0.0 for arm in args.arms}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = [f"train.epochs={args.epochs}", "train.progress=false",
                  "train.tensorboard=false", f"labels.path={root / 'labels'}"]
        config = load_config(base=base, overrides=common)
        splits = build_splits(config.data)
        label_split(ImageSplit.concat([splits["train"], splits["test"]], "all"), SyntheticTeacher(),
                    QuestionSet.load(resolve_path(config.questions)), root / "labels", shard_size=20000, progress=False)
        for r in range(args.rounds):
            for arm in args.arms:
                runs = [load_config(base=base, overrides=common + ARMS[arm][0] + [
                    f"out={root / arm / f'r{r}-s{s}'}", f"name=r{r}-s{s}", f"train.seed={s}"]) for s in range(args.seeds)]
                seconds = run_arm(arm, runs, root / arm)
                times[arm] += seconds
                print(f"round {r}: {arm} {seconds:.1f} s for {args.seeds} runs", flush=True)
    runs = args.rounds * args.seeds
    print("| arm | seconds per run | runs per hour | vs sequential |")
    print("|---|---|---|---|")
    for arm, total in times.items():
        print(f"| {arm} | {total / runs:.1f} | {3600 * runs / total:.0f} | "
              f"{times.get('sequential', total) / total:.2f} |")
    if "sequential" in times and HEADLINE in times:
        print(f"runs_per_hour_vs_sequential={times['sequential'] / times[HEADLINE]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
