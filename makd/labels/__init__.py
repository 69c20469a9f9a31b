"""The label store: teacher log-odds and answer mass per (sample, question), in Parquet shards."""

from makd.labels.job import label_from_config, label_split, samples_to_label, split_coverage
from makd.labels.store import LabelStore
from makd.labels.writer import LabelWriter

__all__ = ["LabelStore", "LabelWriter", "label_split", "label_from_config", "samples_to_label", "split_coverage"]
