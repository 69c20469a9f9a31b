"""Image splits: samples with a stable id, a class index, and a way to load the image.

The sample id (`split/index` for array datasets, the path relative to the root for files) is the join key
with the label store: labels are never matched by position or parsed from file names.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from makd.errors import MakdError
from makd.launchers import processes_on_node

log = logging.getLogger("makd.data")
# Image files a server decodes to the pixels makd's loader gives (JPEG/PNG/WebP in RGB or grey): sent as they are.
# Pillow calls a JPEG with extra frames (cameras' multi-picture files) MPO; its first frame is the JPEG image.
SENT_AS_IS = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


@dataclass
class ImageSplit:
    """A list of samples of one dataset. Images come either from an in-memory uint8 array or from files."""

    name: str
    sample_ids: list[str]
    targets: np.ndarray
    class_names: list[str]
    array: np.ndarray | None = None  # [N, H, W] or [N, H, W, C] uint8
    paths: list[Path] | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int64)
        n = len(self.sample_ids)
        sizes = {len(self.targets), n, len(self.array) if self.array is not None else n, len(self.paths or []) or n}
        if len(sizes) != 1:
            raise ValueError(f"split {self.name!r}: ids, targets and images differ in length {sorted(sizes)}")
        if (self.array is None) == (self.paths is None):
            raise ValueError(f"split {self.name!r}: give exactly one of array or paths")

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image(self, i: int) -> Image.Image:
        """The i-th image as PIL, in its native mode ('L' stays grey)."""
        if self.array is not None:
            return Image.fromarray(self.array[i])
        return load_image(self.paths[i])

    def images(self, indices: Sequence[int]) -> list[Image.Image]:
        return [self.image(int(i)) for i in indices]

    def image_file(self, i: int) -> Path | None:
        """The file holding exactly the i-th image; None for in-memory arrays (and in subclasses whose samples are
        parts of files)."""
        return None if self.paths is None else self.paths[i]

    def encoded(self, i: int) -> tuple[bytes, str]:
        """The i-th image as file bytes and their MIME type, for a server that decodes them itself: the file's own
        bytes when `sent_as_is` (a JPEG stays the JPEG: smaller than any lossless re-encoding, and decoded to the
        same pixels); else (arrays, crops, other formats or modes) a lossless PNG of `image(i)`."""
        path = self.image_file(i)
        if path is not None:
            with image_errors(path):
                data = path.read_bytes()
                mime = sent_as_is(io.BytesIO(data))
            if mime:
                return data, mime
        return png_bytes(self.image(i)), "image/png"

    def subset(self, indices: Sequence[int], name: str | None = None) -> "ImageSplit":
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSplit(
            name=name or self.name,
            sample_ids=[self.sample_ids[i] for i in idx],
            targets=self.targets[idx],
            class_names=self.class_names,
            array=None if self.array is None else self.array[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
            info=dict(self.info),
        )

    @staticmethod
    def concat(splits: Sequence["ImageSplit"], name: str) -> "ImageSplit":
        """Samples of several splits of one dataset, in order (e.g. everything a label job covers)."""
        first = splits[0]
        return ImageSplit(
            name=name,
            sample_ids=[sid for s in splits for sid in s.sample_ids],
            targets=np.concatenate([s.targets for s in splits]),
            class_names=first.class_names,
            array=None if first.array is None else np.concatenate([s.array for s in splits]),
            paths=None if first.paths is None else [p for s in splits for p in s.paths],
            info=dict(first.info),
        )

    @property
    def channels(self) -> int:
        """1 for greyscale data, else 3: `data.channels` when set (info["channels"]), an array's shape, or for files
        whether every file is greyscale (found once, then kept in `info`)."""
        if self.array is not None:
            return 1 if self.array.ndim == 3 else self.array.shape[-1]
        if self.info.get("channels") in (1, 3):
            return self.info["channels"]
        self.info["channels"] = file_channels(self.paths, f"split {self.name!r}")
        return self.info["channels"]


@dataclass(frozen=True)
class MissingSplit:
    """A split whose files are not there: an error (`reason`) only for a command that needs that split, so
    labelling `train` works before a `test/` folder exists."""

    reason: str


# A reader's (train pool, val, test); None = the dataset has no such split (validation and test are then held out).
Pools = tuple[ImageSplit, ImageSplit | None, ImageSplit | MissingSplit | None]


def file_split(name: str, root: Path, paths: Sequence[Path], targets: Sequence[int], class_names: list[str],
               dataset: str) -> ImageSplit:
    """A split of image files whose sample ids are their paths relative to `root` (stable across machines)."""
    paths = [Path(p) for p in paths]
    ids = [(p.relative_to(root) if p.is_relative_to(root) else p).as_posix() for p in paths]
    return ImageSplit(name=name, sample_ids=ids, targets=np.asarray(targets),
                      class_names=list(class_names), paths=paths, info={"dataset": dataset, "root": str(root)})


def load_image(path: Path) -> Image.Image:
    """Decode an image fully now, so a corrupt file fails here with its name, not later in a worker."""
    with image_errors(path), Image.open(path) as img:
        img.load()
        return img.convert("RGB") if img.mode not in ("L", "RGB") else img.copy()


def image_mode(path: Path) -> str:
    """The file's PIL mode, from its header (nothing is decoded)."""
    with image_errors(path), Image.open(path) as img:
        return img.mode


def file_channels(paths: Sequence[Path], what: str, chunk: int = 256) -> int:
    """1 when every file is greyscale ('L'), else 3. Headers are read a chunk at a time in threads (I/O), stopping
    at the chunk that holds the first colour image; greyscale files before it mean a mixed folder, read as RGB
    (its greyscale images are converted), which the log states."""
    grey = 0
    with ThreadPoolExecutor(8) as pool:
        for start in range(0, len(paths), chunk):
            part = paths[start:start + chunk]
            for path, mode in zip(part, pool.map(image_mode, part)):
                if mode != "L":
                    if grey:
                        log.info("%s mixes greyscale and colour images (%d greyscale before %s): read as RGB, the "
                                 "greyscale ones converted; data.channels=1 trains on greyscale instead", what, grey, path)
                    return 3
                grey += 1
    return 1


def sent_as_is(file: Path | BinaryIO) -> str | None:
    """The MIME type of an image file that servers get as it is: a JPEG, PNG or WebP in RGB or grey, which they
    decode to the pixels `load_image` gives; None for others. Reads the header only."""
    with Image.open(file) as img:
        return SENT_AS_IS.get(img.format or "") if img.mode in ("L", "RGB") else None


def png_bytes(image: Image.Image) -> bytes:
    """A lossless PNG of `image` (greyscale stays greyscale)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def image_errors(path: Path) -> Iterator[None]:
    """Reading the image file `path`: its problems as one line naming it."""
    try:
        yield
    except FileNotFoundError:
        raise MakdError(f"image not found: {path}") from None
    except UnidentifiedImageError:
        raise MakdError(f"cannot read image {path}: not an image, or a corrupt one") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise MakdError(f"cannot read image {path}: {str(exc).replace(repr(str(path)), 'it')}") from None


def per_class_sample(targets: np.ndarray, per_class: int, rng: np.random.Generator, exclude: np.ndarray | None = None,
                     at_most: bool = False, too_few: Callable[[int, int], str] | None = None) -> np.ndarray:
    """Indices of `per_class` randomly chosen samples of every class (sorted), skipping `exclude`.

    With `at_most`, a class with fewer samples contributes all of them instead of raising; otherwise the error
    is `too_few(class index, samples available)` (the caller knows the class names and the option to change).
    """
    available = np.ones(len(targets), dtype=bool)
    if exclude is not None:
        available[exclude] = False
    chosen = []
    for cls in np.unique(targets):
        pool = np.flatnonzero((targets == cls) & available)
        if len(pool) < per_class and not at_most:
            raise MakdError(too_few(int(cls), len(pool)) if too_few else
                            f"class {cls} has only {len(pool)} samples available, {per_class} requested")
        chosen.append(rng.choice(pool, size=min(per_class, len(pool)), replace=False))
    return np.sort(np.concatenate(chosen))


def loader_workers(setting: int | str, in_memory: bool, device_type: str) -> int:
    """`data.num_workers` as a number. "auto": for a model on a GPU, the CPU cores available to this process — its
    affinity mask (Slurm binds each task to its cores) shared by the processes torchrun started on the node
    (LOCAL_WORLD_SIZE) — to decode and augment ahead of it; none for in-memory arrays (fetching a batch costs less
    than passing it between processes) and none for a model on the CPU (its own threads use the cores: loader
    processes compete with them — the detection demo trains at 0.83x with one)."""
    if setting != "auto":
        return int(setting)
    if in_memory or device_type == "cpu":
        return 0
    return cores_per_process()


def cores_per_process() -> int:
    """The CPU cores this process may use: its affinity mask when a launcher bound it to its share (Slurm's task
    affinity), else the node's cores over the run's processes on the node (torchrun, srun without binding)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    bound = cores < (os.cpu_count() or cores)
    return max(1, cores if bound else cores // processes_on_node())
