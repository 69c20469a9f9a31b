"""Leases: which worker is doing what in a folder that several workers share, on a shared file system, without locks.

The workers of one `makd label` job (torchrun ranks, srun tasks, a Slurm array, processes started by hand on
several hosts) write one label store. Each shard is *claimed*: the worker that holds its lease scores it, and a
lease whose worker died is taken over by any live worker, so no shard waits for a rerun.

A lease is a file `<folder>/<name>.<attempt>.lease` holding its worker's host, process id, label, start time and
heartbeat (JSON). It is written complete under a temporary name and hard-linked to its final name: link() fails
when the name exists, atomically on local file systems and on NFS (where flock/fcntl locks are not dependable),
so exactly one worker gets each attempt. Where hard links are not supported (gcsfuse, s3fs, SMB mounts), the final
name is created with O_EXCL instead and the lease written into it. The holder renews the heartbeat every timeout/4
from a background thread (rewrite + rename of its own attempt's file) and removes the file when the work is written.

A lease is expired when its heartbeat is older than its timeout by the reader's clock (hosts' clocks must agree to
well within the timeout, as NTP keeps them), or at once when its holder ran on this host and that process is gone.
Any worker may then take attempt + 1: as only one link of `<name>.<attempt + 1>.lease` succeeds, two workers that
reclaim the same lease cannot both get it. The highest attempt is the lease; the one who takes over removes the
lower ones, so a worker that listed the folder before a takeover may find a lower attempt free again: it lists
the folder again after linking, and gives its claim up if a higher attempt is there. A holder that was superseded
(paused past its timeout) sees it at its next heartbeat (`Lease.lost`).

Leases only avoid duplicate work; they are not what keeps a store correct: every shard is written whole under a
temporary name and renamed, so two workers that did score the same shard leave one complete copy of it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from makd.atomic import HOST, new_temporary_file, process_running, remove_stale_temporaries
from makd.errors import OutputError, os_error_message

log = logging.getLogger("makd.labels")
LEASE_DIR = "leases"  # a label store's lease files: one per shard being scored, and the image listing's
SUFFIX = ".lease"
LEASE_FILE = re.compile(r"^(?P<name>[^.].*)\.(?P<attempt>\d+)\.lease$")
DEFAULT_TIMEOUT_S = 300.0
# link() errors of file systems without hard links (FUSE and object-store mounts, SMB): claims use O_EXCL there
NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})
RESCANS = 5  # listings of a folder whose lease files keep vanishing while read, before the vanished count as free
Item = TypeVar("Item")


def worker_label(rank: int | None = None, world_size: int | None = None) -> str:
    """How a worker names itself in its leases: host and process, and its launcher rank when it has one."""
    label = f"{socket.gethostname()}:{os.getpid()}"
    if rank is not None and world_size and world_size > 1:
        label += f" rank {rank}/{world_size}"
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is not None:
        label += f" slurm {os.environ.get('SLURM_ARRAY_JOB_ID', '?')}_{task}"
    return label


@dataclass(frozen=True)
class Holder:
    """What a lease file says: who holds `name` (this attempt), since when, and their last sign of life."""

    name: str
    attempt: int
    worker: str
    hostname: str
    host: str  # makd.atomic.HOST of the holder's machine
    pid: int
    started: float  # seconds since the epoch
    heartbeat: float
    timeout: float

    def expired(self, now: float | None = None) -> bool:
        if self.host == HOST and not process_running(self.pid):
            return True  # its process on this machine is gone: no need to wait for the timeout
        return (time.time() if now is None else now) - self.heartbeat > self.timeout

    def to_json(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """The lease file's content."""
        return json.dumps(self.to_json()) + "\n"


class Lease:
    """A claim this process holds; renewed by a heartbeat thread until `release()`."""

    def __init__(self, board: LeaseBoard, holder: Holder) -> None:
        self.board, self.holder = board, holder
        self.lost = False  # another worker took over (this one was silent past the timeout)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {holder.name}", daemon=True)
        self._thread.start()

    @property
    def path(self) -> Path:
        return self.board.path_of(self.holder.name, self.holder.attempt)

    def _beat(self) -> None:
        while not self._stop.wait(self.board.heartbeat_s):
            try:
                if not self.renew():
                    return
            except OSError as exc:  # a file-server hiccup: try again at the next beat
                log.warning("could not renew the lease %s: %s", self.path, exc)

    def held(self) -> bool:
        """Whether this lease is still this worker's (False, and `lost`, once another worker took it over)."""
        superseded = self.board.path_of(self.holder.name, self.holder.attempt + 1)
        if self.lost or superseded.exists() or not self.path.exists():
            self.lost = True
        return not self.lost

    def renew(self) -> bool:
        """Write a new heartbeat; False (and `lost`) when another worker has taken the lease over."""
        if not self.held():
            return False
        self.holder = Holder(**{**self.holder.to_json(), "heartbeat": time.time()})
        tmp = self.board.write_temporary(self.path, self.holder)
        os.replace(tmp, self.path)
        return True

    def release(self) -> None:
        """Stop the heartbeat and remove the lease (and any lower attempt left behind), unless it was taken over."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if not self.lost and not self.board.path_of(self.holder.name, self.holder.attempt + 1).exists():
            for attempt in range(self.holder.attempt, -1, -1):
                self.board.path_of(self.holder.name, attempt).unlink(missing_ok=True)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LeaseBoard:
    """The leases of one folder, as one worker sees and takes them."""

    def __init__(self, folder: str | os.PathLike, worker: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.folder = Path(folder)
        self.worker = worker or worker_label()
        self.timeout = float(timeout)
        self.heartbeat_s = self.timeout / 4

    def path_of(self, name: str, attempt: int) -> Path:
        return self.folder / f"{name}.{attempt}{SUFFIX}"

    def write_temporary(self, beside: Path, holder: Holder) -> Path:
        """A complete lease file under a temporary name beside `beside` (the names makd.atomic cleans up)."""
        tmp = new_temporary_file(beside)
        tmp.write_text(holder.text(), encoding="utf-8")
        return tmp

    def holders(self) -> dict[str, Holder]:
        """The current lease of every name that has one (its highest attempt). A file that vanishes between the
        listing and its reading was released, or taken over (attempt + 1 linked before it was removed): the
        folder is listed again, as taking it for free would let this worker claim a lease another just took."""
        for _ in range(RESCANS):
            found, vanished = {}, False
            for name, attempt in self._highest_attempts().items():
                holder = self._read(name, attempt)
                vanished |= holder is None
                if holder is not None:
                    found[name] = holder
            if not vanished:
                break
        return found  # still vanishing (a busy folder): try_claim's check after linking catches a takeover

    def _highest_attempts(self) -> dict[str, int]:
        """The highest attempt of each name among the folder's lease files."""
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return {}
        highest: dict[str, int] = {}
        for entry in entries:
            match = LEASE_FILE.match(entry.name)
            if match:
                name, attempt = match["name"], int(match["attempt"])
                highest[name] = max(attempt, highest.get(name, -1))
        return highest

    def _read(self, name: str, attempt: int) -> Holder | None:
        """The lease file's holder; None if the file is gone."""
        path = self.path_of(name, attempt)
        try:
            text = path.read_text(encoding="utf-8")
            mtime = path.stat().st_mtime
        except FileNotFoundError:  # released or taken over meanwhile
            return None
        try:
            fields = json.loads(text)
            return Holder(**{**fields, "name": name, "attempt": attempt})
        except (ValueError, TypeError):  # not a lease makd wrote: it expires like a silent one, from its mtime
            return Holder(name, attempt, "?", "?", "", 0, mtime, mtime, self.timeout)

    def try_claim(self, name: str) -> Lease | None:
        """The lease of `name`, if nobody holds it or its holder's lease expired; else None."""
        current = self.holders().get(name)
        if current is not None and not current.expired():
            return None
        attempt = 0 if current is None else current.attempt + 1
        now = time.time()
        holder = Holder(name, attempt, self.worker, socket.gethostname(), HOST, os.getpid(), now, now, self.timeout)
        target = self.path_of(name, attempt)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.write_temporary(target, holder)
        except OSError as exc:  # a read-only store, a full disk: one line naming the lease
            raise OutputError(exc.errno, os_error_message(exc, "write", target)) from None
        try:
            if not self._link(tmp, target, holder):
                return None
        finally:
            tmp.unlink(missing_ok=True)
        if self._highest_attempts().get(name, attempt) > attempt:  # taken over since our listing (module docstring)
            target.unlink(missing_ok=True)
            return None
        if current is not None:
            log.info("%s: took over from %s (last heartbeat %.0f s ago)", name, current.worker, now - current.heartbeat)
            for old in range(attempt):
                self.path_of(name, old).unlink(missing_ok=True)
        return Lease(self, holder)

    def _link(self, tmp: Path, target: Path, holder: Holder) -> bool:
        """Give `target` the lease file `tmp`: True if this worker got it, False if another worker has it."""
        try:
            os.link(tmp, target)
        except OSError as exc:
            # NFS: a link whose reply was lost may be retried and fail, yet have succeeded: it did iff the count is 2
            # (open(2), O_EXCL). Otherwise EEXIST means another worker got this attempt first.
            if os.stat(tmp).st_nlink == 2:
                return True
            if isinstance(exc, FileExistsError):
                return False
            if exc.errno in NO_HARD_LINKS:
                return self._create_exclusive(target, holder)
            raise
        return True

    def _create_exclusive(self, target: Path, holder: Holder) -> bool:
        """`link` where the file system has no hard links: O_EXCL creation (False if the name exists), then the
        content. A reader that sees it still empty counts it as held from its mtime (`_read`)."""
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with open(fd, "w", encoding="utf-8") as file:
                file.write(holder.text())
                file.flush()
                os.fsync(file.fileno())
        except OSError as exc:
            target.unlink(missing_ok=True)
            raise OutputError(exc.errno, os_error_message(exc, "write", target)) from None
        return True

    def wait_released(self, name: str, poll_s: float = 0.2) -> None:
        """Until nobody holds a live lease on `name` (its holder finished, or died and its lease expired)."""
        while (holder := self.holders().get(name)) is not None and not holder.expired():
            time.sleep(poll_s)

    def remove_leftovers(self) -> None:
        """Temporary files of killed workers (their leases themselves expire)."""
        remove_stale_temporaries(self.folder)


def claim_each(board: LeaseBoard, todo: Callable[[], list[Item]], name: Callable[[Item], str], *,
               wait: bool = True, poll_s: float | None = None, hold: int = 1) -> Iterator[tuple[Item, Lease] | None]:
    """Yield (item, lease) for each item of `todo()` this worker gets, trying them in todo's order, until `todo()`
    is empty. The lease is held while the caller works on the item and released when it asks for the next one;
    with `hold` = 2, a caller that starts an item before it finishes the one before (the label job ahead of a
    server) keeps both: the earlier one is released at the ask after (or once done). Items this worker holds are
    never waited for: when only they are left, or only they could be finished now, it yields None — the caller
    finishes what it holds and asks again.

    `todo()` is asked again before each claim and after a claim succeeds (what another worker finished meanwhile
    is not redone). When every item left is leased by a live worker: with `wait`, poll until those are done or one
    of their leases expires (then take it over), so that a dead worker's items are finished by the live ones;
    without, return."""
    poll_s = poll_s if poll_s is not None else min(5.0, board.timeout / 4)
    waiting = False
    mine: list[tuple[Item, Lease]] = []  # held by this worker, oldest first
    try:
        while True:
            items = todo()
            while mine and (len(mine) >= hold or mine[0][0] not in items):
                mine.pop(0)[1].release()
            ours = {name(item) for item, _ in mine}
            items = [item for item in items if name(item) not in ours]
            if not items and not mine:
                return
            held = board.holders()
            claimed = None
            for item in items:
                current = held.get(name(item))
                if current is not None and not current.expired():
                    continue
                lease = board.try_claim(name(item))
                if lease is None:
                    continue
                if item not in todo():  # finished by the worker whose lease just ended
                    lease.release()
                    continue
                claimed = (item, lease)
                break
            if claimed is None:
                if mine:
                    yield None
                    continue
                if not wait:
                    return
                if not waiting:
                    log.info("waiting for %d item(s) other workers hold (taken over if their lease expires)", len(items))
                waiting = True
                time.sleep(poll_s)
                continue
            waiting = False
            mine.append(claimed)
            yield claimed
    finally:
        for _, lease in mine:
            lease.release()
