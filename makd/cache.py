"""Where makd keeps what it can recompute but would rather not: `$MAKD_CACHE`, else `~/.cache/makd`.

Nothing there is needed: deleting the folder costs time, never a result (entries are keyed by everything that
makes them, and recomputed when missing or unreadable).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("MAKD_CACHE") or Path.home() / ".cache" / "makd")
