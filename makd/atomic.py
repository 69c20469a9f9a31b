"""Atomic file output: a reader never sees a half-written file, and a killed job leaves none behind for long.

Every file is written under a temporary name beside its target, `.<name>.<host>-<pid>.<random>.tmp`, then
renamed onto it. A writer that is killed (SIGKILL, power loss) cannot remove its temporary file; the next
command that writes into the folder does (`remove_stale_temporaries`). The writer's host and process id are
in the name because several processes legitimately write into one folder at once (the workers of a sharded
`makd label`, DDP ranks): a temporary file is removed only when its writer is gone — a process of this host
that no longer runs, or, for another host's (shared file systems) or an older makd's files, when nothing has
written to it for STALE_AFTER_S.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from makd.errors import MakdError, OutputError, os_error_message

STALE_AFTER_S = 3600  # no write for an hour: no live writer (they write continuously)


def _process_namespace() -> str:
    """What makes pids comparable: the host name, this boot, and the pid namespace (containers that share a host name,
    e.g. with host networking, do not see each other's processes: their pids must not be judged from here)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "\n".join(parts)


HOST = hashlib.sha256(_process_namespace().encode()).hexdigest()[:8]  # "this machine" for pids in file names and leases
TEMPORARY = re.compile(r"^\..+\.tmp$")
WRITER = re.compile(r"\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+\.tmp$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Any failure to write (a full disk, a read-only folder, a folder that is a file) is an OutputError naming
    `path`, and the temporary file is gone."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = new_temporary_file(path)
        mode = stat.S_IMODE(tmp_path.stat().st_mode)  # 0666 less the umask: what any file written here gets
    except OSError as exc:
        raise OutputError(exc.errno, os_error_message(exc, "write", path)) from None
    try:
        yield tmp_path
        # Some writers replace the file they are given with their own (safetensors makes it 0600): every output
        # gets the same umask-given mode, whoever wrote it.
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except MakdError:
        raise
    except OSError as exc:
        if exc.filename not in (None, str(tmp_path), str(path)):
            raise  # about another file the block touched: not this write's failure
        raise OutputError(exc.errno, os_error_message(exc, "write", path)) from None
    except Exception as exc:  # writers that report a full disk as their own error type (torch, safetensors)
        if _disk_full(path.parent, exc):
            raise OutputError(errno.ENOSPC, f"cannot write {path}: {os.strerror(errno.ENOSPC)}") from None
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; rename it onto `path` only if the block succeeds. An empty folder at
    `path` is replaced; one that another writer filled meanwhile is kept (the writers of one folder compute the same
    content: a cache entry, generated data)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temporary_file(path, folder=True)
    except OSError as exc:
        raise OutputError(exc.errno, os_error_message(exc, "write", path)) from None
    try:
        yield tmp
        with contextlib.suppress(OSError):
            path.rmdir()  # only when empty
        try:
            os.rename(tmp, path)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise OutputError(exc.errno, os_error_message(exc, "write", path)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def new_temporary_file(path: Path, folder: bool = False) -> Path:
    """An empty `.<name>.<host>-<pid>.<random>.tmp` beside `path`, created with mode 0666 so that the umask decides
    its permissions, as for any file a program writes (mkstemp's 0600 would make every output private); with
    `folder`, an empty folder of that name (mode 0777 less the umask)."""
    while True:
        tmp = path.parent / f".{path.name}.{HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            if folder:
                os.mkdir(tmp)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _disk_full(folder: Path, exc: BaseException) -> bool:
    if "No space left on device" in str(exc) or "os error 28" in str(exc):
        return True
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Temporary files and folders in `folder` whose writer is gone (see the module docstring)."""
    try:
        entries = [e for e in os.scandir(folder) if TEMPORARY.match(e.name) and not e.is_symlink()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    stale = []
    for entry in entries:
        writer = WRITER.search(entry.name)
        if not writer and entry.is_dir(follow_symlinks=False):
            continue  # folders only in atomic_folder's own naming: never a user's `.something.tmp` folder
        if writer and writer["host"] == HOST:
            gone = not process_running(int(writer["pid"]))
        else:
            try:
                gone = time.time() - entry.stat().st_mtime > STALE_AFTER_S
            except FileNotFoundError:  # renamed or removed by its writer meanwhile
                continue
        if gone:
            stale.append(Path(entry.path))
    return sorted(stale)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Remove what killed writers left in `folder`; called when a command starts writing there. Returns the count."""
    stale = stale_temporaries(folder)
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(stale)


def process_running(pid: int) -> bool:
    """Whether process `pid` of this host is alive (a zombie, killed but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON, turning a missing or malformed file into a one-line MakdError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MakdError(f"{what} not found: {path}") from None
    except OSError as exc:  # a folder, a path under a file, no permission
        raise MakdError(os_error_message(exc, "read", path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MakdError(f"{what} {path} is not valid JSON: {exc}") from None
