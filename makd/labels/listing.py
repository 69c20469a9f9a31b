"""The store's sample list (`samples.parquet`), written once and read by every worker instead of rescanning the images.

Listing an ImageNet-sized tree takes minutes on a shared file system, and every worker of a job needs the same
list. The first worker to start lists the images (holding the `samples` lease, so the others wait for it rather
than scan too) and writes `sample_id`, `target` and `path` per sample, in store order, with what decided them:
a key of the config (the `data` section, `labels.splits`, `labels.max_per_class`, the task, makd's version) and the
modification times of the folders that hold the images, of the folders above them up to `data.root`, and of
the files beside those (index files, manifests). A worker reads the listing only when its config has the same key
and none of those times changed — an image added, removed or renamed changes its folder's time — else it lists the
images itself; if the list then differs from the store's, resuming is refused with the first sample that differs
(`makd.labels.writer`), never silently continued on the old list.

Every store records its sample ids here (a store labelled from arrays or box crops records ids and targets only,
and is never reused for listing); it is what names the first difference when a resumed job's samples differ.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import makd
from makd.atomic import atomic_path, read_json
from makd.config import Config
from makd.data.base import ImageSplit
from makd.labels.leases import LEASE_DIR, LeaseBoard
from makd.labels.store import META_FILE, ids_hash

LISTING_FILE = "samples.parquet"
LISTING_LEASE = "samples"
KEY = b"makd.listing_key"
STAMPS = b"makd.stamps"
SPLIT = b"makd.split"  # name, class names and info of the listed split (JSON)
IDS_HASH = b"makd.sample_ids_hash"


def write_listing(folder: Path, samples: ImageSplit | Sequence[str], key: str | None = None,
                  index_files: Sequence[Path] = ()) -> None:
    """Record `samples` (a split, or just the ids) as the store's sample list; with `key`, a split of image files
    is recorded for reuse by workers whose config has that key (and whose `index_files`, e.g. the manifest,
    have not changed either)."""
    if isinstance(samples, ImageSplit):
        ids = samples.sample_ids
        columns: dict[str, pa.Array] = {"sample_id": pa.array(ids, pa.string()),
                                        "target": pa.array(samples.targets, pa.int64())}
        metadata = {SPLIT: json.dumps({"name": samples.name, "class_names": samples.class_names,
                                       "info": samples.info}, default=str).encode()}
        if key is not None and _reusable(samples):
            columns["path"] = pa.array([str(p) for p in samples.paths], pa.string())
            metadata[KEY] = key.encode()
            metadata[STAMPS] = json.dumps(_stamps(samples, index_files)).encode()
    else:
        ids = list(samples)
        columns, metadata = {"sample_id": pa.array(ids, pa.string())}, {}
    metadata[IDS_HASH] = ids_hash(ids).encode()
    with atomic_path(folder / LISTING_FILE) as tmp:
        pq.write_table(pa.table(columns).replace_schema_metadata(metadata), tmp)


def listed_ids(folder: Path) -> list[str] | None:
    """The sample ids the store records, or None (none recorded, or unreadable)."""
    try:
        with pq.ParquetFile(folder / LISTING_FILE) as file:  # not pq.read_table: it imports pyarrow.dataset (pandas)
            return file.read(columns=["sample_id"]).column(0).to_pylist()
    except (OSError, pa.ArrowException, KeyError):
        return None


def listed_split(folder: Path, key: str) -> ImageSplit | None:
    """The split recorded for `key`, if its images' folders have not changed since; else None (list them again)."""
    path = folder / LISTING_FILE
    try:
        metadata = pq.read_schema(path).metadata or {}
        if metadata.get(KEY) != key.encode() or not _fresh(json.loads(metadata[STAMPS])):
            return None
        with pq.ParquetFile(path) as file:
            table = file.read()
        split = json.loads(metadata[SPLIT])
        ids = table.column("sample_id").to_pylist()
        if ids_hash(ids) != metadata[IDS_HASH].decode():
            return None
        return ImageSplit(split["name"], ids, table.column("target").to_numpy(), split["class_names"],
                          paths=[Path(p) for p in table.column("path").to_pylist()], info=split["info"])
    except (OSError, pa.ArrowException, KeyError, ValueError, TypeError):
        return None  # none, damaged, or of an older makd: list the images


def listing_key(config: Config, samples: Callable[[Config], ImageSplit]) -> str:
    """What decides a config's sample list (settings that only change how images are read are left out)."""
    parts: dict[str, Any] = {
        "data": config.data.model_dump(mode="json", exclude={"num_workers", "prefetch_factor", "channels", "image_size",
                                                              "augment", "crop_padding"}),
        "splits": list(config.labels.splits), "max_per_class": config.labels.max_per_class, "task": config.task,
        "samples": f"{samples.__module__}.{samples.__qualname__}", "makd": makd.__version__,
    }
    if config.task == "detection":
        parts["detection"] = config.detection.model_dump(mode="json")
    text = json.dumps(parts, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def shared_samples(config: Config, out: Path, samples: Callable[[Config], ImageSplit], *,
                   lease_timeout: float, overwrite: bool = False) -> ImageSplit:
    """`samples(config)`, from the store's listing when it is valid for this config (see the module docstring);
    otherwise listed here — by one worker at a time: the others wait for its listing — and recorded."""
    key = listing_key(config, samples)
    out.mkdir(parents=True, exist_ok=True)
    split = listed_split(out, key)
    if split is not None:
        return split
    board = LeaseBoard(out / LEASE_DIR, timeout=lease_timeout)
    lease = board.try_claim(LISTING_LEASE)
    if lease is None:  # another worker is listing: wait for its listing rather than scan the images too
        board.wait_released(LISTING_LEASE)
        return listed_split(out, key) or samples(config)
    with lease:
        split = listed_split(out, key) or samples(config)
        if _may_record(out, split, overwrite):
            write_listing(out, split, key, _index_files(config))
        return split


def _index_files(config: Config) -> list[Path]:
    """Files of the data section that decide the sample list (a manifest, a class list), where they are found."""
    found = []
    for value in (config.data.manifest, config.data.classes):
        if isinstance(value, str):
            for place in (Path(value), Path(config.data.root or "") / value):
                if place.is_file():
                    found.append(place)
                    break
    return found


def listed_or_built(config: Config, out: Path, samples: Callable[[Config], ImageSplit]) -> ImageSplit:
    """`samples(config)` from the store's listing when it is valid for this config, else built (nothing written)."""
    return listed_split(out, listing_key(config, samples)) or samples(config)


def _may_record(out: Path, split: ImageSplit, overwrite: bool) -> bool:
    """Not over the list of a store started for other samples: resuming it is refused, naming the difference."""
    meta_path = out / META_FILE
    if overwrite or not meta_path.is_file():
        return True
    try:
        return read_json(meta_path).get("sample_ids_hash") == ids_hash(split.sample_ids)
    except Exception:  # noqa: BLE001 - a damaged labels.json is reported by the writer, with its name
        return False


def _reusable(split: ImageSplit) -> bool:
    """Only plain splits of image files can be rebuilt from a listing (arrays need their pixels, crops their boxes)."""
    return type(split) is ImageSplit and split.paths is not None


def _stamps(split: ImageSplit, index_files: Sequence[Path]) -> dict[str, list[int]]:
    """Modification times of the folders holding the images, of the folders above them up to the dataset root, and
    of the files in those upper folders and in their other sub-folders (index files, manifests)."""
    leaves = {p.parent for p in split.paths}
    root = Path(split.info["root"]) if split.info.get("root") else None
    folders = set(leaves)
    for leaf in leaves:
        for parent in leaf.parents:
            if root is None or not (parent == root or root in parent.parents):
                break
            folders.add(parent)
    upper = folders - leaves
    files = {Path(f) for f in index_files}
    for folder in sorted(upper):
        for entry in _entries(folder):
            path = Path(entry.path)
            if entry.is_file():
                files.add(path)
            elif entry.is_dir() and path not in folders:  # e.g. food-101/meta beside food-101/images
                folders.add(path)
                files.update(Path(e.path) for e in _entries(path) if e.is_file())
    stamps = {f"d:{folder}": [os.stat(folder).st_mtime_ns] for folder in folders}
    for file in files:
        stat = os.stat(file)
        stamps[f"f:{file}"] = [stat.st_mtime_ns, stat.st_size]
    return stamps


def _entries(folder: Path) -> Iterable[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


def _fresh(stamps: dict[str, list[int]]) -> bool:
    for name, recorded in stamps.items():
        try:
            stat = os.stat(name[2:])
        except OSError:
            return False
        now = [stat.st_mtime_ns] if name.startswith("d:") else [stat.st_mtime_ns, stat.st_size]
        if now != recorded:
            return False
    return True
