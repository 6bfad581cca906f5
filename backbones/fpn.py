"""Feature Pyramid Network (Lin et al., CVPR 2017) as a backbone wrapping a bottom-up backbone."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, ShapeSpec
from .norm import conv2d

TOP_BLOCKS = ("maxpool", "conv", "none")


class FPN(Backbone):
    """Top-down pathway with lateral connections over the ``in_features`` of ``bottom_up``.

    Each input map gets a 1x1 lateral conv to ``out_channels``; from the coarsest level down, the running
    top-down map is upsampled (nearest, to the lateral's size) and added to the lateral; a 3x3 conv then
    gives the output ``p<k>`` where ``2**k`` is the input's stride (res2 at stride 4 -> p2). An extra
    coarser level ``p<k+1>`` comes from the coarsest output by a stride-2 max-pool (``top_block="maxpool"``,
    Faster R-CNN) or a stride-2 3x3 conv (``"conv"``, RetinaNet style); ``"none"`` adds nothing.

    ``norm`` ("" none, "BN", "FrozenBN", "SyncBN", "GN") follows each lateral and each output convolution,
    which then have no bias, as detectron2's FPN has it (``MODEL.FPN.NORM``; its parameters
    ``fpn_lateral2.norm.*`` are ``lateral_convs.0.norm.*`` here); the ``"conv"`` top block has none.

    Channels and strides come from ``bottom_up.output_shape()``; the input features must be a contiguous
    run of levels, each stride twice the previous one.
    """

    def __init__(
        self,
        bottom_up: Backbone,
        in_features: Sequence[str] | None = None,
        out_channels: int = 256,
        top_block: str = "maxpool",
        norm: str = "",
    ):
        super().__init__()
        bottom_shapes = bottom_up.output_shape()
        in_features = list(in_features) if in_features is not None else list(bottom_shapes)
        missing = [name for name in in_features if name not in bottom_shapes]
        if missing or not in_features:
            raise ValueError(
                f"FPN in_features {in_features}: {missing} not returned by the bottom-up backbone, whose "
                f"outputs are {list(bottom_shapes)} (add them to its out_features)"
            )
        strides = [bottom_shapes[name].stride for name in in_features]
        for prev, cur, name in zip(strides, strides[1:], in_features[1:]):
            if cur != 2 * prev:
                raise ValueError(
                    f"FPN in_features must be consecutive levels with doubling strides; {name} has stride "
                    f"{cur} after stride {prev} (strides {strides}; a dilated stage cannot feed an FPN level)"
                )
        if top_block not in TOP_BLOCKS:
            raise ValueError(f"unknown FPN top_block {top_block!r}; choose one of {', '.join(TOP_BLOCKS)}")

        self.bottom_up = bottom_up
        self.in_features = in_features
        self.lateral_convs = nn.ModuleList(
            conv2d(bottom_shapes[name].channels, out_channels, 1, norm) for name in in_features
        )
        self.output_convs = nn.ModuleList(
            conv2d(out_channels, out_channels, 3, norm, padding=1) for _ in in_features
        )
        self.top_block = top_block
        self.top_conv = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) if top_block == "conv" else None

        levels = [int(math.log2(stride)) for stride in strides]
        self._out_shapes = {f"p{level}": ShapeSpec(out_channels, 2**level) for level in levels}
        if top_block != "none":
            self._out_shapes[f"p{levels[-1] + 1}"] = ShapeSpec(out_channels, 2 ** (levels[-1] + 1))
        self._size_divisibility = strides[-1]

        for conv in [*self.lateral_convs, *self.output_convs, *([self.top_conv] if self.top_conv else [])]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        bottom = self.bottom_up(images)
        features = [bottom[name] for name in self.in_features]
        top_down = self.lateral_convs[-1](features[-1])
        outputs = [self.output_convs[-1](top_down)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output_convs[i](top_down))
        if self.top_block == "maxpool":
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        elif self.top_block == "conv":
            outputs.append(self.top_conv(outputs[-1]))
        return dict(zip(self._out_shapes, outputs))
