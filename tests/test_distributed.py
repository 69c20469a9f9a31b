"""Real processes: torchrun DDP on the CPU (gloo) against one process. (A SIGKILL mid-epoch, then resume:
tests/test_trust.py.)"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

BASE = {
    "data": {"train_per_class": 4, "val_per_class": 2, "test_per_class": 3, "augment": "none"},
    "loss": {"ce": {"weight": 1.0}, "aspect_bce": {"weight": 0.0}},
    "optim": {"lr": 0.05},
    "train": {"epochs": 2, "batch_size": 8, "eval_every": 1, "progress": False, "tensorboard": False, "threads": 1},
}
# LayerNorm only (no batch statistics, which each process would compute on its own share of the batch).
VIT = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 16, "depth": 1, "num_heads": 2}}


def config_file(tmp_path: Path, **sections) -> Path:
    data = {**BASE, **sections}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    cfg = config_file(tmp_path, model=VIT)
    one = run([sys.executable, "-m", "makd", "train", "-c", str(cfg), f"out={tmp_path / 'one'}"], tmp_path)
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "makd", "train",
               "-c", str(cfg), f"out={tmp_path / 'two'}"], tmp_path)
    assert one.stdout.count("test top-1") == 1 and two.stdout.count("test top-1") == 1  # rank 0 reports
    a, b = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "two" / "last.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    # Loss and accuracy are over the global batch: both processes' sums are combined.
    one_rows, two_rows = (list(csv.DictReader((tmp_path / r / "metrics.csv").open())) for r in ("one", "two"))
    assert len(one_rows) == len(two_rows) == 2
    for x, y in zip(one_rows, two_rows):
        for key in ("loss", "loss_ce", "train_top1", "val_top1", "lr"):
            assert float(x[key]) == pytest.approx(float(y[key]), abs=1e-4), key
    ckpt = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["state"]["global_step"] == 10
    assert json.loads((tmp_path / "two" / "results.json").read_text())["best_epoch"] in (1, 2)
