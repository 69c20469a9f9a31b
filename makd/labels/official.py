"""The official code's target file, `{image_name: [p_1, ..., p_Q]}` (P(yes) per question, in question order).

Export: p = sigmoid(log-odds), keyed by sample id (`--key id`, e.g. "train/Trouser/img5.png" for an
ImageFolder, "train/123" for array datasets) or by file name (`--key name`, "img5.png"; refused when two
samples share a name).
Import: each key is matched to one sample of the configured splits — the sample whose id equals the key, or
else the only sample whose id ends with "/" + key (so "img5.png", "Trouser/img5.png" and the full id all
work). Keys that match no sample (other splits, other subsets) are counted and skipped; samples without a key
are left out of the store. log-odds = logit(clip(p, 1e-6, 1 - 1e-6)); the official format keeps no answer
mass, so mass is stored as 1 (neutral for mass weighting).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image

from makd.atomic import read_json, write_json
from makd.errors import MakdError
from makd.labels.job import label_split
from makd.labels.store import LabelStore
from makd.questions import QuestionSet
from makd.teachers.base import AspectScores

P_CLIP = 1e-6
NAME = "official-json"


def export_official(store: LabelStore, path: str | Path, key: Literal["id", "name"] = "id") -> int:
    """Write the store as the official JSON; returns the number of images written."""
    ids, logodds, _ = store.read()
    names = ids if key == "id" else [sid.rsplit("/", 1)[-1] for sid in ids]
    if key == "name" and len(set(names)) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))
        raise MakdError(f"--key name: two samples are named {dup!r}; export with --key id")
    p = 1.0 / (1.0 + np.exp(-logodds.astype(np.float64)))
    write_json(path, {name: [float(x) for x in row] for name, row in zip(names, p)})
    return len(names)


def read_official(path: str | Path, num_questions: int) -> dict[str, list[float]]:
    data = read_json(path, "official target file")
    if not isinstance(data, dict) or not data:
        raise MakdError(f"{path}: expected a non-empty JSON object {{image_name: [p_1, ..., p_Q]}}")
    for name, row in data.items():
        if not isinstance(row, list) or len(row) != num_questions:
            raise MakdError(f"{path}: {name!r} has {len(row) if isinstance(row, list) else 'no list of'} values, "
                            f"the question set has {num_questions} questions")
        if not all(isinstance(x, (int, float)) and 0.0 <= x <= 1.0 and not math.isnan(x) for x in row):
            raise MakdError(f"{path}: {name!r} has a value that is not a probability in [0, 1]")
    return data


def match_keys(keys: Sequence[str], sample_ids: Sequence[str], path: str | Path) -> dict[str, str]:
    """sample id -> key, by exact id or else by a unique "/"-suffix of the id (see the module docstring)."""
    exact = set(sample_ids)
    by_suffix: dict[str, list[str]] = {}
    for sid in sample_ids:
        parts = sid.split("/")
        for i in range(1, len(parts)):
            by_suffix.setdefault("/".join(parts[i:]), []).append(sid)
    matched: dict[str, str] = {}
    for key in keys:
        candidates = [key] if key in exact else by_suffix.get(key.removeprefix("./"), [])
        if len(candidates) > 1:
            raise MakdError(f"{path}: key {key!r} matches {len(candidates)} samples ({candidates[0]!r}, "
                            f"{candidates[1]!r}...): use keys with more of the path")
        if candidates:
            if candidates[0] in matched:
                raise MakdError(f"{path}: keys {matched[candidates[0]]!r} and {key!r} both name sample {candidates[0]!r}")
            matched[candidates[0]] = key
    return matched


class OfficialTargets:
    """A teacher that reads its answers from an official JSON file (so import reuses the store writer)."""

    name: ClassVar[str] = NAME
    inputs: ClassVar[frozenset[str]] = frozenset({"sample_ids"})

    def __init__(self, path: Path, data: dict[str, list[float]], key_of: dict[str, str]) -> None:
        self.path, self.data, self.key_of = path, data, key_of
        self.batch_size = 4096
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.path.name, "sha256": self.sha256,
                "conversion": f"logodds = logit(clip(p, {P_CLIP:g}, 1 - {P_CLIP:g})); mass unknown in this format, stored as 1",
                "key_matching": "exact sample id, else the unique sample id ending in '/' + key"}

    def score(self, images: Sequence[Image.Image], questions: QuestionSet, *,
              sample_ids: Sequence[str]) -> AspectScores:
        p = np.clip(np.array([self.data[self.key_of[sid]] for sid in sample_ids], dtype=np.float64).reshape(
            len(sample_ids), len(questions)), P_CLIP, 1.0 - P_CLIP)
        logodds = (np.log(p) - np.log1p(-p)).astype(np.float32)
        return AspectScores(logodds, np.ones_like(logodds))


def import_official(config: Any, path: str | Path, out: str | Path | None = None, *, overwrite: bool = False,
                    samples: Any = None) -> tuple[LabelStore, int, int]:
    """Build a label store from an official JSON for the samples of `config` it names (`samples(config)` makes them:
    by default the configured splits' images; box crops for detection). Returns (store, samples imported, keys that
    matched no sample)."""
    from makd.config import resolve_path
    from makd.labels.job import samples_to_label

    if not config.questions:
        raise MakdError("questions: the question set the file's columns follow is needed (questions=...)")
    out = out or config.labels.path
    if not out:
        raise MakdError("labels.path: where should the imported label store go? (or pass -o)")
    path = Path(path)
    questions = QuestionSet.load(resolve_path(config.questions))
    data = read_official(path, len(questions))
    samples = (samples or samples_to_label)(config)
    key_of = match_keys(list(data), samples.sample_ids, path)
    if not key_of:
        raise MakdError(f"{path}: none of its {len(data)} keys (e.g. {next(iter(data))!r}) names a sample of "
                        f"labels.splits {config.labels.splits} (e.g. {samples.sample_ids[0]!r})")
    keep = [i for i, sid in enumerate(samples.sample_ids) if sid in key_of]
    subset = samples.subset(keep)
    store = label_split(subset, OfficialTargets(path, data, key_of), questions, out,
                        shard_size=config.labels.shard_size, overwrite=overwrite, progress=False)
    return store, len(keep), len(data) - len(key_of)
