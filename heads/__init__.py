"""Heads: what turns backbone features into proposals, boxes, class scores and instance masks (and their losses)."""

from .anchors import AnchorGenerator
from .boxes import BoxCoder, Matcher, box_loss, sample_balanced
from .detections import Detections
from .mask_head import MASK_RULES, MaskHead, paste_masks
from .roi_heads import FastRCNNPredictor, FCBoxHead, Res5BoxHead, RoIHeads, RoIPooler, torchvision_roi_align
from .rpn import RPN, RPNHead

__all__ = [
    "AnchorGenerator",
    "BoxCoder",
    "Detections",
    "FCBoxHead",
    "FastRCNNPredictor",
    "MASK_RULES",
    "MaskHead",
    "Matcher",
    "RPN",
    "RPNHead",
    "Res5BoxHead",
    "RoIHeads",
    "RoIPooler",
    "box_loss",
    "paste_masks",
    "sample_balanced",
    "torchvision_roi_align",
]
