"""End-to-end: the real CLI in subprocesses on tiny real-format data, checking artifacts' contents."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from support.cli import Ran, run_makd
from support.data_packages import foolbox_photos

from makd.config import resolve_path
from makd.labels import LabelStore
from makd.questions import QuestionSet

pytestmark = pytest.mark.slow

CLASSES = ["Sandal", "T-shirt_top", "Trouser"]
QUESTIONS = ["Is the item worn on the feet?", "Does the item have sleeves?", "Does the item have two separate legs?",
             "Does the item have a sole?", "Is the item worn on the upper body?"]


makd = run_makd  # in this process; `makd_process` where a real process matters


def makd_process(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "makd", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"makd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_imagefolder):
    """A user's project: an ImageFolder dataset, a question file, a config."""
    root = tmp_path_factory.mktemp("project")
    QuestionSet.model_validate({"name": "tiny", "classes": CLASSES, "generation": {"source": "test"},
                                "questions": [{"id": f"q{i}", "text": t} for i, t in enumerate(QUESTIONS)]}
                               ).save(root / "questions.json")
    config = {
        "name": "tiny", "out": "runs/tiny", "questions": "questions.json",
        "data": {"dataset": "imagefolder", "root": str(tiny_imagefolder), "train_per_class": 4, "val_per_class": 2,
                 "image_size": 32},
        "teacher": {"name": "bridge", "batch_size": 8},
        "labels": {"path": "labels", "splits": ["train", "test"], "shard_size": 5},
        "model": {"name": "resnet8", "width": 8},
        "train": {"epochs": 1, "batch_size": 4, "progress": False, "tensorboard": False},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def trained(project) -> Path:
    """The project labelled and trained through the CLI (seed 1): its run folder."""
    makd_process("label", "-c", "config.yaml", cwd=project)  # a real `python -m makd` process, as a user runs it
    makd("train", "-c", "config.yaml", "train.seed=1", cwd=project)
    return project / "runs" / "tiny"


def model_predictions(student: Path, images: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Classes, their softmax probabilities and the aspect P(yes) of the student on `images`, computed in this process
    through the evaluation pipeline (an ImageFolder-like split, the evaluation transform), not through `predict`."""
    from makd.data.base import ImageSplit
    from makd.data.transforms import InputSpec
    from makd.evaluate import predict
    from makd.models import load_student

    model, meta = load_student(student)
    split = ImageSplit("given", images, np.zeros(len(images)), meta["classes"], paths=[Path(p) for p in images])
    out = predict(model, split, InputSpec(**meta["input"]))
    logits = torch.from_numpy(out.class_logits).double()
    probs = torch.softmax(logits, dim=1).numpy()
    return [meta["classes"][k] for k in probs.argmax(axis=1)], probs.max(axis=1), torch.sigmoid(
        torch.from_numpy(out.aspect_logits).double()).numpy()


def test_label_train_evaluate_predict(project, trained, tiny_imagefolder):
    store = LabelStore.open(project / "labels")
    ids, logodds, mass = store.read()
    assert len(ids) == 12 + 9 and store.num_shards == 5 and len(set(ids)) == len(ids)
    assert all(i.startswith(("train/", "test/")) for i in ids)
    assert logodds.shape == (21, 5) and np.isfinite(logodds).all() and np.allclose(mass, 1.0)
    assert store.meta["question_set_hash"] == QuestionSet.load(project / "questions.json").hash
    assert store.meta["teacher"]["name"] == "bridge"
    # The bridge says sandals are worn on the feet more than T-shirts are.
    feet = logodds[:, 0]
    assert feet[[i for i, s in enumerate(ids) if "/Sandal/" in s]].mean() > feet[[i for i, s in enumerate(ids) if "/T-shirt_top/" in s]].mean()

    run = trained
    results = json.loads((run / "results.json").read_text())
    assert results["seed"] == 1 and results["best_epoch"] == 1
    metrics = pd.read_csv(run / "metrics.csv")
    assert len(metrics) == 1 and metrics.loc[0, "loss_aspect_bce"] > 0 and "val_top1" in metrics
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 1
    assert results["aspect_agreement_best"]["num_images"] == 9

    report = json.loads(makd("evaluate", "-m", str(run / "best.safetensors"), "--json", cwd=project).stdout)
    assert report["num_images"] == 9 and report["top1"] == pytest.approx(results["test_top1_best"])
    assert report["aspects"]["num_images"] == 9 and report["aspects"]["questions"] == QUESTIONS
    assert report["aspects"]["per_question_correlation"] == pytest.approx(
        results["aspect_agreement_best"]["per_question_correlation"], abs=1e-4)

    images = sorted(str(p) for p in (tiny_imagefolder / "test").rglob("*.png"))  # all 9 test images
    out = json.loads(makd("predict", "-m", str(run / "best.safetensors"), *images, "-k", "3", "--json", cwd=project).stdout)
    assert [r["image"] for r in out] == images
    classes, probability, p_yes = model_predictions(run / "best.safetensors", images)
    assert [r["class"] for r in out] == classes
    assert [r["probability"] for r in out] == pytest.approx(probability.tolist(), abs=1e-5)
    for r, row in zip(out, p_yes):  # the 3 aspects the head is most confident about, yes or no, with their P(yes)
        chosen = np.argsort(-np.abs(row - 0.5))[:3]
        assert [a["question"] for a in r["aspects"]] == [QUESTIONS[j] for j in chosen]
        assert [a["p_yes"] for a in r["aspects"]] == pytest.approx(row[chosen].tolist(), abs=1e-5)
    # The reported test accuracy is that of the classes predicted image by image.
    assert 100 * np.mean([r["class"] == Path(r["image"]).parent.name for r in out]) == pytest.approx(results["test_top1_best"])
    text = makd("predict", "-m", str(run / "best.safetensors"), images[0], cwd=project).stdout
    assert text.startswith(images[0]) and any(q in text for q in QUESTIONS)


def test_predict_on_real_photos(project, trained):
    """The natural photos shipped in the foolbox wheel go through a grey 32 px student (RGB, 512 px -> its input)."""
    photos = sorted(str(p) for p in foolbox_photos().glob("imagenet_0*.jpg"))[:3]
    out = json.loads(makd("predict", "-m", str(trained / "best.safetensors"), *photos, "--json", cwd=project).stdout)
    classes, probability, _ = model_predictions(trained / "best.safetensors", photos)
    assert [r["class"] for r in out] == classes
    assert [r["probability"] for r in out] == pytest.approx(probability.tolist(), abs=1e-5)


def test_evaluating_against_a_store_of_another_question_set_is_one_line(project, trained, tmp_path, fmnist_test):
    from conftest import PixelTeacher

    from makd.labels import label_split

    other = QuestionSet.load(project / "questions.json").model_dump()
    other["questions"][0]["text"] = "Is the item red?"
    label_split(fmnist_test.subset(np.arange(4)), PixelTeacher(), QuestionSet.model_validate(other), tmp_path / "other",
                progress=False)
    err = one_line_error(makd("evaluate", "-m", trained / "best.safetensors", "--labels", tmp_path / "other", cwd=project,
                              check=False))
    assert f"label store {tmp_path / 'other'} is for question set sha256:" in err
    assert err.endswith("give --labels the store it was trained with")


def one_line_error(proc: Ran | subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    # The error is one line; makd's own warnings (e.g. about the teacher) may precede it, nothing else may.
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("makd: error: "), proc.stderr
    return lines[0]


def test_bad_inputs_give_one_line_errors(project, trained, tmp_path, tiny_imagefolder):
    # What a shell sees: exit status 2 and one line on stderr (the other cases run in this process, through the same main).
    err = one_line_error(makd_process("train", "-c", "config.yaml", "data.root=/nonexistent/data", cwd=project, check=False))
    assert "/nonexistent/data" in err
    err = one_line_error(makd("train", "-c", "config.yaml", "model.name=resnet9000", cwd=project, check=False))
    assert "model.name: unknown model 'resnet9000'" in err
    err = one_line_error(makd("train", "-c", "config.yaml", "train.batch_size=-3", cwd=project, check=False))
    assert "train.batch_size" in err
    err = one_line_error(makd("label", "-c", "config.yaml", "teacher.image_size=banana", cwd=project, check=False))
    assert "teacher: image_size: Input should be a valid integer" in err
    err = one_line_error(makd("train", "-c", "missing.yaml", cwd=project, check=False))
    assert "missing.yaml" in err
    # A question set that is not the one the labels were made with.
    other = QuestionSet.load(project / "questions.json").model_dump()
    other["questions"][0]["text"] = "Is the item red?"
    QuestionSet.model_validate(other).save(tmp_path / "other.json")
    err = one_line_error(makd("train", "-c", "config.yaml", f"questions={tmp_path / 'other.json'}", cwd=project, check=False))
    assert "was made for question set" in err
    # Training samples the label store does not cover.
    # Training samples the label store does not cover (another seeded choice of 4 of the 6 images per class).
    err = one_line_error(makd("train", "-c", "config.yaml", "data.split_seed=3", cwd=project, check=False))
    assert "has no row in label store" in err and "'train/" in err
    err = one_line_error(makd("predict", "-m", str(tmp_path / "none.safetensors"), "x.png", cwd=project, check=False))
    assert "model file not found" in err
    # --overwrite with several label processes: each would discard the shards the others had written.
    err = one_line_error(makd("label", "-c", "config.yaml", "--overwrite", "--shard", "0/2", cwd=project, check=False))
    assert "--overwrite is for one process, not 2" in err


def test_corrupt_image_while_labelling(project, tmp_path, tiny_imagefolder):
    """A corrupt image is recorded and skipped, not fatal; training then says which sample has no row and why."""
    import shutil

    from makd.config import load_config
    from makd.labels import samples_to_label

    root = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, root)
    overrides = [f"data.root={root}", f"labels.path={tmp_path / 'labels'}", "labels.splits=[train]"]
    config = load_config(project / "config.yaml", overrides)
    bad_id = next(sid for sid in samples_to_label(config).sample_ids if sid.startswith("train/Trouser/"))
    bad = root / bad_id
    bad.write_bytes(b"not an image at all")
    makd("label", "-c", "config.yaml", *overrides, cwd=project)
    store = LabelStore.open(tmp_path / "labels")
    reason = f"cannot read image {bad}: not an image, or a corrupt one"
    assert store.check().complete and [(s.sample_id, s.reason) for s in store.skipped()] == [(bad_id, reason)]
    assert not list((tmp_path / "labels").glob(".*.tmp"))
    err = one_line_error(makd("train", "-c", "config.yaml", *overrides, f"out={tmp_path / 'run'}", cwd=project,
                              check=False))
    assert f"sample {bad_id!r} has no row in label store {tmp_path / 'labels'}: its image could not be read" in err
    assert reason in err and "`makd label --retry-skipped`" in err


def test_questions_show_and_import(tmp_path):
    out = makd("questions", "show", "makd:fashion_mnist/questions.json", cwd=tmp_path).stdout
    assert "40 questions, 10 classes, hash sha256:" in out and "Is the item worn on the feet?" in out
    (tmp_path / "q.txt").write_text("Does the object have wheels?\nIs the object a living animal?\n")
    makd("questions", "import", "q.txt", "--classes", "car, cat", "-o", "q.json", cwd=tmp_path)
    qs = QuestionSet.load(tmp_path / "q.json")
    assert qs.classes == ("car", "cat") and len(qs) == 2


def test_help_explains_every_stage(tmp_path):
    out = makd("--help", cwd=tmp_path).stdout
    for command in ("questions", "label", "labels", "train", "evaluate", "predict", "demo"):
        assert re.search(rf"^    {command} +\S", out, re.MULTILINE), command  # listed as a command, not inside a word
    assert "key=value" in makd("train", "--help", cwd=tmp_path).stdout
    config = yaml.safe_load(makd("demo", "--print-config", cwd=tmp_path).stdout)
    assert config["questions"] == "makd:fashion_mnist/questions.json" and resolve_path(config["questions"]).is_file()


def test_overrides_may_come_before_or_after_options(capsys):
    from makd.cli import parse

    args = parse(["train", "-c", "x.yaml", "a.b=1", "--resume", "never", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.resume == "never" and args.config == ["x.yaml"]  # -c repeats
    with pytest.raises(SystemExit):
        parse(["train", "--bogus", "c.d=2"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
