import numpy as np
import pytest
import torch
from torch import nn

from makd.data.base import ImageSplit
from makd.data.transforms import InputSpec
from makd.evaluate import aspect_agreement, fold_batch_norms, predict, topk_accuracy
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


def test_expected_calibration_error_by_hand():
    from makd.evaluate import expected_calibration_error

    # Confidences 0.9, 0.9 (one right, one wrong) and 0.6 (right): bins (0.8667, 0.9333] and (0.5333, 0.6].
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]])
    logits = np.log(p)
    targets = np.array([0, 1, 0])
    expected = 100 * (2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1.0 - 0.6))
    assert expected_calibration_error(logits, targets) == pytest.approx(expected)
    perfect = np.log(np.array([[1.0 - 1e-12, 1e-12]] * 4))
    assert expected_calibration_error(perfect, np.zeros(4, dtype=int)) == pytest.approx(0.0, abs=1e-6)


def test_aspect_auroc_against_pairwise_definition_and_constant_questions():
    from makd.evaluate import auroc_per_column

    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=(30, 3)), 1)  # rounding creates ties
    positive = rng.random((30, 3)) > 0.5
    positive[:, 2] = True  # a question the teacher always answers yes: no AUROC
    auc = auroc_per_column(scores, positive)
    for j in range(2):
        pos, neg = scores[positive[:, j], j], scores[~positive[:, j], j]
        pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
        assert auc[j] == pytest.approx(pairs)
    assert np.isnan(auc[2])
    teacher = np.where(positive, 2.0, -2.0)
    teacher[:, 2] = 3.0
    agreement = aspect_agreement(scores, teacher)
    assert agreement.summary["auroc_questions"] == 2
    assert agreement.summary["mean_auroc"] == pytest.approx(auc[:2].mean())


class ValueDependentBranch(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return (y if y.sum() > 0 else -y).mean(dim=(2, 3))


def test_testing_folds_batch_norms_without_changing_predictions():
    from makd.config import ModelConfig
    from makd.models import build_student

    torch.manual_seed(0)
    model = build_student(ModelConfig(name="resnet8", width=8), 1, 3, 2, (0.3,), (0.2,))
    with torch.no_grad():  # batch-norm statistics and affine parameters far from their initial 0/1
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(), m.running_var.uniform_(0.3, 3), m.weight.normal_(), m.bias.normal_()
    model.eval()
    folded = fold_batch_norms(model)
    assert folded is not model and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 9  # the model itself is left as it was
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        want, got = model(x), folded(x)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    untraceable = ValueDependentBranch().eval()
    assert fold_batch_norms(untraceable) is untraceable
