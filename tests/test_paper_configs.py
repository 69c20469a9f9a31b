"""configs/paper/: the paper's recipe for its eight datasets and four students, every file valid."""

from pathlib import Path

import pytest

from makd.config import load_config
from makd.teachers.registry import build_teacher

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper"
FILES = sorted(PAPER.rglob("*.yaml"))
DATASETS = {"stanford_cars", "oxford_pets", "dtd", "flowers102", "cub200", "fgvc_aircraft", "caltech101", "mini_imagenet"}
STUDENTS = {"resnet18": "resnet18", "resnet34": "resnet34", "mobilenetv1": "mobilenetv1_100", "efficientnet_b0": "efficientnet_b0"}


def test_every_dataset_and_student_has_a_config():
    assert {(f.parent.name, f.stem) for f in FILES} == {(d, s) for d in DATASETS for s in STUDENTS}


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_is_valid_and_follows_the_recipe(path):
    import timm

    config = load_config(path)
    assert config.model.name == STUDENTS[path.stem] and timm.is_model(config.model.name) and config.model.pretrained is False
    assert (config.optim.name, config.optim.lr, config.optim.momentum, config.optim.weight_decay) == ("sgd", 0.01, 0.9, 1e-4)
    assert (config.schedule.name, config.schedule.milestones, config.schedule.gamma) == ("step", [150, 180, 210], 0.1)
    assert (config.train.epochs, config.train.batch_size, config.data.image_size) == (240, 16, 224)
    assert config.data.augment == "resized_crop_flip" and config.data.train_per_class is None
    assert config.loss["ce"].weight == 1.0 and config.loss["aspect_bce"].weight == 4.0
    assert path.parent.name in config.out and path.parent.name in config.labels.path
    build_teacher(config.teacher)  # the labelling teacher's options validate (nothing is loaded)
