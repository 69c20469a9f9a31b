import csv
import json

import numpy as np
import pytest
import torch
from conftest import label_tiny_splits, make_question_set
from safetensors.torch import load_file

from makd.config import load_config
from makd.data import build_splits
from makd.engine import train
from makd.engine.classification import permute_targets
from makd.engine.seeding import SeededFetch
from makd.engine.trainer import Trainer, lr_at
from makd.errors import MakdError
from makd.models.student_file import load_student

TINY = ["data.train_per_class=4", "data.val_per_class=2", "data.test_per_class=3", "model.width=4",
        "train.epochs=3", "train.eval_every=1", "train.batch_size=8", "train.progress=false", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A question set file and a label store covering the tiny train and test splits."""
    return label_tiny_splits(tmp_path_factory.mktemp("labelled"), TINY)


def test_ce_run_writes_consistent_artifacts(tmp_path):
    config = load_config(overrides=TINY + [f"out={tmp_path}", "loss.aspect_bce.weight=0"])
    results = train(config)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"loss", "loss_ce", "train_top1", "val_top1", "lr", "images_per_s"} <= set(rows[0])
    val = [float(r["val_top1"]) for r in rows]
    assert results["val_top1_best"] == max(val) and results["best_epoch"] == 1 + val.index(max(val))
    assert results["test_top5_best"] >= results["test_top1_best"]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert load_config(tmp_path / "config.yaml") == config
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert len(splits["train"]["sample_ids"]) == 40 and splits["test"]["num_samples"] == 30
    model, meta = load_student(tmp_path / "best.safetensors")
    assert model.aspect_head is None and meta["epoch"] == results["best_epoch"] and len(meta["classes"]) == 10
    assert "test top-1" in (tmp_path / "report.md").read_text() and (tmp_path / "curves.png").stat().st_size > 1000
    # The best checkpoint's stored test logits reproduce the reported accuracy.
    logits = np.load(tmp_path / "test_class_logits_best.npy")
    targets = build_splits(config.data)["test"].targets
    assert 100 * np.mean(logits.argmax(1) == targets) == pytest.approx(results["test_top1_best"])
    assert 100 * np.mean((np.argsort(-logits, 1)[:, :5] == targets[:, None]).any(1)) == pytest.approx(results["test_top5_best"])


def test_makd_run_uses_teacher_targets(tmp_path, labelled):
    config = load_config(overrides=TINY + [f"out={tmp_path}", f"questions={labelled / 'q.json'}",
                                           f"labels.path={labelled / 'labels'}"])
    results = train(config)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert float(rows[0]["loss_aspect_bce"]) > 0
    agreement = results["aspect_agreement_best"]
    assert agreement["num_images"] == 30 and len(agreement["per_question_correlation"]) == 4
    model, meta = load_student(tmp_path / "best.safetensors")
    assert model.aspect_head.out_features == 4 and [q["text"] for q in meta["questions"]][0] == "Is this question number 0?"


def test_missing_labels_and_wrong_question_set_are_clear(tmp_path, labelled):
    with pytest.raises(MakdError, match="set `questions`"):
        Trainer(load_config(overrides=TINY + [f"out={tmp_path}"]))
    other = make_question_set(build_splits(load_config(overrides=TINY).data)["train"].class_names, n=3)
    other.save(tmp_path / "other.json")
    with pytest.raises(MakdError, match="was made for question set"):
        Trainer(load_config(overrides=TINY + [f"out={tmp_path}", f"questions={tmp_path / 'other.json'}",
                                              f"labels.path={labelled / 'labels'}"]))
    with pytest.raises(MakdError, match="has no row in label store"):
        Trainer(load_config(overrides=TINY + ["data.split_seed=5", f"out={tmp_path}", f"questions={labelled / 'q.json'}",
                                              f"labels.path={labelled / 'labels'}"]))


def train_until_interrupted(config, monkeypatch, at_step: int) -> None:
    """Train until the `at_step`-th optimizer step is about to run, then interrupt (as Ctrl-C would)."""
    original, calls = Trainer.train_step, {"n": 0}

    def interrupting(self, *args):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(Trainer, "train_step", original)


def test_resume_mid_epoch_is_bitwise_identical(tmp_path, labelled, monkeypatch):
    common = TINY + [f"questions={labelled / 'q.json'}", f"labels.path={labelled / 'labels'}",
                     "train.checkpoint_every_steps=1", "model.drop_rate=0.2"]
    reference = load_config(overrides=common + [f"out={tmp_path / 'ref'}"])
    train(reference)

    config = load_config(overrides=common + [f"out={tmp_path / 'crash'}"])
    train_until_interrupted(config, monkeypatch, at_step=8)  # epoch 2, step 3 of 5
    state = torch.load(tmp_path / "crash" / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    fetched = []  # the training batches the resumed run loads
    monkeypatch.setattr(SeededFetch, "__getitems__", lambda self, batch, fetch=SeededFetch.__getitems__: (
        fetched.append(list(batch)) or fetch(self, batch)))
    results = train(config)
    assert len(fetched) == 3 + 5  # the rest of epoch 2, then epoch 3: the 2 trained batches were skipped unloaded

    a, b = load_file(tmp_path / "ref" / "last.safetensors"), load_file(tmp_path / "crash" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def rows(run):  # everything but the throughput, which is timing
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader((tmp_path / run / "metrics.csv").open())]

    assert rows("crash") == rows("ref") and len(rows("ref")) == 3
    assert results["test_top1_best"] == json.loads((tmp_path / "ref" / "results.json").read_text())["test_top1_best"]


def test_checkpoint_every_n_epochs_resumes_from_the_last_saved_epoch(tmp_path, labelled, monkeypatch):
    """`train.checkpoint_every: 2` saves after epoch 2 and after validations (here the last epoch) only; a kill in
    epoch 3 loses that epoch, and the re-run (with another checkpoint frequency and 2 loader processes, changes that
    may not alter anything) ends bit-identical to a run that checkpointed every epoch and loaded in-process."""
    common = TINY + [f"questions={labelled / 'q.json'}", f"labels.path={labelled / 'labels'}", "train.eval_every=3"]
    train(load_config(overrides=common + [f"out={tmp_path / 'ref'}"]))

    config = load_config(overrides=common + [f"out={tmp_path / 'crash'}", "train.checkpoint_every=2"])
    train_until_interrupted(config, monkeypatch, at_step=14)  # epoch 3, step 4 of 5
    state = torch.load(tmp_path / "crash" / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert (state["epoch"], state["step_in_epoch"]) == (2, 0)
    assert not (tmp_path / "crash" / "checkpoints" / "last.prev.pt").exists()  # epoch 1 was not saved
    # Loader processes change nothing computed either: each batch's draws are seeded by its step.
    train(load_config(overrides=common + [f"out={tmp_path / 'crash'}", "train.checkpoint_every=1", "data.num_workers=2"]))
    for name in ("last", "best"):
        a, b = load_file(tmp_path / "ref" / f"{name}.safetensors"), load_file(tmp_path / "crash" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def rows(run):  # everything but the throughput, which is timing
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader((tmp_path / run / "metrics.csv").open())]

    assert rows("crash") == rows("ref") and len(rows("ref")) == 3
    assert torch.load(tmp_path / "crash" / "checkpoints" / "last.pt", weights_only=True)["state"]["epoch"] == 3


def test_resume_takes_the_newest_checkpoint_that_loads(tmp_path, labelled, monkeypatch):
    common = TINY + [f"questions={labelled / 'q.json'}", f"labels.path={labelled / 'labels'}",
                     "train.checkpoint_every_steps=1", f"out={tmp_path}"]
    config = load_config(overrides=common)
    train_until_interrupted(config, monkeypatch, at_step=4)
    folder = tmp_path / "checkpoints"
    newest, previous = folder / "last.pt", folder / "last.prev.pt"
    assert torch.load(previous, weights_only=True)["state"]["step_in_epoch"] == 2  # one save before last.pt's 3
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short

    trainer = Trainer(config)
    assert trainer.try_resume() and trainer.state.step_in_epoch == 2

    previous.write_bytes(b"not a checkpoint")
    with pytest.raises(MakdError, match=r"cannot load checkpoint .*last.pt.* and cannot load checkpoint .*last.prev.pt"):
        Trainer(config).try_resume()


def test_resume_refuses_a_changed_config(tmp_path):
    train(load_config(overrides=TINY + [f"out={tmp_path}", "loss.aspect_bce.weight=0", "train.epochs=1"]))
    with pytest.raises(MakdError, match="another optim.lr"):
        train(load_config(overrides=TINY + [f"out={tmp_path}", "loss.aspect_bce.weight=0", "train.epochs=1", "optim.lr=0.2"]))
    # Settings that do not change the computation may differ; so may train.sync_bn in one process (a run of a makd
    # whose default was false resumes under today's auto).
    train(load_config(overrides=TINY + [f"out={tmp_path}", "loss.aspect_bce.weight=0", "train.epochs=1", "train.threads=1",
                                        "train.sync_bn=false"]))


def test_permute_controls():
    logodds = np.arange(12, dtype=np.float32).reshape(6, 2)
    labels = np.array([0, 0, 0, 1, 1, 1])
    same, _ = permute_targets(logodds, logodds, labels, "none", 0)
    assert same is logodds
    shuffled, mass = permute_targets(logodds, logodds + 100, labels, "images", 0)
    assert sorted(shuffled[:, 0].tolist()) == logodds[:, 0].tolist() and not np.array_equal(shuffled, logodds)
    np.testing.assert_array_equal(mass, shuffled + 100)  # mass travels with its row
    again, _ = permute_targets(logodds, logodds, labels, "images", 0)
    np.testing.assert_array_equal(again, shuffled)
    within, _ = permute_targets(logodds, logodds, labels, "within_class", 3)
    assert set(within[:3, 0].tolist()) == {0, 2, 4} and set(within[3:, 0].tolist()) == {6, 8, 10}


def test_lr_schedules():
    cosine = load_config(overrides=["train.epochs=10", "optim.lr=0.1"])
    assert lr_at(cosine, 0, 10) == pytest.approx(0.1)
    assert lr_at(cosine, 50, 10) == pytest.approx(0.05)
    assert lr_at(cosine, 99, 10) < 1e-3
    step = load_config(overrides=["train.epochs=10", "optim.lr=0.1", "schedule.name=step", "schedule.milestones=[5, 8]"])
    assert [round(lr_at(step, s * 10, 10), 6) for s in (0, 5, 8)] == [0.1, 0.01, 0.001]
    warm = load_config(overrides=["train.epochs=10", "optim.lr=0.1", "schedule.warmup_epochs=1"])
    assert lr_at(warm, 0, 10) == pytest.approx(0.01) and lr_at(warm, 9, 10) == pytest.approx(0.1)
