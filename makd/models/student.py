"""The student: any backbone's pooled features -> a class head and a separate aspect head.

Keeping the heads separate (rather than widening one C + Q layer as the official code does) makes it
impossible for evaluation to take top-1 over aspect logits, and lets the aspect head be an MLP.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from makd.config import ModelConfig
from makd.errors import MakdError
from makd.models.small_resnet import DEPTHS, SmallResNet


class StudentOutput(NamedTuple):
    class_logits: torch.Tensor
    aspect_logits: torch.Tensor | None


class Student(nn.Module):
    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, num_aspects: int,
                 mean: tuple[float, ...], std: tuple[float, ...], aspect_head: str = "linear",
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.backbone = backbone
        self.dropout = nn.Dropout(drop_rate)
        self.class_head = nn.Linear(num_features, num_classes)
        self.aspect_head: nn.Module | None = None
        if num_aspects > 0:
            self.aspect_head = (nn.Linear(num_features, num_aspects) if aspect_head == "linear" else
                                nn.Sequential(nn.Linear(num_features, num_features), nn.ReLU(), nn.Linear(num_features, num_aspects)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of images in [0, 1]."""
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> StudentOutput:
        feats = self.dropout(self.features(x))
        aspects = self.aspect_head(feats) if self.aspect_head is not None else None
        return StudentOutput(self.class_head(feats), aspects)


def build_backbone(config: ModelConfig, in_chans: int) -> tuple[nn.Module, int, dict]:
    """(backbone returning pooled features, feature size, timm pretrained_cfg or {})."""
    if config.name in DEPTHS:
        if config.pretrained:
            raise MakdError(f"model.pretrained: the small ResNet {config.name} has no pretrained weights")
        net = SmallResNet(config.name, config.width, in_chans)
        return net, net.num_features, {}
    import timm

    if not timm.is_model(config.name):
        raise MakdError(f"model.name: unknown model {config.name!r} (small ResNets: {', '.join(DEPTHS)}; "
                        "or any name from timm.list_models())")
    kwargs: dict = {"num_classes": 0, "in_chans": in_chans}
    if isinstance(config.pretrained, str):
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": config.pretrained})
    else:
        kwargs["pretrained"] = config.pretrained
    try:
        net = timm.create_model(config.name, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        raise MakdError(f"model {config.name!r}: cannot create it ({str(exc).splitlines()[0]})") from None
    return net, net.num_features, dict(net.pretrained_cfg or {})


def build_student(config: ModelConfig, in_chans: int, num_classes: int, num_aspects: int,
                  mean: tuple[float, ...], std: tuple[float, ...]) -> Student:
    backbone, num_features, pretrained_cfg = build_backbone(config, in_chans)
    if config.pretrained and pretrained_cfg.get("mean"):
        mean, std = _match_channels(pretrained_cfg["mean"], in_chans), _match_channels(pretrained_cfg["std"], in_chans)
    return Student(backbone, num_features, num_classes, num_aspects, tuple(mean), tuple(std),
                   config.aspect_head, config.drop_rate)


def _match_channels(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    values = tuple(values)
    if len(values) == in_chans:
        return values
    mean = sum(values) / len(values)
    return (mean,) * in_chans
