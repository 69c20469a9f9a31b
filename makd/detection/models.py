"""Detectors by name (`detection.model.name`), each with the per-box aspect head of makd/detection/heads.py:

- `tiny`: a ~0.34 M-parameter Faster R-CNN for the offline canvases (a 3-stage stride-8 GroupNorm CNN, 9 anchors,
  RoIAlign 5x5, a 128-d TwoMLPHead), trains on 2 CPU cores in seconds per epoch;
- `fasterrcnn_resnet18_fpn`, `fasterrcnn_resnet50_fpn`, `fasterrcnn_mobilenet_v3_large_fpn`, `fcos_resnet50_fpn`:
  torchvision's architectures, with backbone weights from a local file (a state dict of the torchvision
  classifier, .pth/.pt loaded with weights_only, or .safetensors) or a torchvision weights name
  (e.g. `IMAGENET1K_V1`, downloaded where a network exists).

Images go in as floats in [0, 1]; `GeneralizedRCNNTransform` normalises and resizes them (min_size a list =
multi-scale training; the last entry is the test size).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, mobilenet_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from makd.detection.heads import AspectFCOSHead, AspectRoIHeads
from makd.errors import MakdError
from makd.registry import Registry
from makd.validation import validate


class DetectorOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = "tiny"
    backbone_weights: str | None = pydantic.Field(None, description="local state-dict file, or a torchvision weights name")
    trainable_layers: int = pydantic.Field(3, ge=0, le=5, description="backbone stages trained (the rest frozen)")
    min_size: int | list[int] = pydantic.Field(128, description="shorter side; a list = multi-scale training, last = test")
    max_size: int = pydantic.Field(128, ge=8)
    width: int = pydantic.Field(16, ge=4, description="tiny: channels of the first stage (x2 per stage)")
    representation_size: int = pydantic.Field(128, ge=8, description="tiny: size of the box head's features")
    kwargs: dict[str, Any] = pydantic.Field(default_factory=dict, description="torchvision constructor arguments, e.g. "
                                            "{box_batch_size_per_image: 128, rpn_post_nms_top_n_train: 300}")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.min_size) if isinstance(self.min_size, list) else (self.min_size,)


def detector_options(model: dict[str, Any]) -> DetectorOptions:
    options = validate(DetectorOptions, model, "detection.model")
    DETECTORS.get(options.name)  # an unknown name is an error now, naming the choices
    return options


Builder = Callable[[DetectorOptions, int, int, int, tuple, tuple], nn.Module]
DETECTORS: Registry[Builder] = Registry("detector", "detection.model.name", modules=("makd.detection.models",))


def build_detector(options: DetectorOptions, num_classes: int, num_aspects: int, in_chans: int,
                   mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module:
    """num_classes without the background (torchvision's label 0); the aspect head's layers are created last, so the
    rest of a detector with and without aspects starts from the same weights under the same seed."""
    return DETECTORS.get(options.name)(options, num_classes + 1, num_aspects, in_chans, tuple(mean), tuple(std))


def _transform_args(o: DetectorOptions, mean: tuple, std: tuple) -> dict[str, Any]:
    return {"min_size": o.sizes, "max_size": o.max_size, "image_mean": list(mean), "image_std": list(std)}


def _with_aspects(model: FasterRCNN, representation_size: int, num_aspects: int) -> FasterRCNN:
    model.roi_heads = AspectRoIHeads(model.roi_heads, representation_size, num_aspects)
    return model


def _kwargs(o: DetectorOptions, defaults: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **o.kwargs}


# -- the tiny detector of the offline default -------------------------------------------------------------------
class TinyBackbone(nn.Sequential):
    """Three stride-2 stages of 3x3 convs (one in the first, two in the others) with GroupNorm (no batch
    statistics: small batches, DDP-safe); stride 8, 4 x width channels."""

    def __init__(self, in_chans: int, width: int) -> None:
        layers: list[nn.Module] = []
        c = in_chans
        for stage in range(3):
            out = width * 2**stage
            for k in range(1 if stage == 0 else 2):
                layers += [nn.Conv2d(c, out, 3, stride=2 if k == 0 else 1, padding=1, bias=False),
                           nn.GroupNorm(min(8, out // 4), out), nn.ReLU(inplace=True)]
                c = out
        super().__init__(*layers)
        self.out_channels = c


@DETECTORS.register("tiny")
def tiny(o: DetectorOptions, num_classes: int, num_aspects: int, in_chans: int, mean: tuple, std: tuple) -> nn.Module:
    if o.backbone_weights:
        raise MakdError("detection.model.backbone_weights: the tiny detector has no pretrained weights")
    backbone = TinyBackbone(in_chans, o.width)
    anchors = AnchorGenerator(sizes=((24, 40, 64),), aspect_ratios=((0.5, 1.0, 2.0),))
    # Items span 3-7 cells of the stride-8 map: a 5x5 RoIAlign with one sample per bin sees them whole, and its CPU
    # backward (the step's largest cost at 7x7) is half as long.
    pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=5, sampling_ratio=1)
    head = TwoMLPHead(backbone.out_channels * 5 * 5, o.representation_size)
    defaults = {"rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300, "rpn_pre_nms_top_n_test": 300,
                "rpn_post_nms_top_n_test": 100, "rpn_batch_size_per_image": 128, "box_batch_size_per_image": 64,
                "box_detections_per_img": 50}
    model = FasterRCNN(backbone, None, rpn_anchor_generator=anchors, box_roi_pool=pool, box_head=head,
                       box_predictor=FastRCNNPredictor(o.representation_size, num_classes),
                       **_transform_args(o, mean, std), **_kwargs(o, defaults))
    return _with_aspects(model, o.representation_size, num_aspects)


# -- torchvision architectures ----------------------------------------------------------------------------------
def backbone_state(value: str, family: str) -> dict[str, Tensor]:
    """A torchvision classifier's state dict from a local file or a weights name (`IMAGENET1K_V1` or the full
    `ResNet50_Weights.IMAGENET1K_V1`); a download that cannot happen is one line."""
    path = Path(value)
    if path.suffix in (".pth", ".pt", ".safetensors", ".bin") or path.exists():
        if not path.is_file():
            raise MakdError(f"detection.model.backbone_weights: file not found: {path}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file, or one weights_only refuses to unpickle
            raise MakdError(f"detection.model.backbone_weights: cannot load {path}: {str(exc).splitlines()[0]}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise MakdError(f"detection.model.backbone_weights: {path} holds no state dict")
        return state
    from torchvision.models import get_weight

    name = value if "." in value else f"{family}.{value}"
    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise MakdError(f"detection.model.backbone_weights: unknown torchvision weights {name!r} (or a file that does not exist)") from None
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # no network: urllib raises URLError/OSError
        raise MakdError(f"detection.model.backbone_weights: cannot download {name} ({type(exc).__name__}); "
                        f"no network? download it elsewhere and give the local file") from None


def _load_backbone(module: nn.Module, o: DetectorOptions, family: str) -> None:
    """Load classifier weights into a feature extractor built from that classifier (its head is left out)."""
    if not o.backbone_weights:
        return
    state = backbone_state(o.backbone_weights, family)
    own = module.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(matched) < 0.9 * len(own):
        raise MakdError(f"detection.model.backbone_weights: {o.backbone_weights} matches only {len(matched)} of the "
                        f"{len(own)} backbone tensors (is it a {family.split('_')[0]} state dict?)")
    module.load_state_dict(matched, strict=False)


def _resnet(depth: int, o: DetectorOptions) -> nn.Module:
    from torchvision import models
    from torchvision.ops import misc

    # Frozen batch norm when starting from pretrained weights (torchvision's choice); plain otherwise.
    norm = misc.FrozenBatchNorm2d if o.backbone_weights else nn.BatchNorm2d
    net = getattr(models, f"resnet{depth}")(weights=None, norm_layer=norm)
    _load_backbone(net, o, f"ResNet{depth}_Weights")
    return net


def _check_rgb(name: str, in_chans: int) -> None:
    if in_chans != 3:
        raise MakdError(f"detection.model.name {name}: torchvision backbones take RGB images (got {in_chans} channel)")


def _fasterrcnn_resnet(depth: int) -> Builder:
    def build(o: DetectorOptions, num_classes: int, num_aspects: int, in_chans: int, mean: tuple, std: tuple) -> nn.Module:
        _check_rgb(f"fasterrcnn_resnet{depth}_fpn", in_chans)
        backbone = _resnet_fpn_extractor(_resnet(depth, o), o.trainable_layers if o.backbone_weights else 5)
        model = FasterRCNN(backbone, num_classes, **_transform_args(o, mean, std), **o.kwargs)
        return _with_aspects(model, 1024, num_aspects)
    return build


DETECTORS.register("fasterrcnn_resnet18_fpn")(_fasterrcnn_resnet(18))
DETECTORS.register("fasterrcnn_resnet50_fpn")(_fasterrcnn_resnet(50))


@DETECTORS.register("fasterrcnn_mobilenet_v3_large_fpn")
def fasterrcnn_mobilenet(o: DetectorOptions, num_classes: int, num_aspects: int, in_chans: int, mean: tuple,
                         std: tuple) -> nn.Module:
    from torchvision import models
    from torchvision.ops import misc

    _check_rgb("fasterrcnn_mobilenet_v3_large_fpn", in_chans)
    net = models.mobilenet_v3_large(weights=None, norm_layer=misc.FrozenBatchNorm2d if o.backbone_weights else nn.BatchNorm2d)
    _load_backbone(net, o, "MobileNet_V3_Large_Weights")
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                                  trainable_layers=o.trainable_layers if o.backbone_weights else 6)
    backbone.body.load_state_dict({k.removeprefix("features."): v for k, v in net.state_dict().items()
                                   if k.startswith("features.")}, strict=False)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    model = FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **_transform_args(o, mean, std),
                       **_kwargs(o, {"rpn_score_thresh": 0.05}))
    return _with_aspects(model, 1024, num_aspects)


class AspectFCOS(FCOS):
    """FCOS whose detections also carry the aspect logits of the location each came from."""

    def postprocess_detections(self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        if "aspect_logits" not in head_outputs:
            return super().postprocess_detections(head_outputs, anchors, image_shapes)
        detections = []
        for index, image_shape in enumerate(image_shapes):
            found: dict[str, list[Tensor]] = {"boxes": [], "scores": [], "labels": [], "aspect_logits": []}
            levels = [[t[index] for t in head_outputs[k]] for k in ("bbox_regression", "cls_logits", "bbox_ctrness",
                                                                      "aspect_logits")]
            for regression, logits, ctrness, aspects, level_anchors in zip(*levels, anchors[index]):
                num_classes = logits.shape[-1]
                scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(ctrness)).flatten()
                keep = scores > self.score_thresh
                scores, topk = scores[keep], torch.where(keep)[0]
                scores, idxs = scores.topk(det_utils._topk_min(topk, self.topk_candidates, 0))
                topk = topk[idxs]
                where = torch.div(topk, num_classes, rounding_mode="floor")
                boxes = self.box_coder.decode(regression[where], level_anchors[where])
                found["boxes"].append(box_ops.clip_boxes_to_image(boxes, image_shape))
                found["scores"].append(scores)
                found["labels"].append(topk % num_classes)
                found["aspect_logits"].append(aspects[where])
            image = {k: torch.cat(v) for k, v in found.items()}
            keep = box_ops.batched_nms(image["boxes"], image["scores"], image["labels"], self.nms_thresh)
            detections.append({k: v[keep[: self.detections_per_img]] for k, v in image.items()})
        return detections


@DETECTORS.register("fcos_resnet50_fpn")
def fcos_resnet50(o: DetectorOptions, num_classes: int, num_aspects: int, in_chans: int, mean: tuple, std: tuple) -> nn.Module:
    _check_rgb("fcos_resnet50_fpn", in_chans)
    backbone = _resnet_fpn_extractor(_resnet(50, o), o.trainable_layers if o.backbone_weights else 5,
                                     returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    # FCOS counts classes without a background: its label k is makd's class k - 1 (label 0 is never predicted).
    model = AspectFCOS(backbone, num_classes, **_transform_args(o, mean, std), **o.kwargs)
    model.head = AspectFCOSHead(backbone.out_channels, 1, num_classes, num_aspects)
    return model


# -- what the task, evaluation and prediction call --------------------------------------------------------------
def aspect_module(model: nn.Module) -> nn.Module | None:
    """The module holding the aspect head and its loss options (None without aspects)."""
    owner = model.roi_heads if isinstance(model, FasterRCNN) else model.head
    return owner if getattr(owner, "num_aspects", 0) else None


@torch.no_grad()
def ground_truth_aspects(model: nn.Module, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
    """Aspect logits of the given (ground-truth) boxes of each image, from the detector's region features
    (Faster R-CNN); the aspect head's answer about exactly the box the teacher saw."""
    if not isinstance(model, FasterRCNN):
        raise MakdError("aspect agreement on ground-truth boxes needs a Faster R-CNN detector (RoI features)")
    transformed, targets = model.transform(images, [{"boxes": b} for b in boxes])
    features = model.backbone(transformed.tensors)
    if isinstance(features, Tensor):
        features = OrderedDict([("0", features)])
    return model.roi_heads.box_aspects(features, [t["boxes"] for t in targets], transformed.image_sizes)
