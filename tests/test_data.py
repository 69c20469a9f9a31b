import gzip
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from makd.config import DataConfig
from makd.data import build_splits
from makd.data.base import ImageSplit
from makd.data.fashion_mnist import read_idx
from makd.data.imagefolder import load_imagefolder
from makd.data.transforms import SplitDataset, build_transform, input_spec
from makd.errors import MakdError


def test_fashion_mnist_few_shot_splits_are_seeded_disjoint_and_balanced():
    splits = build_splits(DataConfig(train_per_class=20, val_per_class=50, split_seed=0))
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert len(train) == 200 and len(val) == 500 and len(test) == 10000
    assert np.bincount(train.targets).tolist() == [20] * 10 and np.bincount(val.targets).tolist() == [50] * 10
    assert not set(train.sample_ids) & set(val.sample_ids)
    assert all(s.startswith("train/") for s in train.sample_ids + val.sample_ids)
    again = build_splits(DataConfig(train_per_class=20, val_per_class=50, split_seed=0))
    assert again["train"].sample_ids == train.sample_ids and again["val"].sample_ids == val.sample_ids
    other = build_splits(DataConfig(train_per_class=20, val_per_class=50, split_seed=1))
    assert other["train"].sample_ids != train.sample_ids
    # The sample id points at the same image in the full split.
    index = int(train.sample_ids[3].split("/")[1])
    from makd.data.fashion_mnist import load_fashion_mnist

    full = load_fashion_mnist("train")
    assert np.array_equal(full.array[index], train.array[3]) and full.targets[index] == train.targets[3]


def test_missing_fashion_mnist_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(MakdError, match=f"not found in {tmp_path}"):
        build_splits(DataConfig(root=str(tmp_path)))


def test_truncated_idx_file(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(MakdError, match="truncated"):
        read_idx(path)


def test_imagefolder_ids_classes_and_val_carved_from_train(tiny_imagefolder):
    splits = build_splits(DataConfig(dataset="imagefolder", root=str(tiny_imagefolder), train_per_class=4,
                                     val_per_class=2, image_size=32))
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert train.class_names == ["Sandal", "T-shirt_top", "Trouser"]
    assert len(train) == 12 and len(val) == 6 and len(test) == 9
    assert all(s.startswith("train/") and s.endswith(".png") for s in train.sample_ids)
    assert not set(train.sample_ids) & set(val.sample_ids)
    spec = input_spec(train, 32)
    x, y, row = SplitDataset(train, build_transform(spec, train=True), spec)[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and row == 0


def test_corrupt_image_is_named(tmp_path, tiny_imagefolder):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_imagefolder, root)
    bad = sorted((root / "train" / "Trouser").iterdir())[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    split = load_imagefolder(root, "train")
    with pytest.raises(MakdError, match=f"cannot read image {bad}"):
        split.images(range(len(split)))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(MakdError, match="data.root: folder not found"):
        build_splits(DataConfig(dataset="imagefolder", root=str(tmp_path / "nope")))
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(MakdError, match="has no test/ folder"):
        build_splits(DataConfig(dataset="imagefolder", root=str(tmp_path)))


def test_native_and_resized_transforms():
    splits = build_splits(DataConfig(train_per_class=2, val_per_class=1, test_per_class=1))
    spec = input_spec(splits["train"], None)
    assert (spec.in_chans, spec.height, spec.width, spec.resized) == (1, 28, 28, False)
    x, _, _ = SplitDataset(splits["test"], build_transform(spec, train=False), spec)[0]
    expected = torch.from_numpy(splits["test"].array[0]).float() / 255
    assert torch.allclose(x[0], expected)


def test_transforms_follow_the_models_data_config(tiny_imagefolder):
    from torchvision.transforms import v2

    train = build_splits(DataConfig(dataset="imagefolder", root=str(tiny_imagefolder), train_per_class=4, val_per_class=2,
                                    image_size=None))["train"]
    timm_like = {"input_size": (3, 176, 176), "crop_pct": 0.9, "interpolation": "bicubic"}
    spec = input_spec(train, None, timm_like)
    assert (spec.height, spec.resized, spec.crop_pct, spec.interpolation) == (176, True, 0.9, "bicubic")
    resize = build_transform(spec, train=False)[0]
    assert isinstance(resize, v2.Resize) and resize.size == [round(176 / 0.9)]
    assert resize.interpolation == v2.InterpolationMode.BICUBIC
    crop = build_transform(spec, train=True)[0]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.interpolation == v2.InterpolationMode.BICUBIC
    assert input_spec(train, 64, timm_like).height == 64  # data.image_size wins
    with pytest.raises(MakdError, match="data.image_size: required"):
        input_spec(train, None, {})


def test_train_complement_leaves_out_the_few_shot_subset_and_validation():
    few = build_splits(DataConfig(train_per_class=3, val_per_class=2, test_per_class=1))
    rest = build_splits(DataConfig(train_per_class=3, val_per_class=2, test_per_class=1, train_complement=True))
    assert rest["val"].sample_ids == few["val"].sample_ids and rest["test"].sample_ids == few["test"].sample_ids
    assert len(rest["train"]) == 60000 - 30 - 20
    assert not set(rest["train"].sample_ids) & (set(few["train"].sample_ids) | set(few["val"].sample_ids))


def _pad_crop_flip_one_image(img: torch.Tensor, p: int) -> torch.Tensor:
    """The augmentation written out for one image, as makd did it image by image (the reference)."""
    h, w = img.shape[-2:]
    dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
    out = torch.nn.functional.pad(img, (p, p, p, p))[..., dy:dy + h, dx:dx + w]
    return out.flip(-1) if torch.rand(()) < 0.5 else out


@pytest.mark.parametrize("channels", [1, 3])
def test_batched_fetch_equals_image_by_image_augmentation(channels):
    """A DataLoader batch of an in-memory split is gathered and augmented as one tensor; it must be the batch the
    image-by-image pipeline gives under the same random state (same draws, same order), bit for bit."""
    rng = np.random.default_rng(0)
    shape = (40, 12, 10) if channels == 1 else (40, 12, 10, 3)
    split = ImageSplit("train", [f"train/{i}" for i in range(40)], rng.integers(0, 4, 40), [str(c) for c in range(4)],
                       array=rng.integers(0, 256, shape, dtype=np.uint8))
    spec = input_spec(split, None)
    dataset = SplitDataset(split, build_transform(spec, train=True, crop_padding=3), spec)
    assert dataset.batched
    rows = [7, 3, 3, 39, 0, 21]
    torch.manual_seed(5)
    images, targets, indices = torch.utils.data.default_collate(dataset.__getitems__(rows))
    torch.manual_seed(5)
    for k, i in enumerate(rows):
        one = torch.from_numpy(split.array[i])
        one = one.unsqueeze(0) if channels == 1 else one.permute(2, 0, 1)
        assert torch.equal(images[k], _pad_crop_flip_one_image(one, 3).float() / 255), f"image {k}"
    assert targets.tolist() == split.targets[rows].tolist() and indices.tolist() == rows
    torch.manual_seed(5)
    dataset.__getitems__(rows)
    after_batch = torch.rand(())
    torch.manual_seed(5)
    for i in rows:
        dataset[i]
    assert torch.equal(after_batch, torch.rand(())), "the batch must consume the generator as the images one by one"


def test_file_splits_and_random_resized_crops_are_fetched_image_by_image(tiny_imagefolder):
    train = build_splits(DataConfig(dataset="imagefolder", root=str(tiny_imagefolder), train_per_class=4, val_per_class=2,
                                    image_size=32))["train"]
    spec = input_spec(train, 32)
    dataset = SplitDataset(train, build_transform(spec, train=True), spec)
    assert not dataset.batched  # files are decoded one by one; RandomResizedCrop draws one crop per call
    images, _, _ = torch.utils.data.default_collate(dataset.__getitems__([0, 1, 2]))
    assert images.shape == (3, train.channels, 32, 32)


def test_channels_come_from_every_file_or_the_config(tmp_path, caplog):
    """A greyscale first image no longer makes an RGB folder greyscale: 1 channel only when every image is."""
    caplog.set_level(logging.INFO, logger="makd")
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("L", (8, 8), 40 * i).save(tmp_path / split / cls / f"{i}.png")
    grey = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, val_fraction=0)
    assert build_splits(grey)["train"].channels == 1 and "mixes greyscale" not in caplog.text
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "train" / "b" / "2.png")  # sorted last: 5 grey files first
    mixed = build_splits(grey)["train"]
    assert mixed.channels == 3 and input_spec(mixed, 8).in_chans == 3
    assert f"split 'train' mixes greyscale and colour images (5 greyscale before {tmp_path / 'train' / 'b' / '2.png'})" \
        in caplog.text
    assert build_splits(grey.model_copy(update={"channels": 1}))["train"].channels == 1  # data.channels decides
    with pytest.raises(MakdError, match="data.channels=3: the fashion_mnist images have 1 channel"):
        build_splits(DataConfig(train_per_class=1, val_per_class=1, test_per_class=1, channels=3))
