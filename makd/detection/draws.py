"""A detector's random draws in training, made per image: which anchors the RPN and which proposals the RoI heads
sample, and the multi-scale size. torchvision draws them for a batch's images in turn from the global generator,
so what an image gets depends on which images share its batch; here each image draws from its own seed (a function
of the run's seed, the epoch and the image), so a batch split over DDP processes or micro-batches draws what one
process draws for the whole batch, and N processes train as one (tests/test_detection_cli.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from makd.engine.seeding import seed_step


class PerImageSampler(BalancedPositiveNegativeSampler):
    """torchvision's positive/negative sampler, run for each image with the generator seeded by the image's seed."""

    def __init__(self, stock: BalancedPositiveNegativeSampler) -> None:
        super().__init__(stock.batch_size_per_image, stock.positive_fraction)
        self.seeds: Sequence[int] | None = None

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if self.seeds is None:
            return super().__call__(matched_idxs)
        positive, negative = [], []
        for matched, seed in zip(matched_idxs, self.seeds, strict=True):
            with torch.random.fork_rng(devices=[matched.device] if matched.device.type == "cuda" else []):
                seed_step(seed, matched.device)
                p, n = super().__call__([matched])
            positive += p
            negative += n
        return positive, negative


class PerImageTransform(GeneralizedRCNNTransform):
    """torchvision's resize-and-batch transform whose multi-scale choice draws from each image's own seed."""

    seeds: Sequence[int] | None = None
    _draws: Iterator[int] | None = None

    @classmethod
    def like(cls, stock: GeneralizedRCNNTransform) -> "PerImageTransform":
        return cls(stock.min_size, stock.max_size, stock.image_mean, stock.image_std, stock.size_divisible,
                   stock.fixed_size, _skip_resize=stock._skip_resize)

    def forward(self, images: list[Tensor], targets: Any = None) -> Any:
        self._draws = None if self.seeds is None else iter(self.seeds)
        return super().forward(images, targets)

    def torch_choice(self, k: list[int]) -> int:
        if self._draws is None:
            return super().torch_choice(k)
        generator = torch.Generator().manual_seed(next(self._draws))
        return k[int(torch.empty(1).uniform_(0.0, float(len(k)), generator=generator).item())]


def per_image_draws(model: nn.Module) -> list[Any]:
    """Give `model` (a torchvision detector) per-image draws; returns what `image_draws` seeds."""
    seeded: list[Any] = []
    if isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform):
        model.transform = PerImageTransform.like(model.transform)
        seeded.append(model.transform)
    for owner in (getattr(model, "rpn", None), getattr(model, "roi_heads", None)):
        if isinstance(getattr(owner, "fg_bg_sampler", None), BalancedPositiveNegativeSampler):
            owner.fg_bg_sampler = PerImageSampler(owner.fg_bg_sampler)
            seeded.append(owner.fg_bg_sampler)
    return seeded


@contextmanager
def image_draws(seeded: list[Any], seeds: Sequence[int]) -> Iterator[None]:
    """During one training forward: the images' seeds, in the batch's order."""
    for part in seeded:
        part.seeds = seeds
    try:
        yield
    finally:
        for part in seeded:
            part.seeds = None
