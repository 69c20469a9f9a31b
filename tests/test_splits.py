"""Own data: every image is used unless a few-shot subset is asked for; validation may be 0 or a fraction;
only the splits a command needs must exist; errors name the class and the option to change."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from makd.config import DataConfig, builtin_config, load_config
from makd.data import build_splits
from makd.errors import MakdError
from makd.labels.store import ids_hash


def test_the_demo_config_resolves_to_the_same_splits_as_before():
    # Hashes of the demo's sample ids as computed before few-shot subsetting became opt-in.
    config = load_config(base=builtin_config("demo"))
    assert config.data.train_per_class == 20 and config.data.val_per_class == 100
    splits = build_splits(config.data)
    assert {k: (len(v), ids_hash(v.sample_ids)) for k, v in splits.items()} == {
        "train": (200, "sha256:7135ed7b16bab634"), "val": (1000, "sha256:b38a731adef1c3e8"),
        "test": (10000, "sha256:258228dfd246f64a")}


def test_own_data_uses_every_image_and_a_fraction_for_validation(tiny_imagefolder):
    splits = build_splits(DataConfig(dataset="imagefolder", root=str(tiny_imagefolder), image_size=32))
    train, val = splits["train"], splits["val"]
    # 6 images per class: 10 % rounds to 0, at least one image per class is held out.
    assert np.bincount(val.targets).tolist() == [1, 1, 1] and np.bincount(train.targets).tolist() == [5, 5, 5]
    assert not set(train.sample_ids) & set(val.sample_ids)
    half = build_splits(DataConfig(dataset="imagefolder", root=str(tiny_imagefolder), val_fraction=0.5))
    assert np.bincount(half["val"].targets).tolist() == [3, 3, 3] and len(half["train"]) == 9


@pytest.mark.parametrize("option", ["val_per_class", "val_fraction"])
def test_validation_may_be_zero(tiny_imagefolder, option):
    splits = build_splits(DataConfig(dataset="imagefolder", root=str(tiny_imagefolder), **{option: 0}))
    assert len(splits["val"]) == 0 and len(splits["train"]) == 18 and len(splits["test"]) == 9


def test_few_shot_with_a_validation_fraction_takes_validation_from_the_rest():
    splits = build_splits(DataConfig(train_per_class=5, val_fraction=0.001, test_per_class=2))
    assert np.bincount(splits["train"].targets).tolist() == [5] * 10
    assert np.bincount(splits["val"].targets).tolist() == [6] * 10  # 0.1 % of 6,000 per class
    assert not set(splits["train"].sample_ids) & set(splits["val"].sample_ids)


@pytest.mark.parametrize("options, message", [
    ({"train_per_class": 7}, "class 'Sandal' has only 6 training images; data.train_per_class=7 asks for 7: "
                             "lower it or set it to null"),
    ({"train_per_class": 4, "val_per_class": 3}, "class 'Sandal' has only 2 training images left for validation "
                                                 "after the data.train_per_class=4 training images; "
                                                 "data.val_per_class=3 asks for 3: lower it, set it to null"),
    ({"val_per_class": 7}, "class 'Sandal' has only 6 training images left for validation; data.val_per_class=7"),
    ({"train_per_class": 6}, "class 'Sandal' has only 0 training images left for validation after the "
                             "data.train_per_class=6 training images; data.val_fraction=0.1"),
    ({"test_per_class": 4}, "class 'Sandal' has only 3 test images; data.test_per_class=4 asks for 4"),
])
def test_too_few_images_name_the_class_and_the_option(tiny_imagefolder, options, message):
    with pytest.raises(MakdError) as err:
        build_splits(DataConfig(dataset="imagefolder", root=str(tiny_imagefolder), **options))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_missing_test_folder_matters_only_to_commands_that_need_test(tiny_imagefolder, tmp_path):
    shutil.copytree(tiny_imagefolder / "train", tmp_path / "train")
    config = DataConfig(dataset="imagefolder", root=str(tmp_path), val_per_class=0)
    splits = build_splits(config, needed=("train",))
    assert set(splits) == {"train", "val"} and len(splits["train"]) == 18
    with pytest.raises(MakdError, match=f"imagefolder root {tmp_path} has no test/ folder .*: the test split is needed"):
        build_splits(config)


def test_training_without_validation_uses_the_last_checkpoint(tmp_path):
    from makd.engine import train
    from makd.models.student_file import read_student_meta

    config = load_config(overrides=["data.train_per_class=3", "data.val_per_class=0", "data.test_per_class=2",
                                    "model.width=4", "train.epochs=2", "train.eval_every=1", "train.batch_size=10",
                                    "train.progress=false", "train.tensorboard=false", "loss.aspect_bce.weight=0",
                                    f"out={tmp_path}"])
    results = train(config)
    assert results["val_top1_best"] is None and results["val_top1_last"] is None and results["best_epoch"] == 2
    assert read_student_meta(tmp_path / "best.safetensors")["epoch"] == 2
    assert results["test_top1_best"] == results["test_top1_last"]
    report = (tmp_path / "report.md").read_text()
    assert "No validation images (data.val_per_class=0 or data.val_fraction=0): the last checkpoint is the one used" in report
    assert "best on validation" not in report


def test_labelling_train_needs_no_test_folder(tiny_imagefolder, tmp_path):
    from makd.labels import samples_to_label

    shutil.copytree(tiny_imagefolder / "train", tmp_path / "train")
    config = load_config(overrides=["data.dataset=imagefolder", f"data.root={tmp_path}", "labels.splits=[train]"])
    samples = samples_to_label(config)
    assert len(samples) == 15 and all(s.startswith("train/") for s in samples.sample_ids)
    with pytest.raises(MakdError, match="has no test/ folder"):
        samples_to_label(load_config(overrides=["data.dataset=imagefolder", f"data.root={tmp_path}",
                                                "labels.splits=[train, test]"]))
