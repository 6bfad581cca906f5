"""Semantic segmentation: FCN heads on the project's backbones, COCO semantic masks, mIoU."""

from .model import SemanticSegmentor, build_segmenter

__all__ = ["SemanticSegmentor", "build_segmenter"]
