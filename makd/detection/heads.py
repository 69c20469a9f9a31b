"""Per-box aspect heads and their loss, inside torchvision's detectors.

- Faster R-CNN: `AspectRoIHeads` adds `aspect_score = Linear(representation_size, Q)` beside the box predictor's
  `cls_score`, on the `box_head` output. Training reuses `select_training_samples`' labels and matched_idxs: the
  loss is on positive RoIs only (label > 0, i.e. IoU >= the foreground threshold, ground-truth boxes included), as
  torchvision's mask branch does. With Q = 0 the forward pass is the stock one, term for term.
- FCOS: `AspectFCOSHead` adds a Q-channel 3x3 conv on the classification tower; the loss is on foreground
  locations (matched_idxs >= 0).

Both use `aspect_box_loss`: mean BCE-with-logits against sigmoid(teacher log-odds of the matched box / T), each
(box, question) weighted by whether the box has a teacher answer (`aspect_weight`: 0 without a row, and for pairs
the store flags as bounds) and, with mass weighting, by the answer mass.
Targets carry per-box `aspect_logodds` [n, Q], `aspect_mass` [n, Q] and `aspect_weight` [n, Q].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from makd.losses import shared_denominator


def aspect_box_loss(logits: Tensor, matched: list[Tensor], targets: list[dict[str, Tensor]], temperature: float = 1.0,
                    mass_weighting: bool = False) -> Tensor:
    """logits [P, Q] of the positive RoIs/locations of all images, in image order; matched[i] the ground-truth
    index of image i's positives. Images without positives, or whose boxes have no teacher rows, add nothing."""
    q = logits.shape[-1]
    rows = [t["aspect_logodds"][m] for t, m in zip(targets, matched)]
    weights = [t["aspect_weight"][m] for t, m in zip(targets, matched)]
    if mass_weighting:
        weights = [w * t["aspect_mass"][m] for w, t, m in zip(weights, targets, matched)]
    target = torch.sigmoid(torch.cat(rows).float() / temperature) if rows else logits.new_zeros((0, q))
    weight = torch.cat(weights).float() if weights else logits.new_zeros((0, q))
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    # Normalised by the weight of the global batch (DDP); `logits.sum() * 0` keeps the head in the graph when nothing
    # is positive (DDP needs every parameter used).
    return (bce * weight).sum() / shared_denominator(weight.sum()).clamp_min(1e-12) + logits.sum() * 0


class AspectRoIHeads(RoIHeads):
    """torchvision's RoIHeads (boxes only) with a per-box aspect head on the box head's features."""

    def __init__(self, stock: RoIHeads, representation_size: int, num_aspects: int) -> None:
        if stock.has_mask() or stock.has_keypoint():
            raise ValueError("aspect heads are for box detectors (no mask or keypoint branch)")
        super().__init__(stock.box_roi_pool, stock.box_head, stock.box_predictor,
                         stock.proposal_matcher.high_threshold, stock.proposal_matcher.low_threshold,
                         stock.fg_bg_sampler.batch_size_per_image, stock.fg_bg_sampler.positive_fraction,
                         stock.box_coder.weights, stock.score_thresh, stock.nms_thresh, stock.detections_per_img)
        self.num_aspects = num_aspects
        self.aspect_score = nn.Linear(representation_size, num_aspects) if num_aspects else None
        self.aspect_options: dict = {}  # temperature, mass_weighting (set by the task from loss.aspect_bce)

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
            if self.aspect_score is not None:
                positive = torch.cat(labels) > 0
                matched = [m[lab > 0] for m, lab in zip(matched_idxs, labels)]
                losses["loss_aspect"] = aspect_box_loss(self.aspect_score(box_features[positive]), matched, targets,
                                                        **self.aspect_options)
            return [], losses
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        result = [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels)]
        if self.aspect_score is not None:
            for r, a in zip(result, self.box_aspects(features, boxes, image_shapes)):
                r["aspect_logits"] = a
        return result, {}

    def box_aspects(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """Aspect logits of given boxes (detections, or ground truth), from their region features."""
        if self.aspect_score is None:
            raise ValueError("this detector has no aspect head")
        feats = self.box_head(self.box_roi_pool(features, boxes, image_shapes))
        logits = self.aspect_score(feats)
        return [logits] if len(boxes) == 1 else list(logits.split([len(b) for b in boxes]))  # one image: traceable


class AspectFCOSHead(FCOSHead):
    """FCOS's head with a Q-channel conv on the classification tower, trained where locations are foreground."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_aspects: int, num_convs: int = 4) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_convs)
        self.num_aspects = num_aspects
        self.aspect_options: dict = {}
        self.aspect_logits = None
        if num_aspects:
            self.aspect_logits = nn.Conv2d(in_channels, num_anchors * num_aspects, kernel_size=3, stride=1, padding=1)
            nn.init.normal_(self.aspect_logits.weight, std=0.01)
            nn.init.zeros_(self.aspect_logits.bias)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        if self.aspect_logits is None:
            return super().forward(x)
        head = self.classification_head
        cls, aspects = [], []
        for features in x:
            tower = head.conv(features)
            cls.append(_per_location(head.cls_logits(tower), head.num_classes))
            aspects.append(_per_location(self.aspect_logits(tower), self.num_aspects))
        bbox_regression, bbox_ctrness = self.regression_head(x)
        return {"cls_logits": torch.cat(cls, 1), "bbox_regression": bbox_regression, "bbox_ctrness": bbox_ctrness,
                "aspect_logits": torch.cat(aspects, 1)}

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor],
                     matched_idxs: list[Tensor]) -> dict[str, Tensor]:
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        if self.aspect_logits is not None:
            logits = head_outputs["aspect_logits"]  # [N, HWA, Q]
            foreground = torch.stack(matched_idxs) >= 0
            matched = [m[m >= 0] for m in matched_idxs]
            losses["aspect"] = aspect_box_loss(logits[foreground], matched, targets, **self.aspect_options)
        return losses


def _per_location(t: Tensor, channels: int) -> Tensor:
    """(N, A*K, H, W) -> (N, HWA, K), as torchvision's FCOS heads lay out their outputs."""
    n, _, h, w = t.shape
    return t.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels)
