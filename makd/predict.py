"""Class and top aspects for images, from a student file alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from makd.data.base import load_image
from makd.data.transforms import InputSpec, build_transform, image_tensor, to_model_mode
from makd.evaluate import sigmoid
from makd.models.student_file import load_student


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def explain(class_logits: np.ndarray, aspect_logits: np.ndarray | None, meta: dict[str, Any], top_aspects: int = 5) -> list[dict[str, Any]]:
    """Per image: predicted class with probability, and the aspects the head is most confident about."""
    results = []
    probs = softmax(class_logits)
    for i in range(len(class_logits)):
        k = int(probs[i].argmax())
        entry: dict[str, Any] = {"class": meta["classes"][k], "probability": float(probs[i, k])}
        if aspect_logits is not None and top_aspects > 0:
            p_yes = sigmoid(aspect_logits[i])
            order = np.argsort(-np.abs(p_yes - 0.5))[:top_aspects]  # most confident, yes or no
            entry["aspects"] = [{"question": meta["questions"][j]["text"], "p_yes": float(p_yes[j])} for j in order]
        results.append(entry)
    return results


Logits = tuple[np.ndarray, np.ndarray | None]


def load_predictor(model_path: str | Path) -> tuple[Callable[[torch.Tensor], Logits], dict[str, Any]]:
    """(images -> (class logits, aspect logits or None), metadata) of a student file or of its ONNX export."""
    if Path(model_path).suffix.lower() == ".onnx":
        from makd.export import read_onnx_metadata, run_onnx

        meta = read_onnx_metadata(model_path)

        def run_graph(x: torch.Tensor) -> Logits:
            outputs = dict(zip(meta["outputs"], run_onnx(model_path, x.numpy())[0]))
            return outputs["class_logits"], outputs.get("aspect_logits")

        return run_graph, meta
    model, meta = load_student(model_path)

    def run_model(x: torch.Tensor) -> Logits:
        out = model(x)
        return out.class_logits.numpy(), None if out.aspect_logits is None else out.aspect_logits.numpy()

    return run_model, meta


@torch.inference_mode()
def predict_files(model_path: str | Path, images: Sequence[str | Path], top_aspects: int = 5) -> list[dict[str, Any]]:
    """Class and top aspects of each image, from a `.safetensors` student or its `.onnx` export (same answers)."""
    run, meta = load_predictor(model_path)
    spec = InputSpec(**meta["input"])
    transform = build_transform(spec, train=False)
    batch = torch.stack([transform(image_tensor(to_model_mode(load_image(Path(p)), spec))) for p in images])
    results = explain(*run(batch), meta, top_aspects)
    for entry, path in zip(results, images):
        entry["image"] = str(path)
    return results
