"""Detection through the real CLI on a COCO-format folder (label with a SIGKILL and resume -> train -> evaluate ->
predict -> export), and 2-process DDP training under torchrun."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from conftest import PixelTeacher
from PIL import Image
from safetensors.torch import load_file
from support.cli import run_makd

from makd.config import load_config, resolve_path
from makd.detection.crops import crops_to_label
from makd.detection.data import build_detection_splits, ensure_canvases
from makd.detection.evaluate import evaluate_detector_file
from makd.detection.model_file import load_detector
from makd.engine import train
from makd.labels import LabelStore, label_split
from makd.questions import QuestionSet

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


makd = run_makd  # in this process (the same main a shell runs); real processes where a kill or torchrun needs them


@pytest.fixture(scope="module")
def coco_project(tmp_path_factory):
    """A user's COCO folder (train/val images + instances JSONs, one training image without boxes) and a config."""
    root = tmp_path_factory.mktemp("coco-project")
    canvases = ensure_canvases(load_config(overrides=["task=detection", f"detection.root={root / 'canvases'}",
                                                      "detection.canvases={train: 10, val: 4, test: 6}"]))
    coco = root / "coco"
    for split, folder in (("train", "train2017"), ("val", "val2017")):
        (coco / folder).mkdir(parents=True)
        for png in (canvases / split).iterdir():
            (coco / folder / png.name).write_bytes(png.read_bytes())
    data = json.loads((canvases / "annotations" / "instances_train.json").read_text())
    Image.new("L", (128, 128)).save(coco / "train2017" / "empty.png")
    data["images"].append({"id": 500, "file_name": "empty.png", "height": 128, "width": 128})
    (coco / "annotations").mkdir()
    (coco / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    (coco / "annotations" / "instances_val2017.json").write_text((canvases / "annotations" / "instances_val.json").read_text())
    config = {
        "task": "detection", "name": "coco-tiny", "out": "runs/coco-tiny", "questions": "makd:fashion_mnist/questions.json",
        "detection": {"dataset": "coco", "train_images": str(coco / "train2017"),
                      "train_annotations": str(coco / "annotations" / "instances_train2017.json"), "val_holdout": 3,
                      "test_images": str(coco / "val2017"), "test_annotations": str(coco / "annotations" / "instances_val2017.json"),
                      "model": {"name": "tiny"}},
        "teacher": {"name": "bridge", "batch_size": 1},
        "labels": {"path": "labels", "splits": ["train", "test"], "shard_size": 4},
        "train": {"epochs": 2, "batch_size": 4, "eval_every": 1, "progress": False, "tensorboard": False, "threads": 1},
        "optim": {"lr": 0.01},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def test_coco_folder_label_train_evaluate_predict_export(coco_project):
    root = coco_project
    labels = root / "labels"
    proc = subprocess.Popen([sys.executable, "-m", "makd", "label", "-c", "config.yaml"], cwd=root, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (labels / "shard-00001.parquet").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in labels.glob("shard-*.parquet")}
    store = LabelStore.open(labels)
    assert 2 <= len(done) < store.num_shards, "the kill should land between the first and the last shard"
    finished = makd("label", "-c", "config.yaml", cwd=root)
    assert {n: (labels / n).stat().st_mtime_ns for n in done} == done  # finished shards were not recomputed
    assert "complete: every sample covered exactly once" in makd("labels", "check", "labels", cwd=root).stdout
    ids, logodds, _ = LabelStore.open(labels).read()
    # The teacher report and the checks join the store's rows to the config's box crops (not to whole images).
    assert f"({len(ids)} images)." in finished.stdout
    checked = makd("labels", "check", "-c", "config.yaml", cwd=root).stdout
    assert f"train+test: {len(ids)} of {len(ids)} samples have a row" in checked
    shown = makd("labels", "show", "labels", "-c", "config.yaml", cwd=root).stdout
    assert "per class: give the store's config" not in shown and shown.count("\n") > 10
    splits = build_detection_splits(load_config(root / "config.yaml"))
    train, test = splits["train"], splits["test"]
    assert ids == train.all_box_ids() + test.all_box_ids() and logodds.shape[1] == 40  # validation boxes are not labelled

    out = makd("train", "-c", "config.yaml", cwd=root).stdout
    assert "test mAP" in out and "mAP50" in out
    run = root / "runs" / "coco-tiny"
    results = json.loads((run / "results.json").read_text())
    assert results["aspect_agreement_best"]["num_boxes"] == test.num_boxes
    assert len(list(csv.DictReader((run / "metrics.csv").open()))) == 2
    splits = json.loads((run / "splits.json").read_text())
    assert splits["train"]["num_images"] + splits["val"]["num_images"] == 11  # 3 training images held out for validation

    both = json.loads(makd("evaluate", "-m", str(run), "--json", cwd=root).stdout)  # the run folder: best and last
    report = both["best"]
    assert report["map"] == pytest.approx(results["test_map_best"], abs=1e-9) and report["num_images"] == 4
    assert report["aspects"]["num_boxes"] == results["aspect_agreement_best"]["num_boxes"]
    assert both["last"]["map"] == pytest.approx(results["test_map_last"], abs=1e-9)

    image = sorted((root / "coco" / "val2017").iterdir())[0]
    printed = json.loads(makd("predict", "-m", str(run / "best.safetensors"), str(image), "--score-threshold", "0.05",
                              "--out-dir", "drawn", "--json", cwd=root).stdout)[0]
    assert printed["drawn"] == str(Path("drawn") / f"{image.stem}.pred.png")
    with Image.open(root / "drawn" / f"{image.stem}.pred.png") as drawn:
        assert drawn.size == (512, 512) and len(drawn.getcolors(1 << 20)) > 10
    assert all(len(b["aspects"]) == 3 and b["class"] in train.class_names and b["score"] >= 0.05 for b in printed["boxes"])

    exported = makd("export", "-m", str(run / "best.safetensors"), "-o", "det.onnx", cwd=root).stdout
    assert "max |ONNX - PyTorch|" in exported
    model, _ = load_detector(run / "best.safetensors")
    x = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32) / 255.0)[None]
    with torch.inference_mode():
        expected = model([x])[0]
    session = ort.InferenceSession(str(root / "det.onnx"), providers=["CPUExecutionProvider"])
    boxes, labels_, scores, aspects = session.run(None, {"image": x.numpy()})
    assert len(boxes) == len(expected["boxes"]) > 0 and aspects.shape == (len(boxes), 40)
    np.testing.assert_allclose(boxes, expected["boxes"].numpy(), atol=1e-3)
    np.testing.assert_allclose(aspects, expected["aspect_logits"].numpy(), atol=1e-3)
    assert labels_.tolist() == expected["labels"].tolist()

    bad = subprocess.run([sys.executable, "-m", "makd", "train", "-c", "config.yaml", "detection.train_annotations=missing.json",
                          "out=runs/bad"], cwd=root, capture_output=True, text=True, env=ENV, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == f"makd: error: COCO annotations not found: {root / 'missing.json'}"


@pytest.fixture(scope="module")
def pixel_labels(coco_project) -> Path:
    """A label store of the project's training and test boxes of its own (not the one the first test makes), from
    the deterministic stand-in teacher of tests/conftest.py: cheap, and no test reads another's files."""
    config = load_config(coco_project / "config.yaml")
    questions = QuestionSet.load(resolve_path(config.questions))
    out = coco_project / "pixel-labels"
    label_split(crops_to_label(config), PixelTeacher(), questions, out, shard_size=64, progress=False)
    return out


def test_two_processes_train_a_detector_as_one_process(coco_project, pixel_labels, tmp_path):
    """2-process DDP against one process on the same global batch of 4, aspect term on: the detector's sampling draws
    per image and the aspect loss is normalised over the global batch, so the runs end within float rounding: 6e-8
    apart measured (stricter than classification's batch-norm tolerance: this GroupNorm detector does not amplify
    rounding as that ReLU/batch-norm student does), against 4e-4 when torchvision's batch-order draws are kept.
    Validation and test are sharded (one image per evaluation batch)."""
    cfg = tmp_path / "ddp.yaml"
    config = yaml.safe_load((coco_project / "config.yaml").read_text())
    config.update({"loss": {"ce": {"weight": 1.0}, "aspect_bce": {"weight": 1.0}}, "labels": {"path": str(pixel_labels)}})
    config["train"]["eval_batch_size"] = 1
    cfg.write_text(yaml.safe_dump(config))
    train(load_config(cfg, [f"out={tmp_path / 'one'}"]))  # the reference: one process (this one)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "makd",
                           "train", "-c", str(cfg), f"out={tmp_path / 'two'}"], cwd=coco_project, capture_output=True,
                          text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test mAP") == 1  # rank 0 reports
    ckpt = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    # 11 images - 3 held out = 8 training images, global batch 4: 2 steps per epoch, 2 epochs.
    assert ckpt["world_size"] == 2 and ckpt["state"]["global_step"] == 4
    a, b = (load_file(tmp_path / run / "last.safetensors") for run in ("one", "two"))
    assert a.keys() == b.keys() and max((a[k].double() - b[k].double()).abs().max().item() for k in a) < 1e-5
    one_rows, two_rows = (list(csv.DictReader((tmp_path / run / "metrics.csv").open())) for run in ("one", "two"))
    assert len(one_rows) == len(two_rows) == 2
    for x, y in zip(one_rows, two_rows):
        assert float(y["loss_aspect"]) > 0
        for key in ("loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_aspect"):
            assert float(x[key]) == pytest.approx(float(y[key]), rel=1e-5), key
    # Each process tested its images; the gathered detections are scored as one process scores the same file.
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    alone = evaluate_detector_file(str(tmp_path / "two" / "best.safetensors"))
    assert (results["test_map_best"], results["test_map50_best"]) == (alone["map"], alone["map50"])
    assert results["aspect_agreement_best"]["mean_correlation"] == alone["aspects"]["mean_correlation"]


def test_demo_detection_small(tmp_path):
    """`makd demo detection` end to end on a shrunken setting: the table, the report and the per-seed runs."""
    out = tmp_path / "demo"
    proc = makd("demo", "detection", "--out", out, "--seeds", "2", "--no-progress", "detection.canvases.train=8",
                "detection.canvases.val=4", "detection.canvases.test=6", "labels.max_per_class.test=2", "train.epochs=1",
                "train.eval_every=1", cwd=tmp_path)
    assert "| MaKD | 2 |" in proc.stdout and "report:" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]["map"]) == {"CE", "MaKD", "permuted"}
    per_seed = [json.loads((out / "runs" / f"makd-s{s}" / "results.json").read_text())["test_map50_best"] for s in (0, 1)]
    assert summary["methods"]["map50"]["MaKD"]["best"]["per_seed"] == per_seed
    for png in ("map.png", "predictions.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG"
    assert "| permuted |" in (out / "comparison" / "tables.md").read_text()
