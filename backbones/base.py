"""The backbone contract every feature extractor of the project follows.

A backbone maps a batch of images ``(N, C, H, W)`` to a dict of named feature maps, and declares, when it
is built, the channels and stride of every map it returns (``output_shape()``). Heads are built from that
declaration, never from channel counts typed by hand.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class ShapeSpec(NamedTuple):
    """Channels and stride (input pixels per feature pixel) of one feature map."""

    channels: int
    stride: int


class Backbone(nn.Module):
    """Base class: ``forward(images) -> dict[str, Tensor]`` plus declared shapes.

    Subclasses fill ``self._out_shapes`` (an ordered dict name -> ShapeSpec, from fine to coarse) while
    they build their layers.
    """

    _out_shapes: dict[str, ShapeSpec]

    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and stride of each returned feature map, in the order ``forward`` returns them."""
        return dict(self._out_shapes)

    @property
    def out_features(self) -> list[str]:
        return list(self._out_shapes)

    @property
    def size_divisibility(self) -> int:
        """Input height and width must be multiples of this (0: any size works).

        A plain ResNet accepts any size (a map of stride s is ceil(H / s) high); a backbone that adds maps
        of different levels (FPN) needs exact halving and declares its largest input stride.
        """
        return 0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
