"""ONNX export of a student file: class logits, and the aspect logits unless left out.

The graph takes float images in [0, 1] at the student's input size (normalisation is inside), with a dynamic
batch dimension. The file carries what it takes to use it as metadata (`metadata_props`, JSON values): the
classes, the questions, and the preprocessing that turns an image file into the input (channels, size, whether
and how it is resized: crop_pct and interpolation as in timm; mean/std for reference, applied inside the
graph), so `makd predict -m student.onnx` gives the same answers as the `.safetensors`. After writing, the
export is checked against PyTorch on random inputs with onnxruntime (or onnx's reference evaluator when
onnxruntime is absent).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from makd.atomic import atomic_path
from makd.data.transforms import InputSpec
from makd.errors import MakdError
from makd.models import Student
from makd.models.student_file import load_student

ONNX_FORMAT = "makd.onnx/1"


class ExportView(nn.Module):
    """The student as a function of a plain tensor, returning a tuple of named outputs."""

    def __init__(self, student: Student, aspects: bool) -> None:
        super().__init__()
        self.student, self.aspects = student, aspects

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.student(image)
        return (out.class_logits, out.aspect_logits) if self.aspects else (out.class_logits,)


def export_onnx(model_path: str | Path, output: str | Path, aspects: bool = True, opset: int = 17,
                check: bool = True) -> dict:
    """Write `output` (.onnx); returns what was written and the largest difference from PyTorch."""
    try:
        import onnx
    except ImportError:
        raise MakdError("makd export needs the onnx package (pip install 'makd[export]')") from None
    student, meta = load_student(model_path)
    if aspects and student.aspect_head is None:
        raise MakdError(f"{model_path} has no aspect head (trained without aspects): export with --no-aspects")
    spec = InputSpec(**meta["input"])
    view = ExportView(student, aspects).eval()
    names = ["class_logits", "aspect_logits"] if aspects else ["class_logits"]
    example = torch.rand(2, spec.in_chans, spec.height, spec.width, generator=torch.Generator().manual_seed(0))
    with atomic_path(output) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is deprecated
        torch.onnx.export(view, (example,), str(tmp), dynamo=False, input_names=["image"], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in ["image", *names]}, opset_version=opset)
        onnx.checker.check_model(str(tmp))
        add_metadata(onnx, tmp, onnx_metadata(student, meta, names))
    report = {"output": str(output), "outputs": names, "input": [None, spec.in_chans, spec.height, spec.width],
              "classes": len(meta["classes"]), "aspects": len(meta["questions"]) if aspects else 0}
    if check:
        report.update(verify(output, view, spec))
    return report


def onnx_metadata(student: Student, meta: dict, outputs: list[str]) -> dict[str, str]:
    """What a user of the ONNX file needs besides the graph, as JSON strings by key."""
    values = {"format": ONNX_FORMAT, "classes": meta["classes"], "outputs": outputs,
              "questions": meta["questions"] if "aspect_logits" in outputs else [],
              "input": meta["input"], "mean": student.mean.flatten().tolist(), "std": student.std.flatten().tolist(),
              "input_range": "float32 RGB (or grey) in [0, 1], NCHW; mean/std are applied inside the graph"}
    return {key: json.dumps(value) for key, value in values.items()}


def add_metadata(onnx: Any, path: Path, values: dict[str, str]) -> None:
    model = onnx.load(str(path))
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def read_onnx_metadata(path: str | Path) -> dict:
    """The metadata of a makd ONNX file, decoded (the same keys as a student file's: classes, questions, input)."""
    try:
        import onnx
    except ImportError:
        raise MakdError("reading an ONNX file needs the onnx package (pip install 'makd[export]')") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise MakdError(f"model file not found: {path}") from None
    except Exception as exc:  # onnx raises DecodeError and others for a file that is not ONNX
        raise MakdError(f"cannot read ONNX file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("format") != json.dumps(ONNX_FORMAT):
        raise MakdError(f"{path} was not exported by `makd export` (no {ONNX_FORMAT} metadata): classes and "
                        "preprocessing unknown")
    return {key: json.loads(value) for key, value in props.items()}


def verify(path: str | Path, view: ExportView, spec: InputSpec, batch: int = 3) -> dict:
    """Largest |ONNX - PyTorch| over the outputs on a random batch of another size than the export's."""
    x = torch.rand(batch, spec.in_chans, spec.height, spec.width, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = [t.numpy() for t in view(x)]
    got, runtime = run_onnx(path, x.numpy())
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got, expected))
    if diff > 1e-3:
        raise MakdError(f"ONNX export {path} differs from PyTorch by {diff:.3g} ({runtime})")
    return {"max_abs_diff": diff, "checked_with": runtime}


def run_onnx(path: str | Path, x: np.ndarray) -> tuple[list[np.ndarray], str]:
    try:
        import onnxruntime as ort
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        return list(ReferenceEvaluator(str(path)).run(None, {"image": x})), "onnx reference evaluator"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x}), "onnxruntime"
