"""Fully convolutional segmentation heads (Long et al., "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015) on multi-stage backbone features."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones import ShapeSpec
from backbones.norm import make_norm


class FCNHead(nn.Module):
    """3x3 conv (to a quarter of the input channels) -> norm -> ReLU -> dropout -> 1x1 classifier, on one
    feature map; logits are upsampled bilinearly to the input size by the caller. The head of
    torchvision's FCN and of its auxiliary loss on ``res4``."""

    def __init__(self, in_channels: int, num_classes: int, norm: str = "BN", dropout: float = 0.1,
                 channels: int | None = None):
        super().__init__()
        channels = channels or in_channels // 4
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.norm = make_norm(norm, channels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(F.relu(self.norm(self.conv(x)))))


class SegmentationHead(nn.Module):
    """Class logits at a backbone's finest requested stride, from the ``in_features`` of a backbone.

    ``in_features`` = one feature (e.g. ``res5`` of a dilated ResNet at output stride 8): an FCN head.
    More features, coarse to fine (``res5, res4, res3`` of an undilated ResNet): FCN-32s/16s/8s skip
    fusion: the coarsest map goes through the FCN head, each finer map through a 1x1 score layer
    (zero-initialized, as the paper's staged training starts), and the running score map is upsampled
    bilinearly (x2) and added to it. Channels and strides come from the backbone's ``output_shape()``.
    """

    def __init__(self, input_shapes: dict[str, ShapeSpec], in_features: Sequence[str], num_classes: int,
                 norm: str = "BN", dropout: float = 0.1):
        super().__init__()
        missing = [f for f in in_features if f not in input_shapes]
        if missing or not in_features:
            raise ValueError(f"segmentation head in_features {list(in_features)}: {missing} are not among the "
                             f"backbone outputs {list(input_shapes)}")
        strides = [input_shapes[f].stride for f in in_features]
        if any(fine >= coarse for coarse, fine in zip(strides, strides[1:])):
            raise ValueError(f"FCN skip features must go from coarse to fine strides, got {dict(zip(in_features, strides))}")
        self.in_features = list(in_features)
        self.head = FCNHead(input_shapes[in_features[0]].channels, num_classes, norm, dropout)
        self.skips = nn.ModuleList(nn.Conv2d(input_shapes[f].channels, num_classes, 1) for f in in_features[1:])
        for score in self.skips:
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
        self.stride = strides[-1]

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = self.head(features[self.in_features[0]])
        for name, score in zip(self.in_features[1:], self.skips):
            skip = score(features[name])
            scores = skip + F.interpolate(scores, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return scores  # (N, K, H / stride, W / stride)
