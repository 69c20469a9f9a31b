"""Every dataset reader on a tiny fixture in its real on-disk layout (as torchvision / the archives unpack it)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from makd.config import DataConfig
from makd.data import build_splits
from makd.errors import MakdError


def image(path: Path, value: int = 0, size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value * 40 % 256, 80, 160)).save(path)
    return path


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def splits_of(dataset: str, root: Path, **kw) -> dict:
    return build_splits(DataConfig(dataset=dataset, root=str(root), train_per_class=None, val_per_class=1,
                                   image_size=16, **kw))


# -- manifests --------------------------------------------------------------------------------------------------
def test_csv_manifest_with_splits_and_class_file(tmp_path):
    rows = ["path,label,split"]
    for cls in ("cat", "dog"):
        for i in range(4):
            image(tmp_path / "img" / f"{cls}{i}.png", i)
            rows.append(f"img/{cls}{i}.png,{cls},{'test' if i == 3 else 'train'}")
    write(tmp_path / "data.csv", "\n".join(rows) + "\n")
    write(tmp_path / "classes.txt", "dog\ncat\n")
    splits = build_splits(DataConfig(dataset="manifest", manifest=str(tmp_path / "data.csv"), classes=str(tmp_path / "classes.txt"),
                                     train_per_class=None, val_per_class=1, image_size=16))
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert train.class_names == ["dog", "cat"] and len(train) == 4 and len(val) == 2 and len(test) == 2
    assert test.sample_ids == ["img/cat3.png", "img/dog3.png"] and test.targets.tolist() == [1, 0]
    assert not set(train.sample_ids) & set(val.sample_ids)


def test_jsonl_manifest_integer_labels_and_holdout(tmp_path):
    lines = []
    for label in range(2):
        for i in range(5):
            image(tmp_path / "photos" / f"{label}_{i}.jpg", label)
            lines.append(json.dumps({"path": f"photos/{label}_{i}.jpg", "label": label}))
    write(tmp_path / "m.jsonl", "\n".join(lines) + "\n")
    config = dict(dataset="manifest", manifest=str(tmp_path / "m.jsonl"), classes=["zero", "one"], train_per_class=None,
                  val_per_class=1, image_size=16, holdout_fraction=0.4)
    splits = build_splits(DataConfig(**config))
    assert splits["test"].class_names == ["zero", "one"] and np.bincount(splits["test"].targets).tolist() == [2, 2]
    assert len(splits["train"]) == 4 and len(splits["val"]) == 2
    assert build_splits(DataConfig(**config))["test"].sample_ids == splits["test"].sample_ids  # seeded


@pytest.mark.parametrize("text, message", [
    ("file,label\nx.png,a\n", "the CSV header must name the columns path,label"),
    ("path,label\nmissing.png,a\n", "m.csv:2: image not found"),
    ("path,label,split\nok.png,a,holdout\n", "m.csv:2: split 'holdout' is not one of train, val, test"),
    ("path,label\nok.png,a\nok.png,a\n", "m.csv:3: ok.png is listed twice"),
])
def test_manifest_errors_name_file_and_row(tmp_path, text, message):
    image(tmp_path / "ok.png")
    write(tmp_path / "m.csv", text)
    with pytest.raises(MakdError, match=message):
        build_splits(DataConfig(dataset="manifest", manifest=str(tmp_path / "m.csv"), image_size=16))


def test_manifest_unknown_class(tmp_path):
    image(tmp_path / "ok.png")
    write(tmp_path / "m.csv", "path,label\nok.png,zebra\n")
    with pytest.raises(MakdError, match="label 'zebra' is not a class name"):
        build_splits(DataConfig(dataset="manifest", manifest=str(tmp_path / "m.csv"), classes=["cat"], image_size=16))


# -- torchvision layouts ------------------------------------------------------------------------------------------
def test_oxford_pets(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    lines = {"trainval": [], "test": []}
    for label, breed in enumerate(["Abyssinian", "american_bulldog"], 1):
        for i in range(1, 5):
            image(base / "images" / f"{breed}_{i}.jpg", label)
            lines["test" if i == 4 else "trainval"].append(f"{breed}_{i} {label} {label} 1")
    for split, rows in lines.items():
        write(base / "annotations" / f"{split}.txt", "\n".join(rows) + "\n")
    splits = splits_of("oxford_pets", tmp_path)
    assert splits["train"].class_names == ["Abyssinian", "American Bulldog"]
    assert splits["test"].sample_ids == ["oxford-iiit-pet/images/Abyssinian_4.jpg", "oxford-iiit-pet/images/american_bulldog_4.jpg"]
    assert len(splits["train"]) + len(splits["val"]) == 6


def test_fgvc_aircraft(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    write(data / "variants.txt", "707-320\nA300B4\n")
    for split, ids in (("train", [1, 2, 3, 4]), ("val", [5, 6]), ("test", [7, 8])):
        rows = []
        for i in ids:
            image(data / "images" / f"{1000000 + i}.jpg", i)
            rows.append(f"{1000000 + i} {'707-320' if i % 2 else 'A300B4'}")
        write(data / f"images_variant_{split}.txt", "\n".join(rows) + "\n")
    splits = splits_of("fgvc_aircraft", tmp_path)
    assert splits["train"].class_names == ["707-320", "A300B4"]
    assert len(splits["train"]) == 4 and len(splits["val"]) == 2  # the official val split, capped at 1 per class
    assert splits["test"].sample_ids[0] == "fgvc-aircraft-2013b/data/images/1000007.jpg" and splits["test"].targets.tolist() == [0, 1]


def test_dtd(tmp_path):
    data = tmp_path / "dtd" / "dtd"
    for split, names in (("train", ["0001", "0002"]), ("val", ["0003"]), ("test", ["0004"])):
        rows = []
        for cls in ("banded", "blotchy"):
            for n in names:
                image(data / "images" / cls / f"{cls}_{n}.jpg")
                rows.append(f"{cls}/{cls}_{n}.jpg")
        write(data / "labels" / f"{split}1.txt", "\n".join(rows) + "\n")
    splits = splits_of("dtd", tmp_path)
    assert splits["train"].class_names == ["banded", "blotchy"] and len(splits["train"]) == 4
    assert splits["test"].sample_ids == ["dtd/dtd/images/banded/banded_0004.jpg", "dtd/dtd/images/blotchy/blotchy_0004.jpg"]


def test_food101(tmp_path):
    base = tmp_path / "food-101"
    meta = {"train": {}, "test": {}}
    for cls in ("apple_pie", "baby_back_ribs"):
        for i in range(4):
            image(base / "images" / cls / f"{100 + i}.jpg")
            meta["test" if i == 3 else "train"].setdefault(cls, []).append(f"{cls}/{100 + i}")
    for split, content in meta.items():
        write(base / "meta" / f"{split}.json", json.dumps(content))
    splits = splits_of("food101", tmp_path)
    assert splits["test"].sample_ids == ["food-101/images/apple_pie/103.jpg", "food-101/images/baby_back_ribs/103.jpg"]
    assert len(splits["train"]) == 4 and len(splits["val"]) == 2  # val carved out of the training pool


def test_stanford_cars(tmp_path):
    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], dtype=object)})
    for split, annos, count in (("train", base / "devkit" / "cars_train_annos.mat", 6), ("test", base / "cars_test_annos_withlabels.mat", 2)):
        records = []
        for i in range(1, count + 1):
            image(base / f"cars_{split}" / f"{i:05d}.jpg", i)
            records.append((f"{i:05d}.jpg", 1 + i % 2))
        sio.savemat(annos, {"annotations": np.array(records, dtype=[("fname", "O"), ("class", "O")])})
    splits = splits_of("stanford_cars", tmp_path)
    assert splits["train"].class_names[1] == "Acura RL Sedan 2012"
    assert splits["test"].sample_ids == ["stanford_cars/cars_test/00001.jpg", "stanford_cars/cars_test/00002.jpg"]
    assert splits["test"].targets.tolist() == [1, 0]


def test_caltech101_holds_out_a_test_split(tmp_path):
    folder = tmp_path / "caltech101" / "101_ObjectCategories"
    for cls in ("BACKGROUND_Google", "accordion", "airplanes"):
        for i in range(1, 6):
            image(folder / cls / f"image_{i:04d}.jpg")
    splits = splits_of("caltech101", tmp_path)
    assert splits["train"].class_names == ["accordion", "airplanes"]  # torchvision drops the background class
    assert np.bincount(splits["test"].targets).tolist() == [1, 1] and len(splits["train"]) == 6
    ids = [s for split in splits.values() for s in split.sample_ids]
    assert len(set(ids)) == 10 and all(s.startswith("caltech101/101_ObjectCategories/a") for s in ids)


def test_missing_dataset_names_the_expected_layout(tmp_path):
    with pytest.raises(MakdError, match="oxford_pets not found or incomplete .* oxford-iiit-pet"):
        splits_of("oxford_pets", tmp_path)
    with pytest.raises(MakdError, match="caltech101 not found"):
        splits_of("caltech101", tmp_path)
    assert not (tmp_path / "caltech101").exists()  # nothing was created in the user's folder
    with pytest.raises(MakdError, match="data.root: required for dataset dtd"):
        build_splits(DataConfig(dataset="dtd"))


# -- makd's own readers -------------------------------------------------------------------------------------------
def test_flowers102(tmp_path):
    base = tmp_path / "flowers-102"
    for i in range(1, 9):
        image(base / "jpg" / f"image_{i:05d}.jpg", i)
    sio.savemat(base / "imagelabels.mat", {"labels": np.array([1, 2, 1, 2, 1, 2, 77, 77])})
    sio.savemat(base / "setid.mat", {"trnid": np.array([1, 2, 3, 4]), "valid": np.array([5, 6]), "tstid": np.array([7, 8])})
    splits = splits_of("flowers102", tmp_path)
    assert len(splits["train"].class_names) == 102 and splits["train"].class_names[0] == "pink primrose"
    assert splits["test"].sample_ids == ["flowers-102/jpg/image_00007.jpg", "flowers-102/jpg/image_00008.jpg"]
    assert splits["test"].targets.tolist() == [76, 76] and len(splits["val"]) == 2


def test_cifar100_reads_pickled_arrays_without_running_code(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 2)):
        with (base / name).open("wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "fine_labels": [i % 2 for i in range(n)]}, f)
    with (base / "meta").open("wb") as f:
        pickle.dump({"fine_label_names": ["apple", "aquarium_fish"]}, f)
    splits = splits_of("cifar100", tmp_path)
    test = splits["test"]
    assert test.sample_ids == ["test/0", "test/1"] and test.array.shape == (2, 32, 32, 3)
    with (base / "test").open("rb") as f:
        raw = pickle.load(f)["data"][1]
    assert np.array_equal(test.array[1][..., 0].ravel(), raw[:1024])  # channel-major rows -> HWC images
    with (base / "meta").open("wb") as f:
        pickle.dump({"fine_label_names": ["a", "b"], "x": Path("evil")}, f)
    with pytest.raises(MakdError, match="refusing to load"):
        splits_of("cifar100", tmp_path)


def test_cub200(tmp_path):
    folder = tmp_path / "CUB_200_2011"
    write(folder / "classes.txt", "1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    images, labels, split = [], [], []
    for k in range(1, 7):
        cls = "001.Black_footed_Albatross" if k <= 3 else "002.Laysan_Albatross"
        image(folder / "images" / cls / f"bird_{k}.jpg", k)
        images.append(f"{k} {cls}/bird_{k}.jpg")
        labels.append(f"{k} {1 if k <= 3 else 2}")
        split.append(f"{k} {0 if k in (3, 6) else 1}")
    for name, rows in (("images.txt", images), ("image_class_labels.txt", labels), ("train_test_split.txt", split)):
        write(folder / name, "\n".join(rows) + "\n")
    for root in (tmp_path, folder):  # data.root may name the folder or its parent: same ids
        splits = splits_of("cub200", root)
        assert splits["train"].class_names == ["Black footed Albatross", "Laysan Albatross"]
        assert splits["test"].sample_ids == ["images/001.Black_footed_Albatross/bird_3.jpg", "images/002.Laysan_Albatross/bird_6.jpg"]
    write(folder / "image_class_labels.txt", "1 1\n")
    with pytest.raises(MakdError, match="no label for image id 2"):
        splits_of("cub200", tmp_path)


def test_dataset_ids_join_a_label_store(tmp_path):
    """Ids are stable strings, so a store written for one build of the splits serves the next."""
    from conftest import PixelTeacher, make_question_set

    from makd.data.base import ImageSplit
    from makd.labels import LabelStore, label_split

    test_dtd(tmp_path)
    splits = splits_of("dtd", tmp_path)
    questions = make_question_set(splits["train"].class_names, n=2)
    label_split(ImageSplit.concat([splits["train"], splits["test"]], "all"), PixelTeacher(), questions, tmp_path / "labels",
                shard_size=4, progress=False)
    again = splits_of("dtd", tmp_path)["test"]
    logodds, _ = LabelStore.open(tmp_path / "labels").lookup(again.sample_ids)
    assert logodds.shape == (2, 2) and np.isfinite(logodds).all()
