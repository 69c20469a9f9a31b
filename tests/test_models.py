import pytest
import torch

from makd.config import ModelConfig
from makd.errors import MakdError
from makd.models import build_student
from makd.models.small_resnet import SmallResNet


@pytest.mark.parametrize("name, blocks", [("resnet8", 3), ("resnet20", 9)])
def test_small_resnet_depth_and_features(name, blocks):
    net = SmallResNet(name, width=8, in_chans=1)
    assert len(net.layers) == blocks and net.num_features == 32
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 32)


def test_student_heads_are_separate_and_normalise_inside():
    model = build_student(ModelConfig(name="resnet8", width=8), 1, 10, 40, (0.3,), (0.2,))
    out = model(torch.rand(3, 1, 28, 28))
    assert out.class_logits.shape == (3, 10) and out.aspect_logits.shape == (3, 40)
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.3]))
    no_aspects = build_student(ModelConfig(name="resnet8", width=8), 1, 10, 0, (0.3,), (0.2,))
    assert no_aspects(torch.rand(2, 1, 28, 28)).aspect_logits is None


def test_mlp_aspect_head():
    model = build_student(ModelConfig(name="resnet8", width=8, aspect_head="mlp"), 3, 5, 7, (0.5,) * 3, (0.25,) * 3)
    assert model(torch.rand(2, 3, 32, 32)).aspect_logits.shape == (2, 7)


def test_timm_backbone_gets_both_heads():
    model = build_student(ModelConfig(name="resnet10t"), 3, 4, 6, (0.5,) * 3, (0.25,) * 3)
    out = model(torch.rand(2, 3, 64, 64))
    assert out.class_logits.shape == (2, 4) and out.aspect_logits.shape == (2, 6)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(MakdError, match="model.name: unknown model 'resnet9000'"):
        build_student(ModelConfig(name="resnet9000"), 3, 4, 0, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(MakdError, match="has no pretrained weights"):
        build_student(ModelConfig(name="resnet8", pretrained=True), 3, 4, 0, (0.5,) * 3, (0.25,) * 3)
