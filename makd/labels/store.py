"""A folder of Parquet shards (`sample_id`, `logodds[Q]`, `mass[Q]`, optionally `flags[Q]`) plus `labels.json`.

`flags` (uint8 per pair) is written only by teachers that return them (the openai teacher marks targets
bounded by the top-k); stores without the column read exactly as before.

Shard i always holds samples [i * shard_size, (i + 1) * shard_size) of the recorded sample order, and is
written under a temporary name then renamed, so a killed job resumes at the first missing shard, and
workers of a sharded job (rank r of n takes shards i with i % n == r) never collide.

Readers never parse the shards one by one: a complete store is consolidated once into `labels.arrow` (one
uncompressed Arrow IPC record batch, derived from the shards and rebuilt whenever they change), which is
memory-mapped. Loading ImageNet-scale targets is then a few milliseconds and no copy when the requested ids
are the store's own order, and the pages are shared by every process on the machine (DDP ranks, seeds).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import makd
from makd.atomic import atomic_path, read_json, write_json
from makd.errors import MakdError
from makd.questions import QuestionSet

META_FILE = "labels.json"
TABLE_FILE = "labels.arrow"  # consolidated, memory-mapped copy of the shards (derived; safe to delete)
FORMAT = "makd.labels/1"
log = logging.getLogger("makd.labels")
# Metadata that must match for a resumed job to continue an existing store.
IDENTITY_KEYS = ("format", "question_set_hash", "teacher", "num_samples", "sample_ids_hash", "shard_size")


def ids_hash(sample_ids: Sequence[str]) -> str:
    return "sha256:" + hashlib.sha256("\n".join(sample_ids).encode()).hexdigest()[:16]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def software_versions() -> dict[str, str]:
    import torch

    return {"makd": makd.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "pyarrow": pa.__version__, "numpy": np.__version__}


def shard_table(sample_ids: Sequence[str], logodds: np.ndarray, mass: np.ndarray,
                flags: np.ndarray | None = None) -> pa.Table:
    q = logodds.shape[1]

    def fixed(values: np.ndarray, dtype: type = np.float32) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values, dtype=dtype).ravel()), q)

    columns = {"sample_id": pa.array(list(sample_ids), pa.string()), "logodds": fixed(logodds), "mass": fixed(mass)}
    if flags is not None:
        columns["flags"] = fixed(flags, np.uint8)
    return pa.table(columns)


@dataclass
class Coverage:
    """What `LabelStore.check` found: the merge step of a sharded job."""

    num_samples: int
    num_shards: int
    missing: list[int]
    problems: list[str]  # unreadable shards, wrong row counts, duplicated ids, ids that differ from the sample list
    leftovers: int  # temporary files of writers that were killed (harmless; removed when their shard is redone)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.problems

    def report(self, world_size: int | None = None) -> str:
        lines = [f"{self.num_samples} samples in {self.num_shards} shards: "
                 f"{self.num_shards - len(self.missing)} present, {len(self.missing)} missing"]
        if self.missing:
            lines.append(f"missing shards: {_ranges(self.missing)}")
            if world_size:
                by_rank = {r: [i for i in self.missing if i % world_size == r] for r in range(world_size)}
                lines += [f"  rank {r}/{world_size}: {_ranges(m)}" for r, m in by_rank.items() if m]
        lines += self.problems
        if self.leftovers:
            lines.append(f"{self.leftovers} temporary file(s) of interrupted writers (removed when resumed)")
        if self.complete:
            lines.append("complete: every sample covered exactly once, in the recorded sample order")
        return "\n".join(lines)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)


@dataclass
class LabelStore:
    """Read side: metadata, completeness, and the join of sample ids to rows."""

    path: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> "LabelStore":
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise MakdError(f"{path} is not a label store (no {META_FILE}): run `makd label` first")
        meta = read_json(path / META_FILE, "label store metadata")
        if meta.get("format") != FORMAT:
            raise MakdError(f"{path / META_FILE}: unsupported format {meta.get('format')!r}, expected {FORMAT!r}")
        return cls(path, meta)

    @property
    def num_questions(self) -> int:
        return len(self.meta["questions"])

    @property
    def num_shards(self) -> int:
        return -(-self.meta["num_samples"] // self.meta["shard_size"])

    def _shard_files(self) -> dict[str, os.stat_result]:
        """Present shard files by name (one directory scan, not a lookup per shard)."""
        with os.scandir(self.path) as entries:
            return {e.name: e.stat() for e in entries if e.name.startswith("shard-") and e.is_file()}

    def missing_shards(self, present: dict[str, os.stat_result] | None = None) -> list[int]:
        present = self._shard_files() if present is None else present
        return [i for i in range(self.num_shards) if shard_name(i) not in present]

    def check(self) -> Coverage:
        """Every shard present, readable and of the right size; every sample id exactly once; the ids in the
        order of the sample list the job was started with (its hash is in the metadata)."""
        size, total = self.meta["shard_size"], self.meta["num_samples"]
        missing, problems, ids = [], [], []
        for i in range(self.num_shards):
            path = self.path / shard_name(i)
            if not path.is_file():
                missing.append(i)
                continue
            try:
                shard_ids = pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()
            except (OSError, pa.ArrowException) as exc:
                problems.append(f"{path.name}: unreadable ({str(exc).splitlines()[0]}): delete it and resume")
                continue
            expected = min(size, total - i * size)
            if len(shard_ids) != expected:
                problems.append(f"{path.name}: {len(shard_ids)} rows, expected {expected}")
            ids += shard_ids
        seen: set[str] = set()
        duplicated = sorted({sid for sid in ids if sid in seen or seen.add(sid)})
        if duplicated:
            problems.append(f"{len(duplicated)} sample id(s) appear more than once, e.g. {duplicated[0]!r}")
        if not missing and not problems and ids_hash(ids) != self.meta["sample_ids_hash"]:
            problems.append("the sample ids differ from the sample list the job was started with")
        leftovers = len(list(self.path.glob(".shard-*.tmp")))
        return Coverage(total, self.num_shards, missing, problems, leftovers)

    def check_questions(self, questions: QuestionSet, source: str = "the question set") -> None:
        if questions.hash != self.meta["question_set_hash"]:
            raise MakdError(
                f"label store {self.path} was made for question set {self.meta['question_set_hash']}, "
                f"but {source} has hash {questions.hash}: relabel, or use the question set it was made with")

    def _complete_shards(self, doing: str) -> list[os.stat_result]:
        """The stat of every shard, in order; an error naming the first missing one when the store is incomplete."""
        files = self._shard_files()
        missing = self.missing_shards(files)
        if missing:
            raise MakdError(f"label store {self.path} is incomplete: {len(missing)} of {self.num_shards} shards missing "
                            f"(first: {shard_name(missing[0])}); resume `makd label` before {doing}")
        return [files[shard_name(i)] for i in range(self.num_shards)]

    def _shards_key(self) -> str:
        """Identifies the shards' current files (every write is a rename: a new inode) and the store's identity."""
        parts = [str(self.meta.get(k)) for k in IDENTITY_KEYS]
        parts += [f"{i}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
                  for i, st in enumerate(self._complete_shards("reading it"))]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _mapped_table(self, key: str) -> pa.Table | None:
        """labels.arrow, memory-mapped, if it was built from the shards as they are now."""
        path = self.path / TABLE_FILE
        if not path.is_file():
            return None
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            if (reader.schema.metadata or {}).get(b"makd.shards") != key.encode() or reader.num_record_batches != 1:
                return None
            return pa.Table.from_batches([reader.get_batch(0)])
        except (OSError, pa.ArrowException):
            return None  # damaged: rebuilt from the shards

    def consolidate(self) -> pa.Table:
        """All rows in store order as one table, memory-mapped from labels.arrow (built when missing or stale).

        Called when `makd label` completes a store, and by every reader; a read-only store folder still works
        (the shards are then read into memory each time)."""
        key = self._shards_key()
        table = self._mapped_table(key)
        if table is not None:
            return table
        try:
            shards = pq.read_table([str(self.path / shard_name(i)) for i in range(self.num_shards)]).combine_chunks()
        except (OSError, pa.ArrowException) as exc:
            raise MakdError(f"label store {self.path}: a shard is unreadable ({str(exc).splitlines()[0]}); "
                            f"`makd labels check {self.path}` names it") from None
        if shards.num_rows != self.meta["num_samples"]:
            raise MakdError(f"label store {self.path}: {shards.num_rows} rows, metadata says {self.meta['num_samples']}")
        shards = shards.replace_schema_metadata({"makd.shards": key})
        try:
            with atomic_path(self.path / TABLE_FILE) as tmp:
                with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, shards.schema) as writer:
                    writer.write_table(shards, max_chunksize=max(1, shards.num_rows))
        except OSError as exc:
            log.warning("could not write %s (%s): reading the shards into memory instead",
                        self.path / TABLE_FILE, exc)
            return shards
        return self._mapped_table(key) or shards

    def _matrix(self, table: pa.Table, name: str) -> np.ndarray:
        """[N, Q] view of a fixed-size-list column (zero-copy for the single-chunk consolidated table)."""
        return _one_chunk(table.column(name)).flatten().to_numpy().reshape(-1, self.num_questions)

    def read(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """All rows in store order: (sample_ids, logodds [N, Q], mass [N, Q]); the arrays are read-only."""
        table = self.consolidate()
        return table.column("sample_id").to_pylist(), self._matrix(table, "logodds"), self._matrix(table, "mass")

    def read_flags(self) -> np.ndarray | None:
        """[N, Q] uint8 per-pair flags in store order, or None for a teacher that writes none (see its metadata)."""
        table = self.consolidate()
        return self._matrix(table, "flags") if "flags" in table.column_names else None

    def subset(self, questions: QuestionSet, out: str | Path) -> "LabelStore":
        """A store for some of this store's questions, without running a teacher again: teachers answer every
        question on its own, so choosing Q of a labelled pool needs only its columns."""
        index = {q["id"]: (j, q["text"]) for j, q in enumerate(self.meta["questions"])}
        columns = []
        for q in questions.questions:
            if index.get(q.id, (None, None))[1] != q.text:
                raise MakdError(f"question {q.id} ({q.text!r}) is not in label store {self.path}")
            columns.append(index[q.id][0])
        if list(questions.classes) != self.meta["classes"]:
            raise MakdError(f"the question set's classes differ from those of label store {self.path}")
        self._complete_shards("taking a subset")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / META_FILE, {**self.meta, "question_set_hash": questions.hash,
                                     "questions": [{"id": q.id, "text": q.text} for q in questions.questions],
                                     "derived_from": {"path": str(self.path),
                                                      "question_set_hash": self.meta["question_set_hash"]}})
        take = np.asarray(columns)
        for i in range(self.num_shards):
            table = pq.read_table(self.path / shard_name(i))
            matrices = {name: self._matrix(table, name)[:, take] for name in ("logodds", "mass", "flags")
                        if name in table.column_names}
            subset = shard_table(table.column("sample_id").to_pylist(), matrices["logodds"], matrices["mass"],
                                 matrices.get("flags"))
            with atomic_path(out / shard_name(i)) as tmp:
                pq.write_table(subset, tmp)
        store = LabelStore.open(out)
        store.consolidate()
        return store

    def _rows(self, sample_ids: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """(row of each id or -1 — None when the ids are exactly the store's order —, logodds, mass).

        The join is by sample id, never by position; it runs in Arrow, and is skipped (no copy at all) after a
        vectorised check that the requested ids are the stored ones in the same order, the common case of
        training on the split that was labelled."""
        table = self.consolidate()
        stored = _one_chunk(table.column("sample_id"))
        requested = pa.array(sample_ids, pa.string())
        logodds, mass = self._matrix(table, "logodds"), self._matrix(table, "mass")
        if requested.equals(stored):
            return None, logodds, mass
        rows = pc.index_in(requested, value_set=stored).fill_null(-1).to_numpy(zero_copy_only=False)
        return rows.astype(np.int64, copy=False), logodds, mass

    def lookup(self, sample_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(logodds, mass) rows for `sample_ids`, in that order; every id must have a row.

        The arrays are read-only (memory-mapped views when `sample_ids` is the store's order)."""
        rows, logodds, mass = self._rows(sample_ids)
        if rows is None:
            return logodds, mass
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            raise MakdError(f"sample {sample_ids[missing[0]]!r} has no row in label store {self.path} "
                            f"({len(missing)} of {len(sample_ids)} samples missing; label them with `makd label`)")
        return _read_only(logodds[rows]), _read_only(mass[rows])

    def available(self, sample_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions in `sample_ids` that have a row, their logodds, their mass)."""
        rows, logodds, mass = self._rows(sample_ids)
        if rows is None:
            return np.arange(len(sample_ids)), logodds, mass
        positions = np.flatnonzero(rows >= 0)
        return positions, _read_only(logodds[rows[positions]]), _read_only(mass[rows[positions]])


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array; without a copy when it already is one (combine_chunks always copies)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _read_only(array: np.ndarray) -> np.ndarray:
    """One contract whichever path the join took: callers must not write into targets."""
    array.flags.writeable = False
    return array
