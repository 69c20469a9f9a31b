"""Datasets: splits of samples with stable ids, and the torch views used for training."""

from makd.data.base import ImageSplit
from makd.data.splits import build_splits, describe_splits

__all__ = ["ImageSplit", "build_splits", "describe_splits"]
