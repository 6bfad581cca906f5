"""Backbones: the paper's ResNet family, FPN and timm models behind one contract.

``forward(images) -> dict[str, Tensor]``, ``output_shape() -> dict[str, ShapeSpec(channels, stride)]``,
``size_divisibility``.
"""

from .base import Backbone, ShapeSpec
from .build import build_backbone
from .fpn import FPN
from .norm import freeze, freeze_batchnorm, make_norm
from .resnet import IMAGENET_DEPTHS, ResNet, depth_spec
from .timm_backbone import TimmBackbone
from .weights import LoadReport, load_pretrained

__all__ = [
    "Backbone",
    "FPN",
    "IMAGENET_DEPTHS",
    "LoadReport",
    "ResNet",
    "ShapeSpec",
    "TimmBackbone",
    "build_backbone",
    "depth_spec",
    "freeze",
    "freeze_batchnorm",
    "load_pretrained",
    "make_norm",
]
