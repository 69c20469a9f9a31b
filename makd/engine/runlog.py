"""Per-epoch metrics: `metrics.csv` (rewritten whole, atomically, so a resumed run never duplicates rows),
TensorBoard scalars, and Weights & Biases when asked (`train.wandb`; WANDB_MODE=offline needs no network)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from makd.atomic import write_text
from makd.errors import MakdError
from makd.report.tables import rows_csv


class RunLog:
    def __init__(self, run: Path, tensorboard: bool = True, wandb: dict[str, Any] | None = None) -> None:
        self.run = run
        self.writer = None
        self.wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run / "tensorboard"))
        if wandb is not None:
            self.wandb = start_wandb(run, **wandb)

    def log_row(self, row: dict[str, Any], history: list[dict[str, Any]]) -> None:
        write_text(self.run / "metrics.csv", rows_csv(history))
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("loss_", "loss/").replace("_top1", "/top1"), value, row["epoch"])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(run: Path, project: str, name: str, config: dict[str, Any]) -> Any:
    """A W&B run whose id is derived from the run folder, so a resumed training continues the same W&B run."""
    try:
        import wandb
    except ImportError:
        raise MakdError("train.wandb: the wandb package is not installed (pip install 'makd[wandb]')") from None
    run_id = hashlib.sha1(str(run.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run), config=config)
