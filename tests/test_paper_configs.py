"""configs/paper/: the paper's recipe as a base plus per-dataset and per-student files, every pair valid."""

import json
from pathlib import Path

import pytest

from makd.config import Config, load_config, to_dict
from makd.teachers.registry import build_teacher

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "configs" / "paper"
DATASETS = sorted(p.stem for p in (PAPER / "datasets").glob("*.yaml"))
STUDENTS = {"resnet18": "resnet18", "resnet34": "resnet34", "mobilenetv1": "mobilenetv1_100", "efficientnet_b0": "efficientnet_b0"}
# What the 32 per-pair files resolved to before they became recipe + dataset + student (tests/data, generated once).
BEFORE = json.loads((REPO / "tests" / "data" / "paper_configs_resolved.json").read_text())


def pair(dataset: str, student: str):
    return load_config([PAPER / "recipe.yaml", PAPER / "datasets" / f"{dataset}.yaml", PAPER / "students" / f"{student}.yaml"],
                       [f"name={dataset}-{student}-makd", f"out=runs/paper/{dataset}/{student}/makd"])


def test_every_dataset_and_student_of_the_paper():
    assert set(DATASETS) == {"stanford_cars", "oxford_pets", "dtd", "flowers102", "cub200", "fgvc_aircraft", "caltech101",
                             "mini_imagenet"}
    assert {p.stem for p in (PAPER / "students").glob("*.yaml")} == set(STUDENTS)


@pytest.mark.parametrize("dataset", DATASETS)
def test_layered_files_resolve_to_the_former_per_pair_configs(dataset):
    for student in STUDENTS:
        resolved = to_dict(pair(dataset, student))
        for key in ("task", "detection"):  # added after the snapshot: their defaults
            assert resolved.pop(key) == to_dict(Config())[key]
        assert resolved == BEFORE[f"{dataset}/{student}"], f"{dataset}/{student}"


@pytest.mark.parametrize("dataset", DATASETS)
def test_config_is_valid_and_follows_the_recipe(dataset):
    import timm

    for student, model in STUDENTS.items():
        config = pair(dataset, student)
        assert config.model.name == model and timm.is_model(config.model.name) and config.model.pretrained is False
        assert (config.optim.name, config.optim.lr, config.optim.momentum, config.optim.weight_decay) == ("sgd", 0.01, 0.9, 1e-4)
        assert (config.schedule.name, config.schedule.milestones, config.schedule.gamma) == ("step", [150, 180, 210], 0.1)
        assert (config.train.epochs, config.train.batch_size, config.data.image_size) == (240, 16, 224)
        assert config.data.augment == "resized_crop_flip" and config.data.train_per_class is None
        assert config.loss["ce"].weight == 1.0 and config.loss["aspect_bce"].weight == 4.0
        assert dataset in config.labels.path and dataset in config.questions
    build_teacher(config.teacher)  # the labelling teacher's options validate (nothing is loaded)
