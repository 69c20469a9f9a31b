"""The detector file: `*.safetensors` with the weights and JSON metadata (task, detector options, classes with their
COCO category ids, questions, input channels and normalisation, the run's config) — enough to evaluate, predict or
export with nothing else. Loading never unpickles anything (the `makd.student/1` file's twin for detection)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from makd.atomic import atomic_path
from makd.detection.models import build_detector, detector_options
from makd.errors import MakdError

DETECTOR_FORMAT = "makd.detector/1"


def save_detector(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": DETECTOR_FORMAT, "makd": json.dumps({"task": "detection", **meta})})


def file_format(path: str | Path) -> str | None:
    """The `format` of a makd model file (None when the file has none); a missing or unreadable file is an error."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except FileNotFoundError:
        raise MakdError(f"model file not found: {path}") from None
    except (SafetensorError, OSError) as exc:
        raise MakdError(f"cannot read model file {path}: {exc}") from None


def is_detector_file(path: str | Path) -> bool:
    """A detector file, or a run folder whose best.safetensors is one."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
        if not path.is_file():
            return False
    return file_format(path) == DETECTOR_FORMAT


def read_detector_meta(path: str | Path) -> dict[str, Any]:
    if file_format(path) != DETECTOR_FORMAT:
        raise MakdError(f"{path} is not a makd detector (format {file_format(path)!r})")
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["makd"])


def load_detector(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the detector from its file alone; returns (model in eval mode, metadata)."""
    meta = read_detector_meta(path)
    options = detector_options({**meta["model"], "backbone_weights": None})
    spec = meta["input"]
    model = build_detector(options, len(meta["classes"]), len(meta["questions"]), spec["in_chans"], spec["mean"], spec["std"])
    model.load_state_dict(load_file(str(path)))
    return model.eval(), meta
