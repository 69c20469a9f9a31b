"""The newcomer's path, end to end through the CLI: own photos (fewer than 20 per class), an own question file
with hand-written class answers, a config with relative paths, every command run from another folder, a
warning about the teacher, and a run folder that still evaluates after the project moved."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from support.cli import run_makd
from support.data_packages import foolbox_photos

pytestmark = pytest.mark.slow

# foolbox's real photos (ImageNet and CIFAR), grouped as a newcomer would: 6 per class, 1 of them for test.
PHOTOS = {
    "animal": ["imagenet_00_243", "imagenet_16_251", "imagenet_14_129", "imagenet_15_99", "imagenet_17_22", "cifar10_00_3"],
    "vehicle": ["imagenet_06_609", "imagenet_07_609", "cifar10_06_1", "cifar10_09_1", "cifar10_11_9", "cifar10_14_9"],
    "landscape": ["cifar100_00_49", "cifar100_01_33", "cifar100_04_71", "cifar100_10_71", "cifar100_08_23", "imagenet_05_853"],
}
ANSWERS = {  # animal, vehicle, landscape
    "Is it alive?": (1, 0, 0.5), "Does it have wheels?": (0, 1, 0), "Does it have fur or feathers?": (1, 0, 0),
    "Is it made of metal?": (0, 1, 0), "Is there water or sky in the picture?": (0.5, 0.5, 1),
    "Can it carry people?": (0, 1, 0),
}


def makd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "makd", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, f"makd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def build_project(root: Path) -> None:
    files = {p.stem: p for p in foolbox_photos().iterdir()}
    for cls, names in PHOTOS.items():
        for i, name in enumerate(names):
            folder = root / "photos" / ("test" if i == len(names) - 1 else "train") / cls
            folder.mkdir(parents=True, exist_ok=True)
            Image.open(files[name]).convert("RGB").save(folder / f"{name}.jpg")
    classes = sorted(PHOTOS)
    (root / "questions").mkdir()
    (root / "questions" / "mine.json").write_text(json.dumps({"name": "mine", "classes": classes, "questions": [
        {"id": f"q{j}", "text": text, "class_answers": {c: answers[list(PHOTOS).index(c)] for c in classes}}
        for j, (text, answers) in enumerate(ANSWERS.items())]}))
    (root / "config").mkdir()
    (root / "config" / "photos.yaml").write_text(yaml.safe_dump({
        "name": "photos", "out": "../runs/photos", "questions": "../questions/mine.json",
        "data": {"dataset": "imagefolder", "root": "../photos", "image_size": 32},
        "teacher": {"name": "bridge", "batch_size": 8}, "labels": {"path": "../labels", "splits": ["train", "test"]},
        "model": {"name": "resnet8", "width": 4},
        "train": {"epochs": 2, "batch_size": 4, "eval_every": 1, "progress": False, "tensorboard": False}}))


def test_own_photos_relative_paths_from_another_folder(tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    build_project(project)
    elsewhere.mkdir()
    config = "../project/config/photos.yaml"

    labelled = makd("label", "-c", config, cwd=elsewhere)
    assert f"label store {project / 'labels'}: 15 samples x 6 questions" in labelled.stdout  # 12 train (3 held out for validation) + 3 test
    assert "Against the hand-written per-class answers in the question set, the teacher's class-mean answers" in labelled.stdout
    warning = next(line for line in labelled.stderr.splitlines() if "no close ImageNet class" in line)
    assert warning.startswith("warning: bridge teacher: ") and "'landscape' -> " in warning
    stand_ins = json.loads((project / "labels" / "labels.json").read_text())["teacher"]["stand_ins"]
    assert set(stand_ins) == set(PHOTOS) and stand_ins["landscape"][0]["cosine"] < 0.6

    # The other commands in this process (the same main a shell runs), still from their folders.
    shown = run_makd("labels", "show", "../project/labels", "-c", config, "--plot", "answers.png", cwd=elsewhere).stdout
    assert shown.splitlines()[-1] == "heatmap: answers.png" and (elsewhere / "answers.png").stat().st_size > 5000
    assert next(line for line in shown.splitlines() if line.startswith("mean P(yes)")).split()[-3:] == sorted(PHOTOS)

    trained = run_makd("train", "-c", config, cwd=elsewhere).stdout  # 4 training images per class: no few-shot subset
    run = project / "runs" / "photos"
    splits = json.loads((run / "splits.json").read_text())
    assert splits["train"]["per_class"] == {c: 4 for c in sorted(PHOTOS)} and splits["val"]["num_samples"] == 3
    assert f"report: {run / 'report.md'}" in trained

    # The project moves as a whole; evaluated from a third folder, the run still finds its data and label store.
    moved = tmp_path / "moved"
    shutil.move(project, moved)
    third = tmp_path / "third"
    third.mkdir()
    report = json.loads(run_makd("evaluate", "-m", str(moved / "runs" / "photos"), "--json", cwd=third).stdout)
    assert report["best"]["num_images"] == 3 and report["best"]["aspects"]["num_images"] == 3
    assert report["best"]["aspects"]["questions"] == list(ANSWERS)
