"""train.keep_freed_memory: with glibc keeping freed blocks, a training step stops page-faulting its activations in.

Measured in child processes: the setting is process-wide and cannot be undone, and the test suite's own process
keeps glibc's default behaviour."""

import subprocess
import sys

import pytest

from makd.config import load_config
from makd.engine import trainer

# A few training steps of the demo's student after one evaluation in batches of 64 (what made the next steps slower).
CHILD = """
import resource, sys, torch
torch.set_num_threads(1)
from makd.config import ModelConfig
from makd.engine.host_memory import keep_freed_memory
from makd.models import build_student

kept = keep_freed_memory() if sys.argv[1] == "keep" else None
model = build_student(ModelConfig(name="resnet8", width=16), 1, 10, 40, (0.5,), (0.25,))
x = torch.rand(32, 1, 28, 28)

def step():
    out = model(x)
    (out.class_logits.sum() + out.aspect_logits.sum()).backward()

for _ in range(3):
    step()
with torch.no_grad():
    model.eval(), model(torch.rand(64, 1, 28, 28)), model.train()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_of_ten_steps(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_stops_the_page_faults_of_training_steps():
    _, default = page_faults_of_ten_steps("default")
    kept, faults = page_faults_of_ten_steps("keep")
    assert kept == "True"
    assert default > 3000  # glibc gave the freed activations back: ~2.7 MB faulted in again at every step
    assert faults < default / 5


def test_the_trainer_keeps_freed_memory_only_when_asked(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(1) or True)
    tiny = ["data.train_per_class=2", "data.val_per_class=1", "data.test_per_class=1", "model.width=4",
            "loss.aspect_bce.weight=0", f"out={tmp_path}", "train.progress=false"]
    trainer.Trainer(load_config(overrides=tiny + ["train.keep_freed_memory=false"]))
    assert calls == []
    trainer.Trainer(load_config(overrides=tiny))
    assert calls == [1]
