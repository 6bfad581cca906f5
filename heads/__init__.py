"""Heads: what turns backbone features into proposals, boxes and class scores (and their losses)."""

from .anchors import AnchorGenerator
from .boxes import BoxCoder, Matcher, box_loss, sample_balanced
from .detections import Detections
from .roi_heads import FastRCNNPredictor, FCBoxHead, Res5BoxHead, RoIHeads, RoIPooler, torchvision_roi_align
from .rpn import RPN, RPNHead

__all__ = [
    "AnchorGenerator",
    "BoxCoder",
    "Detections",
    "FCBoxHead",
    "FastRCNNPredictor",
    "Matcher",
    "RPN",
    "RPNHead",
    "Res5BoxHead",
    "RoIHeads",
    "RoIPooler",
    "box_loss",
    "sample_balanced",
    "torchvision_roi_align",
]
