"""Object detection: Faster R-CNN (FPN, C4, DC5) on the project's backbones, COCO data."""

from .model import FasterRCNN, build_detector

__all__ = ["FasterRCNN", "build_detector"]
