"""Experiments: many runs (methods x seeds x settings) and their comparison."""
