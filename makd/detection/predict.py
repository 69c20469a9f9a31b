"""Boxes, classes and the top aspects per box for image files, from a detector file alone; drawn onto the images.
Also the ONNX export of a detector (one image in; boxes, labels, scores and aspect logits out)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as TF

from makd.atomic import atomic_path
from makd.data.base import load_image
from makd.detection.model_file import load_detector
from makd.errors import MakdError
from makd.evaluate import sigmoid
from makd.export import run_onnx

COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#9a6324", "#800000"]


def image_input(img: Image.Image, in_chans: int) -> torch.Tensor:
    mode = "L" if in_chans == 1 else "RGB"
    return TF.pil_to_tensor(img if img.mode == mode else img.convert(mode)).float().div_(255.0)


def describe_boxes(out: dict[str, torch.Tensor], meta: dict[str, Any], score_threshold: float,
                   top_aspects: int) -> list[dict[str, Any]]:
    """Each detection above the threshold: class, score, box and the aspects the head is most confident about."""
    boxes = []
    for k in torch.nonzero(out["scores"] >= score_threshold).flatten().tolist():
        label = int(out["labels"][k]) - 1
        if label < 0:
            continue
        entry: dict[str, Any] = {"class": meta["classes"][label], "score": float(out["scores"][k]),
                                 "box": [round(float(v), 1) for v in out["boxes"][k]]}
        if "aspect_logits" in out and top_aspects > 0:
            p_yes = sigmoid(out["aspect_logits"][k].detach().double().numpy())
            order = np.argsort(-np.abs(p_yes - 0.5))[:top_aspects]
            entry["aspects"] = [{"question": meta["questions"][j]["text"], "p_yes": float(p_yes[j])} for j in order]
        boxes.append(entry)
    return boxes


def draw_detections(img: Image.Image, boxes: list[dict[str, Any]], classes: list[str], min_side: int = 512) -> Image.Image:
    """The image (scaled up to `min_side` for legible text) with each box, its class and score, and its top aspects."""
    scale = max(1.0, min_side / min(img.size))
    canvas = img.convert("RGB").resize((round(img.width * scale), round(img.height * scale)), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for entry in boxes:
        x1, y1, x2, y2 = (v * scale for v in entry["box"])
        colour = COLOURS[classes.index(entry["class"]) % len(COLOURS)]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
        lines = [f"{entry['class']} {entry['score']:.2f}"]
        lines += [f"{'Y' if a['p_yes'] >= 0.5 else 'N'} {a['p_yes']:.2f} {a['question'][:34]}" for a in entry.get("aspects", [])]
        text = "\n".join(lines)
        left, top, right, bottom = draw.multiline_textbbox((x1 + 2, y1 + 2), text, spacing=1)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.multiline_text((x1 + 2, y1 + 2), text, fill=colour, spacing=1)
    return canvas


@torch.inference_mode()
def predict_detection_files(model_path: str | Path, images: Sequence[str | Path], top_aspects: int = 3,
                            score_threshold: float = 0.5, out_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Detections per image; with `out_dir`, each image is also drawn to `<out_dir>/<name>.pred.png`."""
    model, meta = load_detector(model_path)
    results = []
    for path in images:
        img = load_image(Path(path))
        out = model([image_input(img, meta["input"]["in_chans"])])[0]
        boxes = describe_boxes(out, meta, score_threshold, top_aspects)
        entry: dict[str, Any] = {"image": str(path), "boxes": boxes}
        if out_dir is not None:
            drawn = Path(out_dir) / f"{Path(path).stem}.pred.png"
            with atomic_path(drawn) as tmp:
                draw_detections(img, boxes, meta["classes"]).save(tmp, format="PNG")
            entry["drawn"] = str(drawn)
        results.append(entry)
    return results


class DetectorExportView(torch.nn.Module):
    """One image [C, H, W] in [0, 1] -> boxes, labels (0 = background never appears), scores (and aspect logits)."""

    def __init__(self, model: torch.nn.Module, aspects: bool) -> None:
        super().__init__()
        self.model, self.aspects = model, aspects

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model([image])[0]
        named = (out["boxes"], out["labels"], out["scores"])
        return (*named, out["aspect_logits"]) if self.aspects else named


def export_detector_onnx(model_path: str | Path, output: str | Path, aspects: bool = True, opset: int = 17,
                         check: bool = True) -> dict[str, Any]:
    """Write `output` (.onnx) and compare it with PyTorch on an image of another size than the traced one."""
    try:
        import onnx
    except ImportError:
        raise MakdError("makd export needs the onnx package (pip install 'makd[export]')") from None
    model, meta = load_detector(model_path)
    if aspects and not meta["questions"]:
        raise MakdError(f"{model_path} has no aspect head (trained without aspects): export with --no-aspects")
    c = meta["input"]["in_chans"]
    size = int(meta["model"]["min_size"][-1] if isinstance(meta["model"]["min_size"], list) else meta["model"]["min_size"])
    view = DetectorExportView(model, aspects).eval()
    names = ["boxes", "labels", "scores"] + (["aspect_logits"] if aspects else [])
    example = torch.rand(c, size, size, generator=torch.Generator().manual_seed(0))
    with atomic_path(output) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer warnings
        torch.onnx.export(view, (example,), str(tmp), dynamo=False, input_names=["image"], output_names=names,
                          dynamic_axes={"image": {1: "height", 2: "width"}}, opset_version=opset)
        onnx.checker.check_model(str(tmp))
    report = {"output": str(output), "outputs": names, "input": [c, "height", "width"], "classes": len(meta["classes"]),
              "aspects": len(meta["questions"]) if aspects else 0}
    if check:
        x = torch.rand(c, size + 16, size - 8, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            expected = [t.float().numpy() for t in view(x)]
        got, runtime = run_onnx(output, x.numpy())
        if [g.shape for g in got] != [e.shape for e in expected]:
            raise MakdError(f"ONNX export {output} returns shapes {[g.shape for g in got]}, PyTorch {[e.shape for e in expected]}")
        diff = max([float(np.abs(g.astype(np.float64) - e).max()) for g, e in zip(got, expected) if g.size] or [0.0])
        if diff > 1e-3:
            raise MakdError(f"ONNX export {output} differs from PyTorch by {diff:.3g} ({runtime})")
        report.update({"max_abs_diff": diff, "checked_with": runtime})
    return report
