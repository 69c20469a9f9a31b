"""configs/paper/: the paper's recipe as a base plus per-dataset and per-student files, every pair valid."""

import json
import os
from pathlib import Path

import pytest

from makd.config import load_config, to_dict
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


def known_keys(config: dict, before: dict, defaults: dict, where: str = "") -> dict:
    """`config` without the keys makd gained since the snapshot — each of which must hold its default."""
    kept = {}
    for key, value in config.items():
        if key not in before:
            assert value == defaults[key], f"{where}{key}: a key added since the snapshot must keep its default"
        elif isinstance(value, dict) and isinstance(before[key], dict) and key != "loss":
            kept[key] = known_keys(value, before[key], defaults[key], f"{where}{key}.")
        else:
            kept[key] = value
    return kept


def as_written(config) -> dict:
    """The resolved config with its paths as the files and the command line wrote them: the dataset file's paths
    relative to that file (where they now resolve), the `out` override relative to the current folder."""
    data = to_dict(config)
    data["out"] = os.path.relpath(data["out"])
    data["questions"] = os.path.relpath(data["questions"], PAPER / "datasets")
    for section, key in (("data", "root"), ("labels", "path")):
        data[section][key] = os.path.relpath(data[section][key], PAPER / "datasets")
    return data


@pytest.mark.parametrize("dataset", DATASETS)
def test_layered_files_resolve_to_the_former_per_pair_configs(dataset):
    defaults = to_dict(load_config())
    for student in STUDENTS:
        config, before = pair(dataset, student), BEFORE[f"{dataset}/{student}"]
        assert known_keys(as_written(config), before, defaults) == before, f"{dataset}/{student}"
        assert Path(config.data.root) == PAPER / "datasets" / BEFORE[f"{dataset}/{student}"]["data"]["root"]
        # The added key cannot change these splits: each sets val_per_class or has its own validation split.
        assert config.data.val_per_class is not None or dataset in {"dtd", "fgvc_aircraft", "flowers102", "mini_imagenet"}


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


def test_the_paper_grid_runs_every_pair_as_the_layered_files_say():
    from makd.experiment.grid import Grid

    grid = Grid.load(PAPER / "grid.yaml")
    cells = grid.cells()
    assert len(cells) == len(DATASETS) * len(STUDENTS) * 2 * 3 and len({c.name for c in cells}) == len(cells)
    cell = next(c for c in cells if c.name == "cub200-resnet34-makd-s2")
    config = grid.config(cell)
    expected = pair("cub200", "resnet34")
    assert to_dict(config) == to_dict(expected.model_copy(update={"name": cell.name, "out": config.out,
                                                                 "train": expected.train.model_copy(update={"seed": 2})}))
    assert grid.config(next(c for c in cells if c.name == "dtd-resnet18-ce-s0")).loss["aspect_bce"].weight == 0
    assert grid.spec.executor.name == "slurm" and grid.spec.executor.gpus == 1
