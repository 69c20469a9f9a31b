import numpy as np
import pytest
import torch
from torch import nn

from makd.data.base import ImageSplit
from makd.data.transforms import InputSpec
from makd.evaluate import aspect_agreement, predict, topk_accuracy
from makd.models import Student


class MeanPixel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3)).unsqueeze(1)


def test_accuracy_uses_class_logits_even_when_aspect_logits_dominate():
    # Two classes: dark images (class 0) and bright images (class 1). The class head separates them;
    # the aspect head outputs ~1000 for every image, so top-1 over [class | aspect] logits would never
    # pick a class, and would score 0 %.
    array = np.concatenate([np.full((4, 8, 8), 40, np.uint8), np.full((4, 8, 8), 210, np.uint8)])
    split = ImageSplit("t", [f"t/{i}" for i in range(8)], np.array([0] * 4 + [1] * 4), ["dark", "bright"], array=array)
    model = Student(MeanPixel(), 1, 2, 3, mean=(0.0,), std=(1.0,))
    with torch.no_grad():
        model.class_head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        model.class_head.bias.copy_(torch.tensor([0.5, -0.5]))
        model.aspect_head.weight.zero_()
        model.aspect_head.bias.fill_(1000.0)
    preds = predict(model, split, InputSpec(1, 8, 8, False), batch_size=3)
    assert preds.aspect_logits.min() > 999
    concatenated = np.concatenate([preds.class_logits, preds.aspect_logits], axis=1)
    assert topk_accuracy(concatenated, preds.targets) == 0.0  # the official code's mistake
    assert topk_accuracy(preds.class_logits, preds.targets) == 100.0


def test_topk_accuracy():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    targets = np.array([2, 0, 0])
    assert topk_accuracy(logits, targets, 1) == pytest.approx(100 / 3)
    assert topk_accuracy(logits, targets, 2) == pytest.approx(200 / 3)
    assert topk_accuracy(logits, targets, 5) == 100.0


def test_aspect_agreement_per_question():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(50, 3)) * 2
    student = np.stack([teacher[:, 0], -teacher[:, 1], rng.normal(size=50)], axis=1)
    result = aspect_agreement(student, teacher)
    assert result.correlation[0] == pytest.approx(1.0)
    assert result.correlation[1] == pytest.approx(-1.0)
    assert abs(result.correlation[2]) < 0.4
    assert result.mean_abs_error[0] == pytest.approx(0.0)
