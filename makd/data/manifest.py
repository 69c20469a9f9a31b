"""CSV / JSONL manifests: one row per image, `path,label[,split]`.

Paths are relative to `data.root` (default: the manifest's folder) and are the sample ids, so a label store
made for a manifest keeps matching when the images move with it. Labels are class names, or indices into
`data.classes`; a missing split means `train`. Every class of `data.classes` needs training rows: a class
without images would silently be one the model never sees.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from makd.data.base import ImageSplit, Pools, file_split
from makd.data.config import DataConfig
from makd.data.registry import DATASETS
from makd.errors import MakdError

SPLITS = ("train", "val", "test")


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs; JSONL for .jsonl/.json files, CSV with a header otherwise."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MakdError(f"data.manifest: file not found: {path}") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MakdError(f"{path}:{n}: not a JSON object ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise MakdError(f"{path}:{n}: expected a JSON object with path and label")
                rows.append((n, row))
        return rows
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
        raise MakdError(f"{path}: the CSV header must name the columns path,label[,split] (got {reader.fieldnames})")
    return [(n, row) for n, row in enumerate(reader, 2)]


def class_list(value: str | list[str] | None, labels: list[str]) -> list[str]:
    """Class names from the config (a list or a one-per-line file), else the sorted distinct labels."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        try:
            return [line.strip() for line in Path(value).read_text(encoding="utf-8").splitlines() if line.strip()]
        except FileNotFoundError:
            raise MakdError(f"data.classes: file not found: {value}") from None
    distinct = set(labels)
    return sorted(distinct, key=int) if all(x.isdigit() for x in distinct) else sorted(distinct)


def label_index(label: str, index: dict[str, int], num_classes: int, where: str) -> int:
    if label in index:
        return index[label]
    if label.isdigit() and int(label) < num_classes:
        return int(label)
    raise MakdError(f"{where}: label {label!r} is not a class name (nor an index below {num_classes})")


@DATASETS.register("manifest")
def load_manifest(config: DataConfig) -> Pools:
    """(train pool, val or None, test or None) from `data.manifest`."""
    if not config.manifest:
        raise MakdError("data.manifest: required for dataset manifest (a CSV or JSONL file of path,label[,split])")
    path = Path(config.manifest)
    if not path.is_file():
        looked = config._searched.get("manifest") or [str(path)]
        raise MakdError(f"data.manifest: file not found (looked for {' and '.join(looked)})")
    root = Path(config.root) if config.root else path.parent
    rows = read_rows(path)
    if not rows:
        raise MakdError(f"{path}: the manifest has no rows")
    parsed = []
    for n, row in rows:
        where = f"{path}:{n}"
        image, label, split = ("" if row.get(k) is None else str(row[k]).strip() for k in ("path", "label", "split"))
        if not image or not label:
            raise MakdError(f"{where}: every row needs a path and a label")
        split = split or "train"
        if split not in SPLITS:
            raise MakdError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        parsed.append((where, image, label, split))
    classes = class_list(config.classes, [label for _, _, label, _ in parsed])
    index = {name: i for i, name in enumerate(classes)}
    by_split: dict[str, tuple[list[Path], list[int]]] = {s: ([], []) for s in SPLITS}
    seen: set[str] = set()
    for where, image, label, split in parsed:
        file = root / image
        if image in seen:
            raise MakdError(f"{where}: {image} is listed twice")
        if not file.is_file():
            raise MakdError(f"{where}: image not found: {file}")
        seen.add(image)
        by_split[split][0].append(file)
        by_split[split][1].append(label_index(label, index, len(classes), where))

    def split_of(name: str) -> ImageSplit | None:
        files, targets = by_split[name]
        return file_split(name, root, files, targets, classes, "manifest") if files else None

    train = split_of("train")
    if train is None:
        raise MakdError(f"{path}: no training rows (rows without a split count as train)")
    trained = set(by_split["train"][1])
    unseen = [name for i, name in enumerate(classes) if i not in trained]
    if unseen:
        anywhere = any(classes.index(unseen[0]) in by_split[s][1] for s in ("val", "test"))
        named = "of data.classes " if config.classes is not None else ""
        fix = "drop it from data.classes" if config.classes is not None else "remove its rows"
        raise MakdError(f"{path}: class {unseen[0]!r} {named}has no {'training ' if anywhere else ''}images "
                        f"({len(unseen)} such class(es): {', '.join(map(repr, unseen))}): add training rows for it, "
                        f"or {fix}")
    return train, split_of("val"), split_of("test")
