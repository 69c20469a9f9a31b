"""Per-epoch metrics: `metrics.csv` (rewritten whole, atomically, so a resumed run never duplicates rows)
and TensorBoard scalars."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from makd.atomic import write_text


def history_csv(history: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


class RunLog:
    def __init__(self, run: Path, tensorboard: bool = True) -> None:
        self.run = run
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run / "tensorboard"))

    def log_row(self, row: dict[str, Any], history: list[dict[str, Any]]) -> None:
        write_text(self.run / "metrics.csv", history_csv(history))
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("loss_", "loss/").replace("_top1", "/top1"), value, row["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
