"""A folder of Parquet shards (`sample_id`, `logodds[Q]`, `mass[Q]`, optionally `flags[Q]`) plus `labels.json`.

`flags` (uint8 per pair) is written only by teachers that return them (the openai teacher marks targets
bounded by the top-k); stores without the column read exactly as before.

Shard i always holds samples [i * shard_size, (i + 1) * shard_size) of the recorded sample order, and is
written under a temporary name then renamed, so a killed job resumes at the first missing shard, and the
workers of a job, which claim shards with leases (`makd.labels.leases`), never leave half a shard.

A sample whose image could not be read has no row: its shard records it in its Parquet metadata
(`makd.skipped`: a JSON list of [position in the sample order, sample id, one-line reason]), written in the
same atomic rename as the rows, so the shard is still complete and the store can be finished; `labels check`
lists such samples, and a reader that asks for one is told why it has no row. Shards without the key (every
store written before) have no skipped samples.

Readers never parse the shards one by one: a complete store is consolidated once into `labels.arrow` (one
uncompressed Arrow IPC record batch, derived from the shards and rebuilt whenever they change), which is
memory-mapped. Loading ImageNet-scale targets is then a few milliseconds and no copy when the requested ids
are the store's own order, and the pages are shared by every process on the machine (DDP ranks, seeds).

Nothing reaches a reader unchecked (`LabelStore.validate_rows`, the one validation): every shard is checked
when `labels.arrow` is built from it — row count, width = Q of labels.json, no missing values, finite log-odds,
mass in [0, 1], one row per sample id, the recorded sample order — and the table records that it was
(`makd.validated`), so a read of the mapped table only checks its layout, O(columns). `makd label` checks each
shard before writing it, and `makd labels check` lists every problem the same function finds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pydantic

import makd
from makd.atomic import atomic_path, read_json, stale_temporaries, write_json
from makd.effects import EXECUTION, RESULTS, marked
from makd.errors import MakdError, first_line
from makd.questions import QuestionSet
from makd.questions.questionset import content_hash

META_FILE = "labels.json"
TABLE_FILE = "labels.arrow"  # consolidated, memory-mapped copy of the shards (derived; safe to delete)
FORMAT = "makd.labels/1"
log = logging.getLogger("makd.labels")


class StoreMetadata(pydantic.BaseModel):
    """The keys of labels.json (makd/labels/job.py writes them), each marked once (makd/effects.py): the RESULTS
    keys are the store's identity — a resumed job must match them, and labels.arrow is rebuilt when they change;
    the EXECUTION keys describe the run that wrote it."""

    format: str = pydantic.Field(json_schema_extra=RESULTS)
    question_set_hash: str = pydantic.Field(json_schema_extra=RESULTS)
    questions: list[dict[str, Any]] = pydantic.Field(json_schema_extra=RESULTS)  # ids and texts: in the hash too
    classes: list[str] = pydantic.Field(json_schema_extra=RESULTS)
    teacher: dict[str, Any] = pydantic.Field(json_schema_extra=RESULTS)  # provenance: only options marked RESULTS
    num_samples: int = pydantic.Field(json_schema_extra=RESULTS)
    sample_ids_hash: str = pydantic.Field(json_schema_extra=RESULTS)
    shard_size: int = pydantic.Field(json_schema_extra=RESULTS)  # the shards' layout
    dataset: dict[str, Any] = pydantic.Field(json_schema_extra=EXECUTION)  # where the samples were read from
    software: dict[str, str] = pydantic.Field(json_schema_extra=EXECUTION)
    created: str = pydantic.Field(json_schema_extra=EXECUTION)


# Metadata that must match for a resumed job to continue an existing store.
IDENTITY_KEYS = tuple(name for name in StoreMetadata.model_fields if name in marked(StoreMetadata, "results"))
REQUIRED_KEYS = ("question_set_hash", "questions", "classes", "num_samples", "sample_ids_hash", "shard_size")
# What `validate_rows` checks, recorded in labels.arrow; a new value makes older tables stale (rebuilt, validated).
VALIDATION = "2"  # 2: skipped samples (a shard's rows plus its skipped samples make its share of the sample order)
SKIPPED_KEY = b"makd.skipped"  # Parquet/Arrow schema metadata: [[position, sample id, reason], ...]
MAX_LISTED = 20  # problems `labels check` prints one by one
# P(yes) + P(no) summed in float32 (or from a server's rounded logprobs) can exceed 1 by a few ulps: not an error.
MASS_ROUNDING = 1e-3


def ids_hash(sample_ids: Sequence[str]) -> str:
    return "sha256:" + hashlib.sha256("\n".join(sample_ids).encode()).hexdigest()[:16]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def software_versions() -> dict[str, str]:
    return {"makd": makd.__version__, "python": platform.python_version(), "torch": _torch_version(),
            "pyarrow": pa.__version__, "numpy": np.__version__}


def _torch_version() -> str:
    """torch.__version__ (with its build tag, e.g. +cu130) without importing torch when it is not loaded: that takes
    seconds, and a worker of a server-side teacher never needs it."""
    if "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return "not installed"
    try:
        text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text(encoding="utf-8")
        return re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)[1]
    except (OSError, TypeError):
        return importlib.metadata.version("torch")


@dataclass(frozen=True)
class Skipped:
    """A sample without a row: its image could not be read when it was labelled."""

    position: int  # in the store's sample order
    sample_id: str
    reason: str


def skipped_of(table: pa.Table | pa.Schema) -> list[Skipped]:
    """The skipped samples a shard (or the consolidated table) records; ValueError when the record is damaged."""
    schema = table if isinstance(table, pa.Schema) else table.schema
    raw = (schema.metadata or {}).get(SKIPPED_KEY)
    if raw is None:
        return []
    try:
        return [Skipped(int(position), str(sid), str(reason)) for position, sid, reason in json.loads(raw)]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"its record of skipped samples is damaged ({exc})") from None


def with_skipped(table: pa.Table, skipped: Sequence[Skipped]) -> pa.Table:
    """`table` recording `skipped` in its schema metadata (kept by Parquet and Arrow IPC files)."""
    metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k != SKIPPED_KEY}
    if skipped:
        metadata[SKIPPED_KEY] = json.dumps([[s.position, s.sample_id, s.reason] for s in skipped]).encode()
    return table.replace_schema_metadata(metadata or None)


def shard_table(sample_ids: Sequence[str], logodds: np.ndarray, mass: np.ndarray,
                flags: np.ndarray | None = None, skipped: Sequence[Skipped] = ()) -> pa.Table:
    q = logodds.shape[1]

    def fixed(values: np.ndarray, dtype: type = np.float32) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values, dtype=dtype).ravel()), q)

    columns = {"sample_id": pa.array(list(sample_ids), pa.string()), "logodds": fixed(logodds), "mass": fixed(mass)}
    if flags is not None:
        columns["flags"] = fixed(flags, np.uint8)
    return with_skipped(pa.table(columns), skipped)


@dataclass
class Coverage:
    """What `LabelStore.check` found: the merge step of a sharded job."""

    num_samples: int
    num_shards: int
    missing: list[int]
    problems: list[str]  # everything `LabelStore.validate_rows` finds, and unreadable shards
    leftovers: int  # temporary files of writers that were killed (harmless; removed when a writer starts here)
    sample_ids: pa.Array  # the ids of the rows present and readable (to check a config's samples against)
    skipped: list[Skipped] = field(default_factory=list)  # samples of the present shards whose image did not load

    @property
    def complete(self) -> bool:
        return not self.missing and not self.problems

    def report(self, world_size: int | None = None) -> str:
        lines = [f"{self.num_samples} samples in {self.num_shards} shards: "
                 f"{self.num_shards - len(self.missing)} present, {len(self.missing)} missing"]
        if self.missing:
            lines.append(f"missing shards: {index_ranges(self.missing)}")
            if world_size:
                by_rank = {r: [i for i in self.missing if i % world_size == r] for r in range(world_size)}
                lines += [f"  rank {r}/{world_size}: {index_ranges(m)}" for r, m in by_rank.items() if m]
        lines += self.problems[:MAX_LISTED]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"... and {len(self.problems) - MAX_LISTED} more problems")
        if self.problems:
            lines.append("delete the shards named and resume `makd label` to relabel them")
        if self.leftovers:
            lines.append(f"{self.leftovers} temporary file(s) of interrupted writers (removed when a writer starts here)")
        if self.skipped:
            lines += skipped_lines(self.skipped, self.num_samples)
        if self.complete:
            lines.append("complete: every sample covered exactly once, in the recorded sample order"
                         + (" (skipped ones by their record)" if self.skipped else ""))
        return "\n".join(lines)


def skipped_lines(skipped: Sequence[Skipped], num_samples: int) -> list[str]:
    """What `labels check` says about samples whose image could not be read."""
    lines = [f"{len(skipped)} of {num_samples} samples skipped: their image could not be read, they have no row "
             "(repair them, then `makd label --retry-skipped` labels them)"]
    lines += [f"  {s.sample_id}: {s.reason}" for s in skipped[:MAX_LISTED]]
    if len(skipped) > MAX_LISTED:
        lines.append(f"  ... and {len(skipped) - MAX_LISTED} more")
    return lines


def index_ranges(indices: list[int]) -> str:
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
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise MakdError(f"{path / META_FILE}: unsupported format {found!r}, expected {FORMAT!r}")
        absent = [key for key in REQUIRED_KEYS if key not in meta]
        if absent:
            raise MakdError(f"{path / META_FILE}: no {absent[0]!r}: damaged, or not written by makd")
        recorded = content_hash(meta["classes"], ((q["id"], q["text"]) for q in meta["questions"]))
        if recorded != meta["question_set_hash"]:
            raise MakdError(f"{path / META_FILE}: its questions and classes hash to {recorded}, but it records "
                            f"question set {meta['question_set_hash']} (edited by hand?): restore it, or relabel")
        return cls(path, meta)

    @property
    def num_questions(self) -> int:
        return len(self.meta["questions"])

    @property
    def num_shards(self) -> int:
        return -(-self.meta["num_samples"] // self.meta["shard_size"])

    def shard_files(self) -> dict[str, os.stat_result]:
        """Present shard files by name (one directory scan, not a lookup per shard)."""
        with os.scandir(self.path) as entries:
            return {e.name: e.stat() for e in entries if e.name.startswith("shard-") and e.is_file()}

    def missing_shards(self, present: dict[str, os.stat_result] | None = None) -> list[int]:
        present = self.shard_files() if present is None else present
        return [i for i in range(self.num_shards) if shard_name(i) not in present]

    def check(self) -> Coverage:
        """The merge step of a sharded job, and a full check of what is there: missing shards, then every problem
        `validate_rows` finds in the present ones (a complete store whose table was validated when built is
        not read again)."""
        files = self.shard_files()
        missing = self.missing_shards(files)
        table = None if missing else self._mapped_table(self._shards_key(files))
        problems: list[str] = []
        if table is None:
            absent = set(missing)
            shards, problems = self._read_shards(i for i in range(self.num_shards) if i not in absent)
            table, found = self.validate_rows(shards)
            problems += found
        ids = table.column("sample_id").combine_chunks() if table is not None else pa.array([], pa.string())
        skipped = skipped_of(table) if table is not None else []
        return Coverage(self.meta["num_samples"], self.num_shards, missing, problems,
                        len(stale_temporaries(self.path)), ids, skipped)

    def _read_shards(self, indices: Iterable[int]) -> tuple[list[tuple[int, pa.Table]], list[str]]:
        """(index, table) of each shard that reads, and a problem for each one that does not."""
        shards, problems = [], []
        for i in indices:
            try:
                with pq.ParquetFile(self.path / shard_name(i)) as file:
                    shards.append((i, file.read()))
            except (OSError, pa.ArrowException) as exc:
                problems.append(f"{shard_name(i)}: unreadable ({first_line(exc)})")
        return shards, problems

    def validate_rows(self, shards: Sequence[tuple[int, pa.Table]]) -> tuple[pa.Table | None, list[str]]:
        """The one validation of label rows: (the rows of the shards that pass the layout checks, as one table in
        store order; every problem). Each problem is one line naming the shard file and, for values, the first
        bad (sample id, question id).

        Per shard: the row count its position implies (less the samples it records as skipped, which must lie in
        its share); the types (a shard another tool wrote with large strings or lists of doubles is read in the
        store's types, or the first row whose list does not hold Q values is named); the columns and their width,
        which must be Q of labels.json (a narrower shard would otherwise be reshaped into targets shifted across
        samples); no missing values. Over all rows, vectorised: finite log-odds, mass in [0, 1], one row per sample
        id; for a complete store, the sample order the job was started with (skipped samples at their positions).
        The returned table records the skipped samples in its metadata."""
        problems, good, skipped, passed = [], [], [], 0
        for index, table in shards:
            try:
                skips = self._skipped_in(index, table)
                table, problem = self._as_store_types(shard_name(index), table)
                problem = problem or self._layout_problem(shard_name(index), table,
                                                          self._expected_rows(index) - len(skips))
            except ValueError as exc:
                skips, problem = [], f"{shard_name(index)}: {exc}"
            if problem is None and good and table.num_rows and table.column_names != good[0][1].column_names:
                problem = (f"{shard_name(index)}: columns {table.column_names} differ from "
                           f"{shard_name(good[0][0])}'s {good[0][1].column_names}")
            if problem is None:
                passed += 1
                skipped += skips
                if table.num_rows:  # a shard whose every sample was skipped adds no rows (nor flags column)
                    good.append((index, table.replace_schema_metadata()))
            else:
                problems.append(problem)
        if not good:
            if passed == self.num_shards and not problems:
                problems.append("no sample has a row: every one was skipped as unreadable (`makd labels check`)")
            return None, problems
        table = pa.concat_tables([t for _, t in good]).combine_chunks()
        starts = np.cumsum([0] + [t.num_rows for _, t in good])[:-1]

        def shard_of_row(row: int) -> str:
            return shard_name(good[int(np.searchsorted(starts, row, side="right")) - 1][0])

        problems += self._value_problems(table, shard_of_row)
        ids = table.column("sample_id").to_pylist()
        if len(set(ids)) != len(ids):
            problems.append(_duplicates(ids, shard_of_row))
        elif (passed == self.num_shards and not problems
              and ids_hash(_in_sample_order(ids, skipped)) != self.meta["sample_ids_hash"]):
            problems.append("the sample ids differ from the sample list the job was started with")
        return with_skipped(table, skipped), problems

    def _skipped_in(self, index: int, table: pa.Table) -> list[Skipped]:
        """Shard `index`'s skipped samples, checked to lie in its share of the sample order (ValueError if not)."""
        skips = skipped_of(table)
        first = index * self.meta["shard_size"]
        share = range(first, first + self._expected_rows(index))
        positions = [s.position for s in skips]
        outside = [p for p in positions if p not in share]
        if outside or len(set(positions)) != len(positions):
            raise ValueError(f"its record of skipped samples names position {(outside or positions)[0]}, "
                             f"outside its samples {share.start}-{share.stop - 1} or twice")
        return sorted(skips, key=lambda s: s.position)

    def _expected_rows(self, index: int) -> int:
        return min(self.meta["shard_size"], self.meta["num_samples"] - index * self.meta["shard_size"])

    def _as_store_types(self, name: str, table: pa.Table) -> tuple[pa.Table, str | None]:
        """A shard written by another tool (pandas, DuckDB, Spark) holds the same values in wider types: large
        strings, variable-length lists of doubles. Read it in the store's types, or name the first row whose list
        does not hold one value per question."""
        q, questions = self.num_questions, self.meta["questions"]
        for column, value_type in (("sample_id", None), ("logodds", pa.float32()), ("mass", pa.float32()),
                                   ("flags", pa.uint8())):
            if column not in table.column_names:
                continue
            values = table.column(column)
            kind = values.type
            if value_type is None:
                if pa.types.is_large_string(kind):
                    table = table.set_column(table.column_names.index(column), column, values.cast(pa.string()))
                continue
            if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not (
                    pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
                continue
            lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
            wrong = np.flatnonzero((lengths != q) & ~np.isnan(lengths.astype(np.float64)))
            if len(wrong):
                row, count = int(wrong[0]), int(lengths[wrong[0]])
                sid = table.column("sample_id")[row].as_py() if "sample_id" in table.column_names else row
                detail = (f"{count - q} value(s) after the last question {questions[-1]['id']}" if count > q
                          else f"no value for question {questions[count]['id']}")
                return table, (f"{name}: sample {sid!r} has {count} {column} values, but labels.json lists {q} "
                               f"questions ({detail}; {len(wrong)} such row(s))")
            try:
                cast = values.cast(pa.list_(value_type, q))
            except pa.ArrowInvalid as exc:  # e.g. flags outside 0-255
                return table, f"{name}: column {column} does not fit {pa.list_(value_type, q)} ({exc})"
            table = table.set_column(table.column_names.index(column), column, cast)
        return table, None

    def _layout_problem(self, name: str, table: pa.Table, rows: int) -> str | None:
        """Row count, columns, types, width and missing values of one shard (or the consolidated table): O(columns)."""
        if table.num_rows != rows:
            return f"{name}: {table.num_rows} rows, expected {rows}"
        q, ids = self.num_questions, self.meta["questions"]
        if "sample_id" not in table.column_names or table.column("sample_id").type != pa.string():
            return f"{name}: no sample_id column of strings"
        sample_ids = table.column("sample_id")
        if sample_ids.null_count:
            return f"{name}: row {_first(pc.is_null(sample_ids))} has no sample id"
        columns = {"logodds": pa.float32(), "mass": pa.float32()}
        if "flags" in table.column_names:
            columns["flags"] = pa.uint8()
        for column, value_type in columns.items():
            kind = pa.list_(value_type, q)
            if column not in table.column_names:
                return f"{name}: no {column} column"
            found = table.column(column).type
            if pa.types.is_fixed_size_list(found) and found.value_type == value_type and found.list_size != q:
                first = sample_ids[0].as_py() if rows else None
                gap = (f"no value for question {ids[found.list_size]['id']}" if found.list_size < q
                       else f"{found.list_size - q} value(s) after the last question {ids[-1]['id']}")
                return (f"{name}: rows hold {found.list_size} {column} values but labels.json lists {q} questions "
                        f"(sample {first!r} has {gap}): the shard was written for another question set")
            if found != kind:
                return f"{name}: column {column} is {found}, expected {kind}"
            values = _one_chunk(table.column(column))
            if values.null_count:
                return f"{name}: sample {sample_ids[_first(pc.is_null(values))].as_py()!r} has no {column} values"
            flat = values.flatten()
            if flat.null_count:
                row, j = divmod(_first(pc.is_null(flat)), q)
                return f"{name}: sample {sample_ids[row].as_py()!r} has no {column} for question {ids[j]['id']}"
        return None

    def _value_problems(self, table: pa.Table, shard_of_row: Callable[[int], str]) -> list[str]:
        """The first non-finite log-odds and the first mass outside [0, 1], each as (shard, sample, question).

        The minimum and maximum decide (a NaN anywhere is both); the element-wise pass runs only to find a bad one."""
        problems = []
        logodds, mass = self._matrix(table, "logodds"), self._matrix(table, "mass")
        for values, fits, what in ((logodds, np.isfinite, "log-odds {} (they must be finite)"),
                                   (mass, lambda v: (v >= 0) & (v <= 1 + MASS_ROUNDING), "answer mass {}, outside [0, 1]")):
            if not values.size or fits(np.array([values.min(), values.max()])).all():
                continue
            flagged = ~fits(values)
            if flagged.any():
                row, j = divmod(int(np.argmax(flagged.ravel())), self.num_questions)
                problems.append(f"{shard_of_row(row)}: sample {table.column('sample_id')[row].as_py()!r}, question "
                                f"{self.meta['questions'][j]['id']}: " + what.format(values[row, j]))
        return problems

    def check_questions(self, questions: QuestionSet, source: str = "the question set") -> None:
        if questions.hash != self.meta["question_set_hash"]:
            raise MakdError(
                f"label store {self.path} was made for question set {self.meta['question_set_hash']}, "
                f"but {source} has hash {questions.hash}: relabel, or use the question set it was made with")

    def _complete_shards(self, doing: str) -> dict[str, os.stat_result]:
        """The present shard files; an error naming the first missing one when the store is incomplete."""
        files = self.shard_files()
        missing = self.missing_shards(files)
        if missing:
            raise MakdError(f"label store {self.path} is incomplete: {len(missing)} of {self.num_shards} shards missing "
                            f"(first: {shard_name(missing[0])}); resume `makd label` before {doing}")
        return files

    def _shards_key(self, files: dict[str, os.stat_result]) -> str:
        """Identifies the shards' current files (every write is a rename: a new inode), the store's identity and
        what validation they passed."""
        parts = [str(self.meta.get(k)) for k in IDENTITY_KEYS] + [f"validation {VALIDATION}"]
        stats = (files[shard_name(i)] for i in range(self.num_shards))
        parts += [f"{i}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}" for i, st in enumerate(stats)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _mapped_table(self, key: str) -> pa.Table | None:
        """labels.arrow, memory-mapped, if it was built and validated from the shards as they are now."""
        path = self.path / TABLE_FILE
        if not path.is_file():
            return None
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            metadata = reader.schema.metadata or {}
            if (metadata.get(b"makd.shards") != key.encode() or metadata.get(b"makd.validated") != VALIDATION.encode()
                    or reader.num_record_batches != 1):
                return None
            table = pa.Table.from_batches([reader.get_batch(0)], schema=reader.schema)
            rows = self.meta["num_samples"] - len(skipped_of(table))
        except (OSError, pa.ArrowException, ValueError):
            return None  # damaged: rebuilt from the shards
        if self._layout_problem(TABLE_FILE, table, rows) is not None:
            return None  # not what was validated: rebuilt (and validated) from the shards
        return table

    def consolidate(self) -> pa.Table:
        """All rows in store order as one validated table, memory-mapped from labels.arrow (built when missing
        or stale, after `validate_rows` found nothing; any problem is a one-line error naming the shard).

        Called when `makd label` completes a store, and by every reader; a read-only store folder still works
        (the shards are then read and validated into memory each time)."""
        key = self._shards_key(self._complete_shards("reading it"))
        table = self._mapped_table(key)
        if table is not None:
            return table
        shards, problems = self._read_shards(range(self.num_shards))
        table, found = self.validate_rows(shards)
        problems += found
        if problems:
            more = f"; {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
            raise MakdError(f"label store {self.path}: {problems[0]}{more}: delete the shards named and resume "
                            f"`makd label` to relabel them (`makd labels check {self.path}` lists every problem)")
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"makd.shards": key.encode(),
                                               b"makd.validated": VALIDATION.encode()})
        try:
            with atomic_path(self.path / TABLE_FILE) as tmp:
                with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table, max_chunksize=max(1, table.num_rows))
        except OSError as exc:
            log.warning("could not write %s (%s): reading the shards into memory instead", self.path / TABLE_FILE, exc)
            return table
        return self._mapped_table(key) or table

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
        table = self.consolidate()
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / META_FILE, {**self.meta, "question_set_hash": questions.hash,
                                     "questions": [{"id": q.id, "text": q.text} for q in questions.questions],
                                     "derived_from": {"path": str(self.path),
                                                      "question_set_hash": self.meta["question_set_hash"]}})
        take, size = np.asarray(columns), self.meta["shard_size"]
        store = LabelStore.open(out)
        skipped, start = skipped_of(table), 0
        for i in range(self.num_shards):
            skips = [s for s in skipped if s.position // size == i]
            part = table.slice(start, self._expected_rows(i) - len(skips))
            start += part.num_rows
            matrices = {name: self._matrix(part, name)[:, take] for name in ("logodds", "mass", "flags")
                        if name in part.column_names}
            store.write_shard(i, shard_table(part.column("sample_id").to_pylist(), matrices["logodds"],
                                             matrices["mass"], matrices.get("flags"), skips))
        store.consolidate()
        return store

    def write_shard(self, index: int, table: pa.Table, source: str = "rows") -> Path:
        """The one way a shard lands: validated as every reader would (`validate_rows`; a problem is a one-line
        MakdError saying what `source` gave, nothing written), then written under a temporary name and renamed."""
        problems = self.validate_rows([(index, table)])[1]
        if problems:
            raise MakdError(f"{source} a label store cannot hold (not written): {problems[0]}")
        path = self.path / shard_name(index)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def skipped(self) -> list[Skipped]:
        """The samples without a row because their image could not be read (complete store)."""
        return skipped_of(self.consolidate())

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
        self._require_rows(rows, sample_ids)
        return _read_only(logodds[rows]), _read_only(mass[rows])

    def lookup_flags(self, sample_ids: Sequence[str]) -> np.ndarray | None:
        """[len(sample_ids), Q] uint8 flags in that order (a writable copy), or None for a teacher that writes none."""
        table = self.consolidate()
        if "flags" not in table.column_names:
            return None
        rows, flags = self._rows(sample_ids)[0], self._matrix(table, "flags")
        if rows is None:
            return np.array(flags)
        self._require_rows(rows, sample_ids)
        return flags[rows]

    def _require_rows(self, rows: np.ndarray, sample_ids: Sequence[str]) -> None:
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            raise MakdError(self._no_row_message([sample_ids[i] for i in missing], len(sample_ids)))

    def _no_row_message(self, missing: list[str], total: int) -> str:
        """Why samples have no row: skipped when labelled (which, and why), or never labelled."""
        skipped = {s.sample_id: s for s in self.skipped()}
        unreadable = [skipped[sid] for sid in missing if sid in skipped]
        if not unreadable:
            return (f"sample {missing[0]!r} has no row in label store {self.path} ({len(missing)} of {total} "
                    "samples missing; label them with `makd label`)")
        first = unreadable[0]
        others = f", {len(missing) - len(unreadable)} never labelled" if len(unreadable) < len(missing) else ""
        return (f"sample {first.sample_id!r} has no row in label store {self.path}: its image could not be read when "
                f"it was labelled ({first.reason}); {len(unreadable)} of {total} samples skipped so{others} "
                f"(`makd labels check {self.path}` lists them): repair the images and run `makd label --retry-skipped`, "
                "or leave them out of the data")

    def available(self, sample_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions in `sample_ids` that have a row, their logodds, their mass)."""
        rows, logodds, mass = self._rows(sample_ids)
        if rows is None:
            return np.arange(len(sample_ids)), logodds, mass
        positions = np.flatnonzero(rows >= 0)
        return positions, _read_only(logodds[rows[positions]]), _read_only(mass[rows[positions]])


def _in_sample_order(ids: list[str], skipped: Sequence[Skipped]) -> list[str]:
    """The rows' ids with the skipped samples put back at their positions: the sample order the job started with."""
    if not skipped:
        return ids
    merged, rows = [], iter(ids)
    for skip in sorted(skipped, key=lambda s: s.position):
        merged += [next(rows) for _ in range(skip.position - len(merged))]
        merged.append(skip.sample_id)
    return merged + list(rows)


def _first(mask: pa.ChunkedArray | pa.Array) -> int:
    """Index of the first true value of a boolean array."""
    return int(np.argmax(np.asarray(mask)))


def _duplicates(ids: list[str], shard_of_row: Callable[[int], str]) -> str:
    """How many ids have more than one row, and where the first one's two rows are."""
    first_row: dict[str, int] = {}
    example = None
    for row, sid in enumerate(ids):
        if sid in first_row and example is None:
            example = (sid, shard_of_row(first_row[sid]), shard_of_row(row))
        first_row.setdefault(sid, row)
    count = sum(1 for n in Counter(ids).values() if n > 1)
    return f"{count} sample id(s) appear more than once, e.g. {example[0]!r} in {example[1]} and {example[2]}"


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array; without a copy when it already is one (combine_chunks always copies)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _read_only(array: np.ndarray) -> np.ndarray:
    """One contract whichever path the join took: callers must not write into targets."""
    array.flags.writeable = False
    return array
