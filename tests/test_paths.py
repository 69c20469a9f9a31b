"""Paths resolve relative to the file that names them; saved models find their data and labels again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from makd.config import load_config, path_keys, relative_paths, relocate, to_dict
from makd.data import build_splits
from makd.errors import MakdError


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_paths_in_a_file_are_relative_to_it_overrides_to_the_current_folder(tmp_path, monkeypatch):
    config_file = write(tmp_path / "project" / "my.yaml", {
        "out": "runs/a", "questions": "questions/q.json", "labels": {"path": "labels/x"},
        "data": {"dataset": "manifest", "manifest": "data/m.csv", "classes": "classes.txt"},
        "kd_teacher": {"checkpoint": "../teacher.safetensors"}, "model": {"name": "resnet18", "pretrained": "w.safetensors"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(os.path.relpath(config_file), ["labels.path=mine", "out=~/runs/b"])
    project = tmp_path / "project"
    assert config.questions == str(project / "questions" / "q.json")
    assert config.data.manifest == str(project / "data" / "m.csv") and config.data.classes == str(project / "classes.txt")
    assert config.kd_teacher.checkpoint == str(tmp_path / "teacher.safetensors")
    assert config.model.pretrained == str(project / "w.safetensors")
    assert config.labels.path == str(elsewhere / "mine") and config.out == str(Path.home() / "runs" / "b")


def test_layered_files_and_includes_each_resolve_against_their_own_folder(tmp_path, monkeypatch):
    write(tmp_path / "recipes" / "base.yaml", {"questions": "q.json", "labels": {"path": "labels"}})
    dataset = write(tmp_path / "datasets" / "pets.yaml", {"include": "../recipes/base.yaml", "data": {"root": "pets"}})
    mine = write(tmp_path / "me" / "mine.yaml", {"labels": {"path": "my-labels"}})
    monkeypatch.chdir(tmp_path / "me")
    config = load_config([dataset, mine.name])
    assert config.questions == str(tmp_path / "recipes" / "q.json")  # from the included file: its folder
    assert config.data.root == str(tmp_path / "datasets" / "pets")
    assert config.labels.path == str(tmp_path / "me" / "my-labels")  # the later file wins, relative to itself
    assert config.out == str(tmp_path / "me" / "runs" / "run")  # a default: the current folder


def test_names_that_are_not_paths_stay_as_they_are(tmp_path, monkeypatch):
    (tmp_path / "models" / "my-vlm").mkdir(parents=True)
    config_file = write(tmp_path / "c.yaml", {
        "questions": "makd:fashion_mnist/questions.json", "model": {"name": "resnet18", "pretrained": "hf-hub:org/x"},
        "kd_teacher": {"pretrained": "https://example.org/w.pth"},
        "teacher": {"name": "hf", "model": "OpenGVLab/InternVL3-2B-hf"},
        "generate": {"llm": {"backend": "hf", "model": "models/my-vlm"}}})
    monkeypatch.chdir(tmp_path.parent)
    config = load_config(config_file)
    assert config.questions == "makd:fashion_mnist/questions.json" and config.model.pretrained == "hf-hub:org/x"
    assert config.kd_teacher.pretrained == "https://example.org/w.pth"
    assert config.teacher["model"] == "OpenGVLab/InternVL3-2B-hf"  # a hub id: no such folder beside the file
    assert config.generate.llm["model"] == str(tmp_path / "models" / "my-vlm")  # a local folder that exists


def test_path_fields_are_marked_in_the_schema():
    assert set(path_keys()) == {("out",), ("questions",), ("data", "root"), ("data", "manifest"), ("data", "classes"),
                                ("teacher", "model"), ("labels", "path"), ("model", "pretrained"),
                                ("kd_teacher", "checkpoint"), ("kd_teacher", "pretrained"), ("generate", "llm", "model"),
                                *(("detection", k) for k in ("root", "train_images", "train_annotations", "val_images",
                                                             "val_annotations", "test_images", "test_annotations"))}


def test_a_relative_manifest_is_looked_for_under_data_root_first(tmp_path, tiny_imagefolder, monkeypatch):
    images = tmp_path / "photos"
    shutil.copytree(tiny_imagefolder / "train", images / "train")
    rows = ["path,label"] + [f"{p.relative_to(images).as_posix()},{p.parent.name}" for p in sorted(images.rglob("*.png"))]
    (images / "manifest.csv").write_text("\n".join(rows) + "\n")
    config_file = write(tmp_path / "conf" / "c.yaml", {"data": {"dataset": "manifest", "root": "../photos",
                                                                "manifest": "manifest.csv", "val_per_class": 1}})
    monkeypatch.chdir(tmp_path)
    config = load_config(config_file)
    assert config.data.manifest == str(images / "manifest.csv")
    assert len(build_splits(config.data, needed=("train",))["train"]) == 12  # 18 - 3 held out for test - 3 val

    config = load_config(config_file, ["data.manifest=nowhere.csv"])  # an override: the current folder
    with pytest.raises(MakdError) as err:
        build_splits(config.data)
    assert str(err.value) == (f"data.manifest: file not found (looked for {images / 'nowhere.csv'} and "
                              f"{tmp_path / 'nowhere.csv'})")


def test_a_moved_folder_finds_its_paths_again_and_says_where_it_looked(tmp_path):
    old = tmp_path / "old"
    for part in ("run", "labels", "data"):
        (old / part).mkdir(parents=True)
    saved = to_dict(load_config(overrides=[f"out={old / 'run'}", f"labels.path={old / 'labels'}", f"data.root={old / 'data'}"]))
    relative = relative_paths(saved, old / "run")
    assert relative["labels.path"] == "../labels" and relative["out"] == "."
    shutil.move(old, tmp_path / "new")
    moved, missing = relocate(saved, relative, tmp_path / "new" / "run")
    assert moved["labels"]["path"] == str(tmp_path / "new" / "labels") and not missing
    assert moved["data"]["root"] == str(tmp_path / "new" / "data")
    shutil.rmtree(tmp_path / "new" / "labels")
    _, missing = relocate(saved, relative, tmp_path / "new" / "run")
    assert missing == {"labels.path": [str(old / "labels"), str(tmp_path / "new" / "labels")]}
