"""Training: one loop for every method, exact resume, checkpoints and run folders.

`train` is imported on first use, so that importing one of the engine's small modules (seeding, distributed, batch
norm) does not import the loop and everything it needs."""

from __future__ import annotations

from typing import Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from makd.engine.trainer import train

        return train
    raise AttributeError(f"module 'makd.engine' has no attribute {name!r}")
