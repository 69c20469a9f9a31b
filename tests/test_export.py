"""`makd export`: ONNX with and without the aspect head, numerically equal to the PyTorch student."""

import numpy as np
import pytest
import torch

from makd.cli import main
from makd.config import ModelConfig
from makd.export import export_onnx, run_onnx
from makd.models import build_student
from makd.models.student_file import export_student


@pytest.fixture()
def student_file(tmp_path):
    torch.manual_seed(0)
    model = build_student(ModelConfig(name="resnet8", width=4), 1, 3, 5, (0.3,), (0.2,))
    meta = {"model": ModelConfig(name="resnet8", width=4).model_dump(mode="json"),
            "input": {"in_chans": 1, "height": 28, "width": 28, "resized": False}, "classes": ["a", "b", "c"],
            "questions": [{"id": f"q{i}", "text": f"q {i}?"} for i in range(5)], "question_set_hash": "x"}
    export_student(tmp_path / "s.safetensors", model, meta)
    return tmp_path / "s.safetensors", model.eval()


def test_export_with_and_without_aspects(tmp_path, student_file, capsys):
    path, model = student_file
    assert main(["export", "-m", str(path), "-o", str(tmp_path / "full.onnx")]) == 0
    assert "class_logits, aspect_logits" in capsys.readouterr().out
    report = export_onnx(path, tmp_path / "classes.onnx", aspects=False)
    assert report["outputs"] == ["class_logits"] and report["max_abs_diff"] < 1e-4
    x = torch.rand(7, 1, 28, 28)  # a batch size the export never saw
    with torch.no_grad():
        out = model(x)
    full, _ = run_onnx(tmp_path / "full.onnx", x.numpy())
    np.testing.assert_allclose(full[0], out.class_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(full[1], out.aspect_logits.numpy(), atol=1e-4)
    classes_only, _ = run_onnx(tmp_path / "classes.onnx", x.numpy())
    assert len(classes_only) == 1


def test_reference_evaluator_when_onnxruntime_is_absent(tmp_path, student_file, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    report = export_onnx(student_file[0], tmp_path / "m.onnx", aspects=False)
    assert report["checked_with"] == "onnx reference evaluator" and report["max_abs_diff"] < 1e-4


def test_export_without_an_aspect_head_needs_no_aspects(tmp_path, capsys):
    model = build_student(ModelConfig(name="resnet8", width=4), 1, 3, 0, (0.3,), (0.2,))
    meta = {"model": ModelConfig(name="resnet8", width=4).model_dump(mode="json"),
            "input": {"in_chans": 1, "height": 28, "width": 28, "resized": False}, "classes": ["a", "b", "c"], "questions": []}
    export_student(tmp_path / "ce.safetensors", model, meta)
    assert main(["export", "-m", str(tmp_path / "ce.safetensors"), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "export with --no-aspects" in capsys.readouterr().err
