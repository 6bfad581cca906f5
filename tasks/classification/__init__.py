"""Image classification: any backbone + global average pooling + fc, image folders or CIFAR, top-1/top-5."""

from .model import ImageClassifier, build_classifier

__all__ = ["ImageClassifier", "build_classifier"]
