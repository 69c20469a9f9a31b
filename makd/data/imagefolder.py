"""ImageFolder trees: `root/<split>/<class>/<image>`, class names from the `train` folder.

A class folder without images is an error, in any split: the class would silently be one the model never
sees (or never is tested on), while its index still counts."""

from __future__ import annotations

from pathlib import Path

from makd.data.base import ImageSplit, MissingSplit, Pools, file_split
from makd.data.config import DataConfig
from makd.data.registry import DATASETS
from makd.errors import MakdError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_classes(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise MakdError(f"data.root: folder not found: {root}")
    train = root / "train"
    if not train.is_dir():
        raise MakdError(f"imagefolder root {root} has no train/ folder (expected root/train/<class>/<image>)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise MakdError(f"{train} has no class folders")
    return classes


def load_imagefolder(root: str | Path, split: str, classes: list[str] | None = None) -> ImageSplit | None:
    """One split folder, or None if the folder does not exist. Sample ids are paths relative to root."""
    root = Path(root)
    classes = classes or list_classes(root)
    folder = root / split
    if not folder.is_dir():
        return None
    index = {name: i for i, name in enumerate(classes)}
    paths, targets = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if class_dir.name not in index:
            raise MakdError(f"{class_dir}: class {class_dir.name!r} is not among the train/ classes")
        files = sorted(f for f in class_dir.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not files:
            fix = "remove its folder from every split to drop the class" if split == "train" else "remove the folder"
            raise MakdError(f"{class_dir}: class {class_dir.name!r} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            f"add images, or {fix}")
        paths += files
        targets += [index[class_dir.name]] * len(files)
    if not paths:
        raise MakdError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return file_split(split, root, paths, targets, classes, "imagefolder")


@DATASETS.register("imagefolder")
def read_imagefolder(config: DataConfig) -> Pools:
    """root/train/<class>/..., root/test/<class>/... and optionally root/val/<class>/..."""
    if config.root is None:
        raise MakdError("data.root: required for dataset imagefolder")
    classes = list_classes(config.root)
    train = load_imagefolder(config.root, "train", classes)
    test = load_imagefolder(config.root, "test", classes)
    if test is None:
        test = MissingSplit(f"imagefolder root {config.root} has no test/ folder (expected root/test/<class>/<image>)")
    return train, load_imagefolder(config.root, "val", classes), test
