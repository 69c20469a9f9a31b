"""Tables as files: rows of dicts as CSV."""

from __future__ import annotations

import csv
import io
from typing import Any


def rows_csv(history: list[dict[str, Any]]) -> str:
    """Rows of dicts as CSV (the union of their keys as columns; floats to 6 significant digits)."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()
