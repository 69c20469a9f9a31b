"""`LabelWriter`: the one way answers land in a label store — for `makd label` and for any other backend (vLLM's
offline `LLM.chat`, a hosted batch API, targets computed elsewhere).

    writer = LabelWriter.open("labels/pets", questions, teacher={"name": "vllm-offline", "model": ...},
                              sample_ids=ids, shard_size=512)
    for index in writer.claim_shards():                  # resumable; several workers may share the store
        ids = writer.shard_ids(index)                    # the samples of this shard, in store order
        ...                                              # answer them (skip the ones whose image is unreadable)
        writer.write_shard(index, done_ids, logodds, mass, flags=flags, skipped={sid: "reason", ...})
    store = writer.finish()                              # consolidated once every shard is there

`open` starts a store, or resumes the one at the path when it was started for the same question set, teacher
provenance and sample list; anything else is a one-line error naming what differs and the fix. `write_shard`
checks the rows (their ids are the shard's samples in order, less the skipped ones; shapes; every value a
reader would accept) before anything is written, then writes the shard atomically. `claim_shards` hands out the
missing shards through leases (`makd.labels.leases`), so workers started at once never score a shard twice and a
dead worker's shard is taken over by a live one.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from makd.atomic import read_json, remove_stale_temporaries, write_json
from makd.errors import MakdError
from makd.labels.leases import DEFAULT_TIMEOUT_S, LEASE_DIR, Lease, LeaseBoard, claim_each, worker_label
from makd.labels.listing import LISTING_FILE, listed_ids, write_listing
from makd.labels.store import (
    FORMAT,
    IDENTITY_KEYS,
    META_FILE,
    TABLE_FILE,
    LabelStore,
    Skipped,
    ids_hash,
    shard_name,
    shard_table,
    skipped_of,
    software_versions,
)
from makd.questions import QuestionSet

log = logging.getLogger("makd.labels")


def shard_lease(index: int) -> str:
    return shard_name(index).removesuffix(".parquet")


class LabelWriter:
    """Writes one label store; see the module docstring."""

    def __init__(self, store: LabelStore, sample_ids: Sequence[str]) -> None:
        self.store = store
        self.sample_ids = list(sample_ids)
        self._leases: dict[int, Lease] = {}  # the shards this worker holds now (claim_shards)

    # -- opening --------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, questions: QuestionSet, teacher: Mapping[str, Any],
             sample_ids: Sequence[str], *, shard_size: int = 512, dataset: Mapping[str, Any] | None = None,
             overwrite: bool = False) -> LabelWriter:
        """Start the store at `path` for `questions` answered by `teacher` (its provenance: at least a "name";
        everything that decides its answers, e.g. model, revision, prompt) about `sample_ids` (unique, in the order
        the rows will have), or resume it. `overwrite` discards an existing store there."""
        if not isinstance(teacher.get("name"), str) or not teacher["name"]:
            raise MakdError("LabelWriter.open: teacher must be a provenance mapping with a 'name' (e.g. "
                            "{'name': 'vllm-offline', 'model': 'OpenGVLab/InternVL3-8B-hf', ...})")
        if shard_size < 1:
            raise MakdError(f"LabelWriter.open: shard_size must be at least 1, not {shard_size}")
        sample_ids = list(sample_ids)
        if not sample_ids:
            raise MakdError(f"label store {path}: there are no samples to label")
        if len(set(sample_ids)) != len(sample_ids):
            seen: set[str] = set()
            twice = next(sid for sid in sample_ids if sid in seen or seen.add(sid))
            raise MakdError(f"label store {path}: sample id {twice!r} occurs twice in the sample list")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "question_set_hash": questions.hash,
            "questions": [{"id": q.id, "text": q.text} for q in questions.questions],
            "classes": list(questions.classes),
            "teacher": dict(teacher),
            "dataset": dict(dataset or {}),
            "num_samples": len(sample_ids),
            "sample_ids_hash": ids_hash(sample_ids),
            "shard_size": shard_size,
            "software": software_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        _start_or_resume(out, meta, sample_ids, overwrite)
        return cls(LabelStore.open(out), sample_ids)

    # -- what is there to do ----------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return self.store.num_shards

    def missing_shards(self) -> list[int]:
        return self.store.missing_shards()

    def shard_rows(self, index: int) -> range:
        """The positions in the sample list of shard `index`'s samples."""
        if not 0 <= index < self.num_shards:
            raise MakdError(f"label store {self.store.path}: no shard {index} (it has {self.num_shards})")
        size = self.store.meta["shard_size"]
        return range(index * size, min((index + 1) * size, len(self.sample_ids)))

    def shard_ids(self, index: int) -> list[str]:
        rows = self.shard_rows(index)
        return self.sample_ids[rows.start:rows.stop]

    def claim_shards(self, *, rank: int | None = None, world_size: int | None = None,
                     lease_timeout: float = DEFAULT_TIMEOUT_S, retry_skipped: bool = False,
                     share_only: bool = False, wait: bool = True, hold: int = 1) -> Iterator[int | None]:
        """Each shard this worker should write, leased to it until it asks for the next one (with `hold` = 2, until
        the ask after: see `claim_each`; None then means "finish the shards you hold, then ask again").

        Missing shards (and with `retry_skipped`, those that skipped samples when this call started) are claimed
        in order; a worker with a launcher rank (torchrun, srun, `--shard r/n`) tries its static share first (shards
        i with i % n == r) — so n workers started at once never contend — then any other shard nobody holds.
        `share_only` keeps it to its share. When the shards left are all leased by live workers, it waits (with
        `wait`) until they are written or a lease expires, which it then takes over: a dead worker's shards are
        finished by the live ones, and every worker returns when the store is complete."""
        board = LeaseBoard(self.store.path / LEASE_DIR, worker_label(rank, world_size), lease_timeout)
        board.remove_leftovers()
        world = world_size or 1
        mine = (lambda i: i % world == rank) if rank is not None and world > 1 else (lambda i: True)
        redo = self._shards_with_skips() if retry_skipped else {}

        def todo() -> list[int]:
            files = self.store.shard_files()
            order = [i for i in range(self.num_shards)
                     if shard_name(i) not in files or redo.get(i) == _identity(files.get(shard_name(i)))]
            own = [i for i in order if mine(i)]
            return own if share_only else own + [i for i in order if not mine(i)]

        shards = claim_each(board, todo, shard_lease, wait=wait, poll_s=min(5.0, lease_timeout / 4), hold=hold)
        try:
            for claimed in shards:
                if claimed is None:
                    yield None
                    continue
                index, lease = claimed
                self._leases[index] = lease
                while len(self._leases) > hold:  # the oldest: released by now, or at the next ask
                    del self._leases[next(iter(self._leases))]
                yield index
        finally:
            shards.close()
            self._leases.clear()

    def _shards_with_skips(self) -> dict[int, tuple[int, int, int]]:
        """Shards whose record names skipped samples, with the identity of their file now (to redo each once)."""
        files = self.store.shard_files()
        found = {}
        for i in range(self.num_shards):
            stat = files.get(shard_name(i))
            if stat is not None and skipped_of(pq.read_schema(self.store.path / shard_name(i))):
                found[i] = _identity(stat)
        return found

    # -- writing ------------------------------------------------------------------------------------------------
    def write_shard(self, index: int, sample_ids: Sequence[str], logodds: np.ndarray, mass: np.ndarray,
                    flags: np.ndarray | None = None, skipped: Mapping[str, str] | None = None) -> Path:
        """Write shard `index`: rows for `sample_ids` — the shard's samples (`shard_ids(index)`) in order, less those
        in `skipped` (sample id -> one-line reason their input could not be read) — with log-odds and mass
        [rows, Q] (float32) and optional uint8 flags [rows, Q]. Checked before anything is written."""
        expected, skipped = self.shard_ids(index), dict(skipped or {})
        where = f"label store {self.store.path}, {shard_name(index)}"
        unknown = [sid for sid in skipped if sid not in set(expected)]
        if unknown:
            raise MakdError(f"{where}: skipped sample {unknown[0]!r} is not one of this shard's samples")
        wanted = [sid for sid in expected if sid not in skipped]
        sample_ids = list(sample_ids)
        if sample_ids != wanted:
            at = next((k for k, (a, b) in enumerate(zip(sample_ids, wanted)) if a != b), min(len(sample_ids), len(wanted)))
            got = repr(sample_ids[at]) if at < len(sample_ids) else "nothing"
            need = repr(wanted[at]) if at < len(wanted) else "nothing"
            raise MakdError(f"{where}: row {at} is for {got}, expected {need} ({len(sample_ids)} rows for "
                            f"{len(wanted)} samples): rows follow shard_ids({index}), without the skipped samples")
        q = self.store.num_questions
        arrays = {"logodds": logodds, "mass": mass, **({"flags": flags} if flags is not None else {})}
        for name, values in arrays.items():
            shape = np.shape(values)
            if shape != (len(wanted), q):
                raise MakdError(f"{where}: {name} has shape {shape}, expected ({len(wanted)}, {q}) = (rows, questions)")
        positions = {sid: self.shard_rows(index).start + k for k, sid in enumerate(expected)}
        skips = [Skipped(positions[sid], sid, " ".join(str(reason).split()) or "unreadable")
                 for sid, reason in sorted(skipped.items(), key=lambda item: positions[item[0]])]
        table = shard_table(sample_ids, np.asarray(logodds), np.asarray(mass),
                            None if flags is None else np.asarray(flags), skips)
        lease = self._leases.get(index)
        path = self.store.path / shard_name(index)
        if lease is not None and not lease.held() and path.exists():  # this worker was silent past its lease
            log.warning("%s: this worker's lease expired and the worker that took it over has written it: this "
                        "copy is dropped", path.name)
            return path
        return self.store.write_shard(index, table, source=f"teacher {self.store.meta['teacher']['name']} returned targets")

    def finish(self, lease_timeout: float = DEFAULT_TIMEOUT_S) -> LabelStore:
        """Consolidate the store once every shard is there: one worker does it, the others wait for it (reading the
        store before would make each of them consolidate it again)."""
        if self.store.missing_shards():
            return self.store
        board = LeaseBoard(self.store.path / LEASE_DIR, timeout=lease_timeout)
        lease = board.try_claim("consolidate")
        if lease is None:
            board.wait_released("consolidate")
        else:
            with lease:
                self.store.consolidate()
            with contextlib.suppress(OSError):  # not empty: another worker's lease (listing a rerun's images)
                board.folder.rmdir()
        return self.store


def _identity(stat: os.stat_result | None) -> tuple[int, int, int] | None:
    """A shard file's identity: every write is a rename, so a rewritten shard has a new inode or time."""
    return None if stat is None else (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _start_or_resume(out: Path, meta: dict[str, Any], sample_ids: list[str], overwrite: bool) -> None:
    meta_path = out / META_FILE
    if meta_path.is_file() and not overwrite:
        old = read_json(meta_path, "label store metadata")
        for key in IDENTITY_KEYS:
            if old.get(key) != meta[key]:
                raise MakdError(f"label store {out} was started with {_difference(key, old, meta, out, sample_ids)}: "
                                f"{_fix(key)}")
        if not (out / LISTING_FILE).is_file():  # a store of an older makd: record its sample list now
            write_listing(out, sample_ids)
        remove_stale_temporaries(out)
        return
    if overwrite:
        busy = [h for h in LeaseBoard(out / LEASE_DIR).holders().values() if not h.expired()]
        if busy:
            raise MakdError(f"label store {out}: worker {busy[0].worker} is writing {busy[0].name} (and {len(busy) - 1} "
                            "other lease(s)): --overwrite would discard their work; stop them first")
        for stale in [*out.glob("shard-*.parquet"), out / TABLE_FILE]:
            stale.unlink(missing_ok=True)
    remove_stale_temporaries(out)
    if listed_ids(out) != sample_ids:
        write_listing(out, sample_ids)
    write_json(meta_path, meta)


def _difference(key: str, old: dict[str, Any], new: dict[str, Any], out: Path, sample_ids: list[str]) -> str:
    """What differs between the store's identity and this job's, in a few words."""
    if key == "teacher" and isinstance(old.get(key), dict):
        changed = _changed_keys(old[key], new[key])
        first = changed[0]
        return (f"another teacher: {len(changed)} setting(s) differ, first teacher.{first} "
                f"({_short(_dig(old[key], first))} in the store, {_short(_dig(new[key], first))} now)")
    if key in ("num_samples", "sample_ids_hash"):
        recorded = listed_ids(out)
        if recorded is not None and ids_hash(recorded) == old.get("sample_ids_hash"):
            at = next((i for i, (a, b) in enumerate(zip(recorded, sample_ids)) if a != b), min(len(recorded), len(sample_ids)))
            was = repr(recorded[at]) if at < len(recorded) else "no sample"
            now = repr(sample_ids[at]) if at < len(sample_ids) else "no sample"
            return (f"another sample list: {old.get('num_samples')} samples there, {len(sample_ids)} now; "
                    f"sample {at} is {was} there, {now} now")
        return (f"another sample list: {old.get('num_samples')} samples ({old.get('sample_ids_hash')}) there, "
                f"{new['num_samples']} ({new['sample_ids_hash']}) now")
    return f"a different {key} ({_short(old.get(key))} there, {_short(new[key])} now)"


def _fix(key: str) -> str:
    what = {"teacher": "teacher settings", "num_samples": "data and labels.splits/max_per_class",
            "sample_ids_hash": "data and labels.splits/max_per_class", "question_set_hash": "question set",
            "shard_size": "labels.shard_size"}.get(key, key)
    return (f"label into another folder (labels.path=...), or --overwrite to discard it, or resume with the {what} "
            "it was made with")


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if old != new else []


def _dig(value: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

