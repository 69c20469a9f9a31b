"""Cheaper seeds: the same small runs (the demo's setting, a few seeds) trained several ways, in one process tree.

Arms, each training the same runs into fresh folders, alternating round by round so that load on a shared
machine hits them alike:
- `sequential`: the way before, in today's code — one run after another, torch's default threads, float32, NCHW, a
  checkpoint per epoch, 256 images per evaluation batch, glibc giving freed memory back at every free. It shares the
  speed-ups of the code itself (augmentation fetched per batch, batch norms folded when testing), so against it
  only what the settings add counts;
- `issue`: the runs as makd trained them when the cheaper-seeds issue was filed: the code of commit 5a763cf (taken
  from this repository's history with `git archive`; needs a full clone), its demo recipe, one run after another in
  one process with torch's default threads. A check that `sequential` stands for "today's sequential runs" then;
- `stacked`: the seeds as one stacked model (`executor.batch_seeds`, makd/models/stacked.py), float32;
- `workers`: two worker processes with one torch thread each (`executor.workers: 2, threads: 1`);
- `bf16`: one run after another with bfloat16 autocast (`train.amp: bf16`; test accuracy still in float32). Faster,
  but it costs CE about one point of validation accuracy on this setting (configs/evidence/recipe-search.yaml), so
  neither the demo nor the evidence use it;
- `demo`: what `makd demo` and the evidence grids do: two 1-thread workers, float32, channels-last (NHWC), a
  checkpoint every 10 epochs, 128 images per evaluation batch (makd/configs/demo.yaml), freed memory kept for reuse
  (`train.keep_freed_memory`, the default: makd/engine/host_memory.py).
Every arm trains the same work: 120 epochs of a ResNet-8 on 200 images with 40 aspect targets, 6 validations of
1,000 images, the best and last students tested on 10,000. Each arm runs in a fresh process (a run's speed depends
on what the process's allocator went through before), timed there after its imports; the `workers` and `demo` arms
start their worker processes inside the timing, a cost they really have.
Last line: `runs_per_hour_vs_sequential=<x>` of the `demo` arm (with the `issue` arm, the line before it gives
`runs_per_hour_vs_issue_code=<x>`).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _history import package_at, python_at

from makd.config import builtin_config, load_config, resolve_path
from makd.data import build_splits
from makd.data.base import ImageSplit
from makd.experiment.executors import job_configs, run_job, run_local
from makd.experiment.grid import Executor
from makd.labels import label_split
from makd.questions import QuestionSet
from makd.teachers.base import AspectScores

# What runs did before: NCHW, a checkpoint every epoch, 256 images per evaluation batch, freed memory unmapped.
BEFORE = ["train.channels_last=false", "train.checkpoint_every=1", "train.eval_batch_size=256", "train.keep_freed_memory=false"]
FP32, BF16 = ["train.amp='off'", *BEFORE], ["train.amp=bf16", *BEFORE]
ARMS = {"sequential": (FP32, Executor(workers=1)), "stacked": (FP32, Executor(workers=1, batch_seeds=99)),
        "workers": (FP32, Executor(workers=2, threads=1)), "bf16": (BF16, Executor(workers=1)),
        "demo": (["train.amp='off'", "train.checkpoint_every=10"], Executor(workers=2, threads=1))}
HEADLINE = "demo"
ISSUE_COMMIT = "5a763cf"  # makd when the issue was filed: "a 120-epoch ResNet-8 run on 200 images takes 30-50 s here"
ISSUE_ARM = "issue"
# Runs makd as it was, in a child process (its package first on the path): the runs one after another, timed here.
ISSUE_DRIVER = """
import json, sys, time
from makd.config import builtin_config, load_config
from makd.engine import train
runs = json.loads(sys.argv[1])
configs = [load_config(base=builtin_config("demo"), overrides=overrides) for overrides in runs]
start = time.perf_counter()
for config in configs:
    train(config)
print(time.perf_counter() - start)
"""


def run_in_child(arm: str, runs: list[list[str]], workdir: Path, code: Path | None) -> float:
    """Seconds `arm` takes for `runs` (override lists on the demo recipe), timed in a fresh process (the `issue` arm
    with makd's package of then, `code`, first on the path): a run's speed depends on the state of the process's
    allocator (makd/engine/host_memory.py), so no arm inherits this one's."""
    if arm == ISSUE_ARM:
        command, env = [*python_at(code, ISSUE_DRIVER), json.dumps(runs)], None
    else:
        command, env = [sys.executable, __file__, "--child", arm, json.dumps(runs), str(workdir)], None
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"arm {arm}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    return float(done.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--arms", nargs="+", default=["sequential", HEADLINE], choices=[*ARMS, ISSUE_ARM],
                        help="arms to run (default: sequential, demo)")
    parser.add_argument("--child", nargs=3, metavar=("ARM", "RUNS", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    base = builtin_config("demo")
    if args.child:  # one arm's runs, in the fresh process run_in_child started
        arm, runs, workdir = args.child
        print(run_arm(arm, [load_config(base=base, overrides=run + ARMS[arm][0]) for run in json.loads(runs)], Path(workdir)))
        return 0
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
        code = package_at(ISSUE_COMMIT, root / "issue-code", ISSUE_ARM) if ISSUE_ARM in args.arms else None
        for r in range(args.rounds):
            for arm in args.arms:
                runs = [common + [f"out={root / arm / f'r{r}-s{s}'}", f"name=r{r}-s{s}", f"train.seed={s}"]
                        for s in range(args.seeds)]
                seconds = run_in_child(arm, runs, root / arm, code)
                times[arm] += seconds
                print(f"round {r}: {arm} {seconds:.1f} s for {args.seeds} runs", flush=True)
    runs = args.rounds * args.seeds
    print("| arm | seconds per run | runs per hour | vs sequential |")
    print("|---|---|---|---|")
    for arm, total in times.items():
        print(f"| {arm} | {total / runs:.1f} | {3600 * runs / total:.0f} | "
              f"{times.get('sequential', total) / total:.2f} |")
    if HEADLINE in times and ISSUE_ARM in times:
        print(f"runs_per_hour_vs_issue_code={times[ISSUE_ARM] / times[HEADLINE]:.2f}")
    if HEADLINE in times and "sequential" in times:
        print(f"runs_per_hour_vs_sequential={times['sequential'] / times[HEADLINE]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
