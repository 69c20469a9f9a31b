"""makd: multi-aspect knowledge distillation (arXiv 2501.13341), done carefully."""

__version__ = "0.1.0"
