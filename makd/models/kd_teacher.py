"""The KD teacher: a frozen classifier whose logits the `kd`, `dkd` and `lskd` terms distil.

It is a trained makd student file or any timm model, always in eval mode without gradients, and sees the
student's augmented batch (images in [0, 1]) resized to its own input size and normalised its own way.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from makd.config import KDTeacherConfig
from makd.errors import MakdError
from makd.models.student import create_timm_model, pretrained_source, timm_data_config


class Normalized(nn.Module):
    """A timm classifier that takes [0, 1] images and normalises them with its own mean/std."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class KDTeacher(nn.Module):
    def __init__(self, net: nn.Module, in_chans: int, size: tuple[int, int], class_logits: bool) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.in_chans, self.size, self.class_logits = in_chans, size, class_logits

    def train(self, mode: bool = True) -> "KDTeacher":
        return super().train(False)  # never leaves eval mode (batch-norm statistics stay frozen)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        out = self.net(x)
        return out.class_logits if self.class_logits else out


def load_kd_teacher(config: KDTeacherConfig, class_names: list[str]) -> KDTeacher:
    """The configured teacher, checked to predict exactly the dataset's classes."""
    if bool(config.checkpoint) == bool(config.timm):
        raise MakdError("kd_teacher: set exactly one of kd_teacher.checkpoint (a makd student file) or kd_teacher.timm "
                        "(a timm model name); a KD loss term (kd, dkd, lskd) is on")
    if config.checkpoint:
        from makd.models.student_file import load_student

        model, meta = load_student(config.checkpoint)
        if meta["classes"] != class_names:
            raise MakdError(f"kd_teacher.checkpoint {config.checkpoint} predicts classes {meta['classes'][:3]}..., "
                            f"the dataset has {class_names[:3]}...")
        spec = meta["input"]
        return KDTeacher(model, spec["in_chans"], (spec["height"], spec["width"]), class_logits=True)
    # A local file is taken to hold a classifier for these classes (loading fails loudly if it does not).
    local = isinstance(config.pretrained, str) and "file" in pretrained_source(config.pretrained)
    net = create_timm_model(config.timm, config.pretrained, "kd_teacher", overlay={"num_classes": len(class_names)} if local else None,
                            num_classes=len(class_names), **config.kwargs)
    if config.pretrained and net.pretrained_cfg.get("num_classes") != len(class_names):
        raise MakdError(f"kd_teacher: the {config.timm} weights classify {net.pretrained_cfg.get('num_classes')} classes, "
                        f"the dataset has {len(class_names)}: fine-tune the teacher first (`makd train`), then use "
                        "kd_teacher.checkpoint")
    data = timm_data_config(net)
    size = tuple(data["input_size"][-2:])
    return KDTeacher(Normalized(net, tuple(data["mean"]), tuple(data["std"])), data["input_size"][0], size, class_logits=False)
