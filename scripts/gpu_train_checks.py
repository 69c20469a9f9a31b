"""Training's GPU paths, one check per call, one line each (for scripts/gpu_check.sh):

    python scripts/gpu_train_checks.py amp-bf16        # 3 epochs of the demo's ResNet-8 in bf16: finite, loss falls
    python scripts/gpu_train_checks.py amp-fp16        # the same in fp16 with the grad scaler
    python scripts/gpu_train_checks.py channels-last   # the same in fp32 with NHWC tensors (cuDNN, TF32)
    python scripts/gpu_train_checks.py compile         # a training step of the student: torch.compile vs eager
    python scripts/gpu_train_checks.py detection       # the tiny Faster R-CNN: one epoch on canvases, mAP computed
    python benchmarks/input_pipeline.py --device cuda  # the input pipeline (a benchmark of its own)

Tiny models made on the spot, Fashion-MNIST from the local package (`make data`), nothing downloaded. Each check
prints `<check>: ok ...` and exits 0, or `<check>: FAILED ...` and exits 1; `--device cpu` runs the same code
without a GPU (slowly); with the default `cuda` and no GPU it prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from makd.config import load_config
from makd.engine import train

STUDENT = ["data.train_per_class=50", "data.val_per_class=5", "data.test_per_class=5", "model.width=16",
           "loss.aspect_bce.weight=0", "train.epochs=3", "train.batch_size=64", "train.eval_every=3",
           "train.progress=false", "train.tensorboard=false", "optim.lr=0.05"]


def _rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "metrics.csv").open()))


def check_training(name: str, device: str, overrides: list[str]) -> str:
    """A short run of the demo's student with `overrides`: every loss finite and the last epoch's below the first."""
    with tempfile.TemporaryDirectory() as out:
        results = train(load_config(overrides=STUDENT + [f"out={out}", f"train.device={device}", *overrides]))
        rows = _rows(Path(out))
    losses = [float(r["loss"]) for r in rows]
    fine = all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    return (f"{name}: {'ok' if fine else 'FAILED'} loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
            f"{float(rows[-1]['images_per_s']):.0f} images/s, test top-1 {results['test_top1_last']:.1f}")


def check_compile(device: str, steps: int = 30) -> str:
    """Step time of the student (forward, CE, backward, SGD) eager and under torch.compile, the same inputs."""
    from makd.models import build_student

    config = load_config(overrides=STUDENT)
    dev = torch.device(device)
    x = torch.randn(64, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (64,), device=dev)

    def seconds_per_step(model: torch.nn.Module) -> tuple[float, float]:
        """(seconds per step, the first step's loss)."""
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def step() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x).class_logits, y)
            loss.backward()
            optimizer.step()
            return loss.detach()

        first = float(step())
        for _ in range(4):  # warm-up (compilation happens in the first step)
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps, first

    if dev.type == "cuda" and not any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang")):
        return "compile: FAILED no C compiler: torch.compile's Triton builds its launcher (apt-get install gcc python3-dev)"
    torch.manual_seed(0)
    eager, eager_loss = seconds_per_step(build_student(config.model, 1, 10, 0, (0.5,), (0.25,)).to(dev))
    torch.manual_seed(0)
    compiled, compiled_loss = seconds_per_step(torch.compile(build_student(config.model, 1, 10, 0, (0.5,), (0.25,)).to(dev)))
    same = abs(eager_loss - compiled_loss) <= 1e-3 * max(1.0, abs(eager_loss))  # the same weights and inputs
    return (f"compile: {'ok' if same else 'FAILED'} first loss eager {eager_loss:.5f}, compiled {compiled_loss:.5f}; "
            f"eager {eager * 1e3:.2f} ms/step, compiled {compiled * 1e3:.2f} ms/step, speed-up {eager / compiled:.2f}x")


def check_detection(device: str) -> str:
    """The tiny detector for one epoch on small canvases: finite losses, and validation/test mAP computed."""
    with tempfile.TemporaryDirectory() as out:
        results = train(load_config(overrides=[
            "task=detection", f"detection.root={Path(out) / 'canvases'}", "detection.canvases={train: 32, val: 8, test: 8}",
            "loss.aspect_bce.weight=0", "train.epochs=1", "train.batch_size=8", "train.eval_every=1",
            "train.progress=false", "train.tensorboard=false", f"train.device={device}", f"out={Path(out) / 'run'}"]))
        rows = _rows(Path(out) / "run")
    fine = all(math.isfinite(float(v)) for k, v in rows[0].items() if k.startswith("loss"))
    return (f"detection: {'ok' if fine else 'FAILED'} loss {float(rows[0]['loss']):.3f}, "
            f"{float(rows[0]['images_per_s']):.1f} images/s, test mAP {results['test_map_last']:.2f}")


CHECKS = {
    "amp-bf16": lambda device: check_training("amp-bf16", device, ["train.amp=bf16"]),
    "amp-fp16": lambda device: check_training("amp-fp16", device, ["train.amp=fp16"]),
    "channels-last": lambda device: check_training("channels-last", device, ["train.channels_last=true"]),
    "compile": check_compile,
    "detection": check_detection,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{args.check}: no GPU is present (torch.cuda.is_available() is False)")
        return 2
    line = CHECKS[args.check](args.device)
    print(line)
    return 0 if ": ok" in line else 1


if __name__ == "__main__":
    sys.exit(main())
