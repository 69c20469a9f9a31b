"""The training loop's options: accumulation, autocast, full checkpoints, KD teachers, MaKD + KD, W&B."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import PixelTeacher, make_question_set
from safetensors.torch import load_file, save_file
from test_trainer import TINY, labelled  # noqa: F401  (fixture)

from makd.config import KDTeacherConfig, load_config
from makd.data import build_splits
from makd.data.base import ImageSplit
from makd.data.fashion_mnist import CLASSES as FMNIST_CLASSES
from makd.engine import train
from makd.engine.classification import ClassificationTask, split_batch
from makd.engine.trainer import Trainer
from makd.errors import MakdError
from makd.labels import label_split
from makd.losses import Batch
from makd.models.kd_teacher import load_kd_teacher
from makd.models.student_file import load_student
from makd.teachers.base import AspectScores

# A LayerNorm-only model: no batch statistics, so micro-batches and processes see the same function.
VIT = ["model.name=vit_tiny_patch16_224", "model.kwargs={img_size: 28, patch_size: 7, embed_dim: 16, depth: 1, num_heads: 2}",
       "data.augment=none", "loss.aspect_bce.weight=0", "train.eval_every=2"]
CLASSES = list(FMNIST_CLASSES)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A CE-trained makd run (2 epochs): a KD teacher file, and a run folder to evaluate."""
    run = tmp_path_factory.mktemp("teacher")
    results = train(load_config(overrides=TINY + [f"out={run}", "loss.aspect_bce.weight=0", "train.epochs=2"]))
    return run, results


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "last.safetensors")


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    common = TINY + VIT + ["train.epochs=1"]
    train(load_config(overrides=common + [f"out={tmp_path / 'full'}"]))
    train(load_config(overrides=common + [f"out={tmp_path / 'accum'}", "train.accumulation_steps=4"]))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "accum")
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # really another computation (summation order)
    with pytest.raises(MakdError, match="train.batch_size 8 is not divisible by 1 processes x train.accumulation_steps 3"):
        Trainer(load_config(overrides=TINY + ["loss.aspect_bce.weight=0", "train.accumulation_steps=3"]))


def test_split_batch_keeps_rows_together():
    batch = Batch(torch.arange(5), torch.arange(10.0).view(5, 2), None, torch.arange(15.0).view(5, 3), epoch=2.0)
    parts = split_batch(batch, 2)
    assert [p.labels.tolist() for p in parts] == [[0, 1, 2], [3, 4]]
    assert parts[1].teacher_logits[0].tolist() == [9.0, 10.0, 11.0] and parts[1].aspect_mass is None and parts[1].epoch == 2.0


def test_fp16_autocast_checkpoint_holds_the_full_training_state(tmp_path):
    config = load_config(overrides=TINY + [f"out={tmp_path}", "loss.aspect_bce.weight=0", "train.epochs=1", "train.amp=fp16"])
    results = train(config)
    logits = np.load(tmp_path / "test_class_logits_best.npy").astype(np.float64)
    targets = build_splits(config.data)["test"].targets
    p = np.exp(logits - logits.max(1, keepdims=True))
    confidence, correct = (p / p.sum(1, keepdims=True)).max(1), logits.argmax(1) == targets
    assert 100 * correct.mean() == pytest.approx(results["test_top1_best"])
    bins = [(confidence > lo) & (confidence <= lo + 1 / 15) for lo in np.arange(15) / 15]  # ECE, 15 bins (lo, hi]
    ece = sum(b.mean() * abs(correct[b].mean() - confidence[b].mean()) for b in bins if b.any())
    assert 100 * ece == pytest.approx(results["test_ece_best"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "schedule", "state", "rng", "config"} <= set(ckpt)
    assert ckpt["scaler"]["scale"] > 0  # fp16 uses a grad scaler, and its state is kept
    assert {"torch", "python", "numpy"} <= set(ckpt["rng"])
    assert (ckpt["state"]["epoch"], ckpt["state"]["step_in_epoch"], ckpt["state"]["global_step"]) == (1, 0, 5)


def test_rng_states_round_trip():
    import random

    import numpy as np

    from makd.engine.checkpoint import rng_states, set_rng_states

    saved = rng_states()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_states(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_kd_teacher_from_a_makd_checkpoint_is_frozen_and_sees_its_own_input(teacher_run):
    teacher_run = teacher_run[0]
    teacher = load_kd_teacher(KDTeacherConfig(checkpoint=str(teacher_run / "best.safetensors")), CLASSES)
    teacher.train()
    assert not teacher.training and not teacher.net.training
    assert not any(p.requires_grad for p in teacher.parameters())
    model, _ = load_student(teacher_run / "best.safetensors")
    x = torch.rand(3, 1, 40, 40, requires_grad=True)
    resized = torch.nn.functional.interpolate(x.detach(), size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    logits = teacher(x)
    assert not logits.requires_grad
    assert torch.allclose(logits, model(resized).class_logits, atol=1e-6)
    with pytest.raises(MakdError, match="predicts classes"):
        load_kd_teacher(KDTeacherConfig(checkpoint=str(teacher_run / "best.safetensors")), CLASSES[:9] + ["other"])


def test_kd_teacher_from_a_timm_model_with_local_weights(tmp_path):
    import timm

    net = timm.create_model("resnet10t", num_classes=10)
    save_file(net.state_dict(), str(tmp_path / "teacher.safetensors"))
    teacher = load_kd_teacher(KDTeacherConfig(timm="resnet10t", pretrained=str(tmp_path / "teacher.safetensors")), CLASSES)
    assert teacher.in_chans == 3 and teacher.size == (176, 176)  # timm's pretrained config for resnet10t
    x = torch.rand(2, 1, 28, 28)  # a grey student batch: expanded to RGB, resized, ImageNet-normalised
    big = torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(176, 176), mode="bilinear", align_corners=False,
                                          antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(teacher(x), net.eval()((big - mean) / std), atol=1e-5)
    with pytest.raises(MakdError, match="set exactly one of"):
        load_kd_teacher(KDTeacherConfig(), CLASSES)


def test_makd_plus_kd_trains_with_both_signals(tmp_path, labelled, teacher_run):  # noqa: F811
    teacher_run = teacher_run[0]
    config = load_config(overrides=TINY + [f"out={tmp_path / 'student'}", f"questions={labelled / 'q.json'}",
                                           f"labels.path={labelled / 'labels'}", "loss.dkd.weight=1",
                                           "loss.dkd.warmup_epochs=2", f"kd_teacher.checkpoint={teacher_run / 'best.safetensors'}",
                                           "train.epochs=1"])
    results = train(config)
    rows = list(csv.DictReader((tmp_path / "student" / "metrics.csv").open()))
    assert len(rows) == 1 and float(rows[0]["loss_dkd"]) > 0 and float(rows[0]["loss_aspect_bce"]) > 0
    assert results["aspect_agreement_best"]["num_images"] == 30
    with pytest.raises(MakdError, match="kd_teacher: set exactly one of"):
        Trainer(load_config(overrides=TINY + ["loss.aspect_bce.weight=0", "loss.kd.weight=1"]))


def test_wandb_offline_logs_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(load_config(overrides=TINY + [f"out={tmp_path}", "loss.aspect_bce.weight=0", "train.epochs=1", "train.wandb=true"]))
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and b"loss_ce" in files[0].read_bytes() and b"val_top1" in files[0].read_bytes()


def test_evaluate_a_run_folder_reports_best_and_last(teacher_run):
    from makd.evaluate import evaluate_file

    run, results = teacher_run
    report = evaluate_file(str(run))
    assert set(report) == {"best", "last"} and report["last"]["epoch"] == 2
    for which in ("best", "last"):
        assert report[which]["top1"] == pytest.approx(results[f"test_top1_{which}"])
        assert report[which]["ece"] == pytest.approx(results[f"test_ece_{which}"])


def test_a_non_finite_loss_stops_fp32_at_the_next_check_and_fp16_leaves_it_to_the_grad_scaler(tmp_path, monkeypatch, caplog):
    """Nothing reads the loss on the host per step: fp32 stops at the next check (here the epoch's end) with one line;
    with fp16 the grad scaler skips the step (and halves its scale), the epoch's loss leaves the step out."""
    original, calls, kept = ClassificationTask.loss, {"n": 0}, []

    def poisoned(self, net, batch, epoch):
        total, parts, counted = original(self, net, batch, epoch)
        calls["n"] += 1
        if calls["n"] != 2:
            kept.append((float(total.detach()), len(batch)))
        return (total * float("nan") if calls["n"] == 2 else total), parts, counted

    monkeypatch.setattr(ClassificationTask, "loss", poisoned)
    common = TINY + ["loss.aspect_bce.weight=0", "train.epochs=1"]
    with pytest.raises(MakdError, match=r"^loss became nan between steps 0 and 5: lower optim.lr$"):
        train(load_config(overrides=common + [f"out={tmp_path / 'fp32'}"]))
    calls["n"], kept[:] = 0, []
    train(load_config(overrides=common + [f"out={tmp_path / 'fp16'}", "train.amp=fp16"]))
    assert "epoch 1: 1 fp16 step(s) with a non-finite loss, skipped by the grad scaler" in caplog.text
    row = next(csv.DictReader((tmp_path / "fp16" / "metrics.csv").open()))
    # The epoch's loss is the mean over the images of the steps that were taken: the skipped one counts nowhere.
    assert len(kept) == calls["n"] - 1 >= 2
    assert float(row["loss"]) == pytest.approx(sum(v * n for v, n in kept) / sum(n for _, n in kept), rel=1e-4)
    scale = torch.load(tmp_path / "fp16" / "checkpoints" / "last.pt", weights_only=True)["scaler"]["scale"]
    assert scale == 2.0**15  # 2**16 at the start, halved once by the skipped step


class FlaggingTeacher(PixelTeacher):
    """PixelTeacher whose answers above 0.5 log-odds come flagged as bounds (as the openai teacher's NO_BOUNDED)."""

    name = "flagging"

    def score(self, images, questions):
        scores = super().score(images, questions)
        return AspectScores(scores.logodds, scores.mass, (scores.logodds > 0.5).astype(np.uint8) * 2)


def test_the_stores_flags_reach_the_aspect_loss_in_the_training_rows_order(tmp_path):
    splits = build_splits(load_config(overrides=TINY).data)
    questions = make_question_set(splits["train"].class_names)
    questions.save(tmp_path / "q.json")
    # The store in another order than the training split (test first), so that the rows must be joined by id.
    label_split(ImageSplit.concat([splits["test"], splits["train"]], "all"), FlaggingTeacher(), questions,
                tmp_path / "labels", shard_size=16, progress=False)
    trainer = Trainer(load_config(overrides=TINY + [f"out={tmp_path / 'run'}", f"questions={tmp_path / 'q.json'}",
                                                    f"labels.path={tmp_path / 'labels'}"]))
    expected = FlaggingTeacher().score(splits["train"].images(range(len(splits["train"]))), questions).flags
    flags = trainer.task.aspects.flags
    assert flags is not None and 0 < int((flags > 0).sum()) < flags.numel()
    assert np.array_equal(flags.numpy(), expected)
    batch = next(iter(trainer.task.batches(0, 8, 0)))
    assert batch.targets.aspect_flags.dtype == torch.uint8 and batch.targets.aspect_flags.shape == (8, 4)
