"""`makd ARGS` run in this process: the same `makd.cli.main` that `python -m makd` runs, without a new interpreter
importing torch again (~3 s per command on 2 cores). Tests that need a real process (a SIGKILL, the environment,
the exit status a shell sees) start one; everything else goes through here."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_makd(*args: str, cwd: Path | None = None, check: bool = True) -> Ran:
    """Run one makd command with `cwd` as the current folder; stdout, stderr and makd's log lines captured as a
    shell would see them. With `check`, a non-zero status fails the test with the command's stderr."""
    from makd.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("makd")
    previous = os.getcwd()
    logger.addHandler(handler)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse: --help, or a usage error
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(previous)
        logger.removeHandler(handler)
    ran = Ran(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"makd {' '.join(map(str, args))} failed ({code}):\n{ran.stderr[-3000:]}")
    return ran
