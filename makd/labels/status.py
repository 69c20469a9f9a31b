"""`makd labels status`: how far a label store is, across all its workers — shards done, leased (by whom, since
when) and left, the throughput over the recent shards and an estimate of the time left.

Everything comes from what the store already holds, without reading any shard: the shard files' times (each is
renamed into place when it is complete) and the lease files of the workers labelling now.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from makd.labels.leases import LEASE_DIR, Holder, LeaseBoard
from makd.labels.store import LabelStore, index_ranges, shard_name
from makd.labels.writer import shard_lease

RECENT_S = 900.0  # throughput over the shards written in the last 15 minutes
OTHER_LEASES = {"samples": "listing the images", "consolidate": "building labels.arrow"}


@dataclass
class StoreStatus:
    path: Path
    teacher: str
    num_questions: int
    num_samples: int
    shard_size: int
    done: list[int]
    leased: list[tuple[int, Holder]]  # shard and its lease
    left: list[int]  # neither written nor leased
    samples_done: int
    samples_per_s: float | None  # over the recent shards, all workers together
    recent: tuple[int, float]  # shards the throughput is measured over, and their time span (s)
    other_leases: list[Holder]  # e.g. a worker listing the images
    now: float

    @property
    def num_shards(self) -> int:
        return len(self.done) + len(self.leased) + len(self.left)

    @property
    def eta_s(self) -> float | None:
        if not self.samples_per_s:
            return None
        return (self.num_samples - self.samples_done) / self.samples_per_s

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "teacher": self.teacher, "questions": self.num_questions,
            "samples": self.num_samples, "samples_done": self.samples_done, "shards": self.num_shards,
            "shard_size": self.shard_size, "done": len(self.done), "left": len(self.left),
            "left_shards": self.left,
            "leased": [{"shard": i, "worker": h.worker, "host": h.hostname, "pid": h.pid, "started": h.started,
                        "heartbeat_age_s": round(self.now - h.heartbeat, 1), "expired": h.expired(self.now)}
                       for i, h in self.leased],
            "samples_per_s": self.samples_per_s, "eta_s": self.eta_s, "complete": not self.leased and not self.left,
        }


def store_status(path: str | Path, now: float | None = None, recent_s: float = RECENT_S) -> StoreStatus:
    store = LabelStore.open(path)
    now = time.time() if now is None else now
    files = store.shard_files()
    size, n = store.meta["shard_size"], store.meta["num_samples"]

    def rows(i: int) -> int:
        return min(size, n - i * size)

    done = [i for i in range(store.num_shards) if shard_name(i) in files]
    holders = LeaseBoard(store.path / LEASE_DIR).holders()
    by_name = {shard_lease(i): i for i in range(store.num_shards)}
    leased = sorted((by_name[name], h) for name, h in holders.items() if name in by_name and shard_name(by_name[name]) not in files)
    busy = {i for i, _ in leased}
    left = [i for i in range(store.num_shards) if shard_name(i) not in files and i not in busy]
    times = sorted((files[shard_name(i)].st_mtime, i) for i in done if now - files[shard_name(i)].st_mtime <= recent_s)
    rate, span = None, 0.0
    if len(times) >= 2 and times[-1][0] > times[0][0]:
        span = times[-1][0] - times[0][0]
        rate = sum(rows(i) for _, i in times[1:]) / span  # the first one's rows were scored before the span began
    return StoreStatus(store.path, store.meta["teacher"].get("name", "?"), store.num_questions, n, size, done, leased,
                       left, sum(rows(i) for i in done), rate, (len(times), span),
                       [h for name, h in holders.items() if name not in by_name], now)


def status_lines(status: StoreStatus) -> list[str]:
    """One screen: the totals, each lease, the throughput and the time left."""
    s = status
    pct = 100.0 * s.samples_done / s.num_samples
    lines = [f"label store {s.path} ({s.teacher}, {s.num_questions} questions): {s.num_samples:,} samples in "
             f"{s.num_shards:,} shards of {s.shard_size}",
             f"done    {len(s.done):>7,} shards  {s.samples_done:,} samples ({pct:.1f} %)",
             f"leased  {len(s.leased):>7,} shards" + (":" if s.leased else ""),
             *[f"  {shard_name(i)}  {_holder_line(h, s.now)}" for i, h in s.leased[:20]]]
    if len(s.leased) > 20:
        lines.append(f"  ... and {len(s.leased) - 20} more")
    lines.append(f"left    {len(s.left):>7,} shards" + (f" ({index_ranges(s.left)[:80]})" if s.left else ""))
    lines += [f"also: {OTHER_LEASES.get(h.name, h.name)}: {_holder_line(h, s.now)}" for h in s.other_leases]
    if not s.leased and not s.left:
        lines.append("complete: `makd labels check` validates every row")
    elif s.samples_per_s:
        count, span = s.recent
        eta = s.eta_s or 0.0
        finish = datetime.datetime.fromtimestamp(s.now + eta).astimezone().strftime("%Y-%m-%d %H:%M %Z")
        lines.append(f"throughput {s.samples_per_s:,.1f} samples/s (all workers, over the last {count} shards, "
                     f"{_duration(span)}); about {_duration(eta)} left (~{finish})")
    else:
        lines.append("throughput: fewer than 2 shards written in the last "
                     f"{_duration(RECENT_S)}: no estimate yet")
    return lines


def _holder_line(h: Holder, now: float) -> str:
    line = (f"{h.worker}, since {datetime.datetime.fromtimestamp(h.started).astimezone():%H:%M:%S} "
            f"({_duration(now - h.started)}), heartbeat {_duration(now - h.heartbeat)} ago")
    if h.attempt:
        line += f", attempt {h.attempt + 1}"
    if h.expired(now):
        line += " — expired: the next worker to look takes it over"
    return line


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
