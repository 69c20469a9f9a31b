"""Slurm through submitit's local cluster (real job processes, real signals): a cell requeued at its time limit
finishes bit-exact, `makd label --executor slurm` workers fill one store; what makd asks Slurm for."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_question_set
from safetensors.torch import load_file

from makd.config import ExecutorConfig, load_config

TRAIN = ["data.train_per_class=8", "data.val_per_class=2", "data.test_per_class=2", "data.augment=auto",
         "model.width=4", "model.drop_rate=0.2", "loss.aspect_bce.weight=0", "train.epochs=2", "train.batch_size=4",
         "train.eval_every=1", "train.checkpoint_every_steps=1", "train.threads=1", "train.progress=false",
         "train.tensorboard=false"]


def test_what_makd_asks_slurm_for():
    from makd.experiment.slurm import parameters

    asked = parameters(ExecutorConfig(name="slurm", partition="gpu", gpus=4, nodes=2, array_parallelism=2))
    assert asked == {"name": "makd", "tasks_per_node": 4, "timeout_min": 240, "gpus_per_node": 4, "nodes": 2,
                     "slurm_partition": "gpu", "slurm_array_parallelism": 2}  # one process per GPU, makd's time limit
    assert parameters(ExecutorConfig(name="slurm", gpus=4, tasks_per_node=1))["tasks_per_node"] == 1
    assert parameters(ExecutorConfig(name="slurm"))["tasks_per_node"] == 1


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_a_cell_that_reaches_its_time_limit_is_requeued_and_finishes_bit_exact(tmp_path):
    """Slurm signals a job (USR2) `signal_delay_s` before its time limit; submitit's handler in the job calls the
    Checkpointable's checkpoint() and requeues it. The test sends that signal to the job's task mid-epoch."""
    from makd.engine import train
    from makd.experiment.grid import Grid
    from makd.experiment.runner import run_grid

    train(load_config(overrides=[*TRAIN, f"out={tmp_path / 'reference'}"]))  # uninterrupted, in this process
    grid = {"name": "requeue", "out": "out", "overrides": TRAIN, "methods": {"CE": None}, "seeds": [0],
            "executor": {"name": "slurm", "cluster": "local", "time_min": 5}}  # <= 10 min: submitit counts a time-out
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(run=run_grid(Grid.load(tmp_path / "grid.yaml"), progress=False)))
    runner.start()
    folder, checkpoint, interrupted = tmp_path / "out" / "submitit", tmp_path / "out" / "runs" / "ce-s0" / "checkpoints" / "last.pt", None
    deadline = time.time() + 240
    while runner.is_alive() and time.time() < deadline and interrupted is None:
        try:
            state = torch.load(checkpoint, weights_only=True)["state"]
        except (FileNotFoundError, RuntimeError, EOFError):
            state = None
        if state and state["epoch"] == 0 and state["step_in_epoch"] >= 3:  # mid-epoch: 20 steps an epoch
            controller = int(next(folder.glob("*_submitted.pkl")).name.split("_")[0])  # local job id = its pid
            (task,) = children(controller)
            os.kill(task, signal.SIGUSR2)
            interrupted = state["global_step"]
        time.sleep(0.02)
    runner.join(timeout=300)
    assert interrupted is not None, "the cell finished before it could be interrupted"
    run = outcome["run"]
    assert set(run.results) == {"ce-s0"} and not run.failed
    log = "".join(p.read_text() for p in folder.glob("*_0_log.*"))
    assert "this job is timed-out" in log and "Requeued job" in log and log.count("Starting with") == 2
    resumed = re.search(r"resumed \S+ at epoch (\d+) step (\d+)", log)  # from its checkpoint, not from scratch
    assert resumed and (int(resumed.group(1)), int(resumed.group(2))) >= (0, interrupted)
    a, b = load_file(tmp_path / "reference" / "last.safetensors"), load_file(tmp_path / "out" / "runs" / "ce-s0" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_label_workers_as_a_slurm_array_fill_one_store(tmp_path, capsys):
    from support.random_models import save_random_lm

    from makd.cli import main as cli_main
    from makd.data import build_splits
    from makd.labels import LabelStore

    data = {"train_per_class": 2, "val_per_class": 1, "test_per_class": 1}
    classes = build_splits(load_config(overrides=[f"data.{k}={v}" for k, v in data.items()]).data)["train"].class_names
    make_question_set(classes, n=3).save(tmp_path / "q.json")
    config = {"data": data, "questions": "q.json", "labels": {"path": "labels", "shard_size": 4},
              "teacher": {"name": "text", "model": str(save_random_lm(tmp_path / "lm"))},
              "executor": {"cluster": "local", "threads": 1}}
    (tmp_path / "label.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["label", "-c", str(tmp_path / "label.yaml"), "--executor", "slurm", "--workers", "2"]) == 0
    assert "label store" in capsys.readouterr().out
    store = LabelStore.open(tmp_path / "labels")
    coverage = store.check()
    assert coverage.complete and len(coverage.sample_ids) == 2 * len(classes)
    logs = [p.read_text() for p in (tmp_path / "submitit").glob("*_0_log.out")]
    assert len(logs) == 2 and all("Job completed successfully" in text for text in logs)  # two workers, two jobs
