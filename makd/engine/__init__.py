"""Training: one loop for every method, exact resume, checkpoints and run folders."""

from makd.engine.trainer import train

__all__ = ["train"]
