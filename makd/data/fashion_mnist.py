"""Fashion-MNIST from the IDX files of Debian's `dataset-fashion-mnist` package (or any copy of them)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from makd.data.base import ImageSplit, Pools
from makd.data.config import DataConfig
from makd.data.registry import DATASETS
from makd.errors import MakdError

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def default_root() -> Path:
    return Path(os.environ.get("MAKD_FASHION_MNIST", DEFAULT_ROOT))


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    hint = "install it with `sudo apt-get install dataset-fashion-mnist` (or `make data`)" if root == DEFAULT_ROOT else "check data.root"
    raise MakdError(f"Fashion-MNIST file {stem}(.gz) not found in {root}: {hint}")


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise MakdError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise MakdError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise MakdError(f"{path} is truncated: header says {shape}, file has {len(data) - offset} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(split: str, root: str | Path | None = None) -> ImageSplit:
    """The full official train (60,000) or test (10,000) split; sample ids are `train/<i>`, `test/<i>`."""
    if split not in FILES:
        raise MakdError(f"Fashion-MNIST has splits train and test, not {split!r}")
    root = Path(root) if root else default_root()
    images = read_idx(_find(root, FILES[split][0]))
    labels = read_idx(_find(root, FILES[split][1]))
    if len(images) != len(labels):
        raise MakdError(f"{root}: {split} has {len(images)} images but {len(labels)} labels")
    return ImageSplit(
        name=split,
        sample_ids=[f"{split}/{i}" for i in range(len(images))],
        targets=labels.astype(np.int64),
        class_names=list(CLASSES),
        array=images,
        info={"dataset": "fashion_mnist", "root": str(root)},
    )


@DATASETS.register("fashion_mnist")
def read_fashion_mnist(config: DataConfig) -> Pools:
    """The official train split as the pool (validation is drawn from it) and the official test split."""
    return load_fashion_mnist("train", config.root), None, load_fashion_mnist("test", config.root)
