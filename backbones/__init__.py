"""Backbones: the paper's ResNet family, FPN and timm models behind one contract.

``forward(images) -> dict[str, Tensor]``, ``output_shape() -> dict[str, ShapeSpec(channels, stride)]``,
``size_divisibility``.
"""

from .base import Backbone, ShapeSpec
from .build import build_backbone
from .fpn import FPN
from .norm import CONV_NORMS, NormedConv2d, batch_norm_over, conv2d, freeze, freeze_batchnorm, make_norm
from .resnet import IMAGENET_DEPTHS, ResNet, depth_spec
from .timm_backbone import TimmBackbone
from .weights import LoadReport, load_pretrained

__all__ = [
    "Backbone",
    "CONV_NORMS",
    "FPN",
    "IMAGENET_DEPTHS",
    "LoadReport",
    "NormedConv2d",
    "ResNet",
    "ShapeSpec",
    "TimmBackbone",
    "batch_norm_over",
    "build_backbone",
    "conv2d",
    "depth_spec",
    "freeze",
    "freeze_batchnorm",
    "load_pretrained",
    "make_norm",
]
