"""User-facing errors: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class MakdError(Exception):
    """A problem with the user's input (file, row, option) that the user can fix."""


class OutputError(MakdError, OSError):
    """A file could not be written (disk full, read-only, a folder that is a file...).

    Still an OSError, so code with a fallback for unwritable places (a read-only label store) keeps working,
    and a MakdError, so the user sees one line naming the file."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages), or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# What was being done: by the failing pathlib/os call (the innermost Python frame), else by the errno.
_OPERATION_BY_CALL = {"mkdir": "create folder", "makedirs": "create folder", "unlink": "delete", "rmdir": "delete",
                      "rename": "move", "replace": "move", "iterdir": "list", "scandir": "list", "read_text": "read",
                      "read_bytes": "read", "write_text": "write", "write_bytes": "write"}
_OPERATION_BY_ERRNO = {errno.ENOSPC: "write", errno.EDQUOT: "write", errno.EROFS: "write", errno.EFBIG: "write",
                       errno.ENOENT: "open", errno.EISDIR: "open", errno.EACCES: "access", errno.EPERM: "access"}


def os_error_message(exc: OSError, operation: str | None = None, path: str | os.PathLike | None = None) -> str:
    """One line: the operation, the path and the reason, e.g. `cannot write runs/x/metrics.csv: No space left on
    device`; a path under a regular file names that file, since 'Not a directory' alone does not say which one."""
    path = path if path is not None else exc.filename
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and path is not None:
        blocker = _file_in_the_way(Path(os.fsdecode(path)))
        if blocker is not None:
            reason = f"{blocker} is a file, not a folder"
    if operation is None and path is not None and exc.filename2 is not None:
        return f"cannot move {os.fsdecode(path)} to {os.fsdecode(exc.filename2)}: {reason}"
    operation = operation or _OPERATION_BY_CALL.get(_failed_call(exc)) or _OPERATION_BY_ERRNO.get(exc.errno, "access")
    if path is None:
        return f"cannot {operation}: {reason}"
    return f"cannot {operation} {os.fsdecode(path)}: {reason}"


def _failed_call(exc: BaseException) -> str | None:
    """The name of the innermost Python function the exception passed through (e.g. pathlib's `mkdir`)."""
    tb, name = exc.__traceback__, None
    while tb is not None:
        name, tb = tb.tb_frame.f_code.co_name, tb.tb_next
    return name


def _file_in_the_way(path: Path) -> Path | None:
    """The path itself or its nearest existing ancestor, when that is not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None
