"""makd's package as it was at a commit, for benchmark arms that run the old code (imported by them; not a
benchmark itself)."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path


def package_at(commit: str, dest: Path, arm: str) -> Path:
    """The makd package of `commit`, unpacked from this repository's history (`git archive`) into `dest`."""
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "makd"], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"arm {arm}: commit {commit} is not in {repo}'s history "
                         f"({archive.stderr.decode().strip()}); run from a full clone, or leave the arm out")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def python_at(code: Path, source: str) -> list[str]:
    """The command that runs `source` with the package at `code` first on the path. Not PYTHONPATH: `-c` puts the
    current directory before it, so a run from the repository's root would import today's makd instead."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(code)!r})\n{source}"]
