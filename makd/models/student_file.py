"""The student file: `*.safetensors` with the weights and JSON metadata (config, classes, questions, input
spec) — enough to predict, evaluate or export with nothing else. Loading never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from makd.atomic import atomic_path
from makd.config import ModelConfig, relative_paths
from makd.data.transforms import InputSpec
from makd.errors import MakdError
from makd.models.student import Student, build_student

STUDENT_FORMAT = "makd.student/1"


def export_student(path: str | Path, model: Student, meta: dict[str, Any]) -> None:
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if "config" in meta:  # absolute paths, and where they are from here: a moved run folder still finds them
        meta = {**meta, "paths": relative_paths(meta["config"], path.absolute().parent)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": STUDENT_FORMAT, "makd": json.dumps(meta)})


def read_student_meta(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except FileNotFoundError:
        raise MakdError(f"model file not found: {path}") from None
    except (SafetensorError, OSError) as exc:
        raise MakdError(f"cannot read model file {path}: {exc}") from None
    if header.get("format") != STUDENT_FORMAT:
        raise MakdError(f"{path} is not a makd student (format {header.get('format')!r})")
    return json.loads(header["makd"])


def load_student(path: str | Path) -> tuple[Student, dict[str, Any]]:
    """Rebuild the student from a `.safetensors` file alone; returns (model in eval mode, metadata)."""
    path = Path(path)
    meta = read_student_meta(path)
    spec = InputSpec(**meta["input"])
    model_config = ModelConfig(**{**meta["model"], "pretrained": False})
    model = build_student(model_config, spec.in_chans, len(meta["classes"]), len(meta["questions"]),
                          (0.0,) * spec.in_chans, (1.0,) * spec.in_chans)
    model.load_state_dict(load_file(str(path)))
    return model.eval(), meta
