"""The paper's fine-grained datasets by name, from the folder layout their official archives unpack to.

Oxford-IIIT Pet, FGVC-Aircraft, DTD, Food-101, Stanford Cars and Caltech-101 are read by torchvision's own
classes (download=False); Flowers-102 and CIFAR-100 by small readers here, because torchvision checks their
files' MD5 sums; CUB-200-2011 (not in torchvision) by a reader of its text files. Sample ids are image paths
relative to `data.root` (`train/<i>` / `test/<i>` for CIFAR-100), so label stores join by id.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from makd.data.base import ImageSplit, Pools, file_split
from makd.data.config import DataConfig
from makd.data.registry import DATASETS
from makd.errors import MakdError

# dataset -> (torchvision class, its split names for our train pool / val / test, the folder it expects under root)
TORCHVISION = {
    "oxford_pets": ("OxfordIIITPet", ("trainval", None, "test"), "oxford-iiit-pet/{images,annotations}"),
    "fgvc_aircraft": ("FGVCAircraft", ("train", "val", "test"), "fgvc-aircraft-2013b/data"),
    "dtd": ("DTD", ("train", "val", "test"), "dtd/dtd/{images,labels}"),
    "food101": ("Food101", ("train", None, "test"), "food-101/{images,meta}"),
    "stanford_cars": ("StanfordCars", ("train", None, "test"), "stanford_cars/{devkit,cars_train,cars_test}"),
}


def _root(config: DataConfig) -> Path:
    if not config.root:
        raise MakdError(f"data.root: required for dataset {config.dataset} (the folder holding its files)")
    root = Path(config.root)
    if not root.is_dir():
        raise MakdError(f"data.root: folder not found: {root}")
    return root


def _torchvision(cls_name: str, root: Path, split: str, layout: str, dataset: str) -> Any:
    import torchvision.datasets as tvd

    try:
        return getattr(tvd, cls_name)(str(root), split=split, download=False)
    except (RuntimeError, FileNotFoundError, OSError, ValueError, KeyError) as exc:
        raise MakdError(f"data.root: {dataset} not found or incomplete in {root} (expected {layout}; "
                        f"torchvision: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _files_labels(ds: Any) -> tuple[list[Path], list[int]]:
    """Image paths and class indices held by a torchvision dataset object."""
    if hasattr(ds, "_samples"):  # StanfordCars
        paths, labels = zip(*ds._samples) if ds._samples else ((), ())
    else:
        paths, labels = getattr(ds, "_images", None) or ds._image_files, ds._labels
    return [Path(p) for p in paths], [int(y) for y in labels]


def load_torchvision(config: DataConfig) -> Pools:
    root = _root(config)
    cls_name, names, layout = TORCHVISION[config.dataset]
    splits: list[ImageSplit | None] = []
    classes: list[str] | None = None
    for ours, theirs in zip(("train", "val", "test"), names):
        if theirs is None:
            splits.append(None)
            continue
        ds = _torchvision(cls_name, root, theirs, layout, config.dataset)
        classes = classes or [str(c) for c in ds.classes]
        paths, labels = _files_labels(ds)
        splits.append(file_split(ours, root, paths, labels, classes, config.dataset))
    return splits[0], splits[1], splits[2]


@DATASETS.register("caltech101")
def load_caltech101(config: DataConfig) -> Pools:
    """All of Caltech-101 as one pool (it has no official split: the test split is held out by fraction)."""
    root = _root(config)
    ds = _caltech(root)
    folder = root / "caltech101" / "101_ObjectCategories"
    paths = [folder / ds.categories[y] / f"image_{i:04d}.jpg" for i, y in zip(ds.index, ds.y)]
    return file_split("train", root, paths, ds.y, list(ds.categories), "caltech101"), None, None


def _caltech(root: Path) -> Any:
    import torchvision.datasets as tvd

    if not (root / "caltech101" / "101_ObjectCategories").is_dir():  # torchvision would create folders first
        raise MakdError(f"data.root: caltech101 not found in {root} (expected caltech101/101_ObjectCategories/<class>/)")
    try:
        return tvd.Caltech101(str(root), download=False)
    except (RuntimeError, ValueError) as exc:
        raise MakdError(f"data.root: caltech101 in {root} is incomplete ({exc})") from None


@DATASETS.register("flowers102")
def load_flowers102(config: DataConfig) -> Pools:
    """Flowers-102: flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat} (torchvision's layout)."""
    from scipy.io import loadmat
    from torchvision.datasets import Flowers102

    root = _root(config)
    base = root / "flowers-102"
    try:
        labels = loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"]
        set_ids = loadmat(base / "setid.mat", squeeze_me=True)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise MakdError(f"data.root: flowers102 not found or incomplete in {root} (expected flowers-102/"
                        f"{{jpg/, imagelabels.mat, setid.mat}}: {exc})") from None
    splits = []
    for ours, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        ids = np.atleast_1d(set_ids[key]).astype(int)
        paths = [base / "jpg" / f"image_{i:05d}.jpg" for i in ids]
        splits.append(file_split(ours, root, paths, labels[ids - 1].astype(int) - 1, list(Flowers102.classes), "flowers102"))
    return splits[0], splits[1], splits[2]


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles of dicts, lists and NumPy arrays: allow only those NumPy globals."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise MakdError(f"data.root: CIFAR-100 file not found: {path} (expected cifar-100-python/{{train,test,meta}})") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise MakdError(f"cannot read CIFAR-100 file {path}: {exc}") from None


@DATASETS.register("cifar100")
def load_cifar100(config: DataConfig) -> Pools:
    """CIFAR-100 (python version): 32 px arrays in memory; ids `train/<i>`, `test/<i>`."""
    base = _root(config) / "cifar-100-python"
    classes = [str(c) for c in _unpickle(base / "meta")["fine_label_names"]]
    splits = []
    for name in ("train", "test"):
        batch = _unpickle(base / name)
        array = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        splits.append(ImageSplit(name, [f"{name}/{i}" for i in range(len(array))], np.asarray(batch["fine_labels"]),
                                 classes, array=np.ascontiguousarray(array), info={"dataset": "cifar100", "root": str(base)}))
    return splits[0], None, splits[1]


def _cub_table(folder: Path, name: str) -> dict[int, str]:
    path = folder / name
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MakdError(f"data.root: CUB-200-2011 file not found: {path}") from None
    table = {}
    for n, line in enumerate(lines, 1):
        if line.strip():
            key, sep, value = line.strip().partition(" ")
            if not sep or not key.isdigit():
                raise MakdError(f"{path}:{n}: expected '<id> <value>', got {line!r}")
            table[int(key)] = value.strip()
    return table


@DATASETS.register("cub200")
def load_cub200(config: DataConfig) -> Pools:
    """CUB-200-2011: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt and images/."""
    root = _root(config)
    folder = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    images, labels = _cub_table(folder, "images.txt"), _cub_table(folder, "image_class_labels.txt")
    is_train, classes = _cub_table(folder, "train_test_split.txt"), _cub_table(folder, "classes.txt")
    names = [classes[k].split(".", 1)[-1].replace("_", " ") for k in sorted(classes)]  # 001.Black_footed_Albatross
    splits = {}
    for name, flag in (("train", "1"), ("test", "0")):
        ids = [i for i in sorted(images) if is_train.get(i) == flag]
        missing = [i for i in ids if i not in labels]
        if missing:
            raise MakdError(f"{folder / 'image_class_labels.txt'}: no label for image id {missing[0]}")
        # Ids relative to the CUB_200_2011 folder: the same whichever of it or its parent data.root names.
        splits[name] = file_split(name, folder, [folder / "images" / images[i] for i in ids],
                                  [int(labels[i]) - 1 for i in ids], names, "cub200")
    return splits["train"], None, splits["test"]


for _name in TORCHVISION:
    DATASETS.register(_name)(load_torchvision)
