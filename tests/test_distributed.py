"""Real processes: torchrun DDP on the CPU (gloo) against one process — training with a batch-norm student,
validation and test sharded over the processes. (A SIGKILL mid-epoch, then resume: tests/test_trust.py.)"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from support.batch_norm_half import batch_norm_case, batch_norm_half

from makd.config import load_config
from makd.data import build_splits
from makd.data.transforms import InputSpec
from makd.engine import train
from makd.evaluate import evaluate_file, predict
from makd.models.student_file import load_student

pytestmark = pytest.mark.slow

BASE = {
    "data": {"train_per_class": 4, "val_per_class": 2, "test_per_class": 3, "augment": "none"},
    "loss": {"ce": {"weight": 1.0}, "aspect_bce": {"weight": 0.0}},
    "optim": {"lr": 0.05},
    "train": {"epochs": 2, "batch_size": 8, "eval_every": 1, "progress": False, "tensorboard": False, "threads": 1},
}
# A batch-norm student: with 4 images per process, train.sync_bn (auto) normalises over the global batch of 8.
RESNET = {"name": "resnet8", "width": 4}
# After one epoch (5 steps of 8 images), the largest difference in any weight or batch-norm statistic between one
# process and two: ~9e-4, float rounding that the ReLU network amplifies step by step — one process run with 2
# threads instead of 1 ends as far (~9e-4) from itself. With per-process statistics (train.sync_bn=false) the two
# processes end ~0.17 away: not the same training.
TOLERANCE = 1e-2


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
    # Small evaluation batches, so that both processes validate and test (20 and 30 images in batches of 4).
    cfg = config_file(tmp_path, model=RESNET, train={**BASE["train"], "epochs": 1, "eval_batch_size": 4})
    train(load_config(cfg, [f"out={tmp_path / 'one'}"]))  # the reference: one process (this one)
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "makd", "train",
               "-c", str(cfg), f"out={tmp_path / 'two'}"], tmp_path)
    assert two.stdout.count("test top-1") == 1  # rank 0 reports
    assert "per-process batch: 4 images (train.batch_size 8 over 2 processes)" in two.stderr
    assert "batch norm over the global batch: all-reduced batch statistics" in two.stderr
    a, b = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "two" / "last.safetensors")
    assert a.keys() == b.keys() and any("running_var" in k for k in a)
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) < TOLERANCE
    # Loss and accuracy are over the global batch: both processes' sums are combined.
    one_rows, two_rows = (list(csv.DictReader((tmp_path / r / "metrics.csv").open())) for r in ("one", "two"))
    assert len(one_rows) == len(two_rows) == 1
    for x, y in zip(one_rows, two_rows):
        for key in ("loss", "loss_ce", "train_top1", "lr"):
            assert float(x[key]) == pytest.approx(float(y[key]), abs=1e-3), key
        assert abs(float(x["val_top1"]) - float(y["val_top1"])) <= 100 / 20  # at most one of 20 images apart
    ckpt = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["state"]["global_step"] == 5
    # Every process tested its batches; together they are the one-process evaluation of the same file, to the bit.
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    alone = evaluate_file(str(tmp_path / "two" / "best.safetensors"), overrides=["train.eval_batch_size=4"])
    assert (results["test_top1_best"], results["test_top5_best"], results["test_ece_best"]) == \
        (alone["top1"], alone["top5"], alone["ece"])
    model, meta = load_student(tmp_path / "two" / "best.safetensors")
    test = build_splits(load_config(cfg).data)["test"]
    logits = predict(model, test, InputSpec(**meta["input"]), batch_size=4).class_logits
    assert np.array_equal(np.load(tmp_path / "two" / "test_class_logits_best.npy"), logits)
    val = evaluate_file(str(tmp_path / "two" / "last.safetensors"), split="val", overrides=["train.eval_batch_size=4"])
    assert float(two_rows[-1]["val_top1"]) == pytest.approx(val["top1"], abs=1e-9)


def test_all_reduce_batch_norm_is_batch_norm_over_both_processes_images():
    """The CPU path of train.sync_bn (torch's SyncBatchNorm has no CPU kernel): two gloo processes with 4 images each
    get the outputs, input gradients, summed parameter gradients and running statistics of one BatchNorm2d over all 8."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=batch_norm_half, args=(rank, port, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    halves = sorted((results.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for proc in procs:
        proc.join(timeout=60)
    x, norm, upstream = batch_norm_case()
    x.requires_grad_()
    out = norm(x)
    (out * upstream).sum().backward()
    as_tensor = torch.from_numpy
    for rank, left, half_out, half_grad, *_ in halves:
        assert left == 0
        torch.testing.assert_close(as_tensor(half_out), out[rank::2].detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(as_tensor(half_grad), x.grad[rank::2], atol=1e-5, rtol=0)
    (_, _, _, _, w0, b0, var, moved0, sent0), (_, _, _, _, w1, b1, _, moved1, sent1) = halves
    torch.testing.assert_close(as_tensor(w0 + w1), norm.weight.grad, atol=1e-4, rtol=1e-6)  # DDP averages: the sum/2
    torch.testing.assert_close(as_tensor(b0 + b1), norm.bias.grad, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(as_tensor(var), norm.running_var, atol=1e-6, rtol=0)
    per_process = torch.nn.BatchNorm2d(3)(x[0::2].detach())  # what a process normalising alone would output
    assert (per_process - out[0::2]).abs().max() > 1e-2
    # Per-process statistics (train.sync_bn off) differ after a step; before validating, every process takes rank 0's.
    assert np.abs(moved0 - moved1).max() > 1e-2
    assert np.array_equal(sent0, moved0) and np.array_equal(sent1, moved0)
