"""Load detector weights: this project's own checkpoints or torchvision's Faster R-CNN checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from backbones.weights import map_torchvision_resnet_key, read_checkpoint, remap_keys, strict_load

from .model import FasterRCNN


def _map_torchvision_detection_key(key: str) -> str | None:
    """torchvision ``fasterrcnn_resnet50_fpn`` key -> this project's FPN Faster R-CNN key."""
    if key.startswith("backbone.body."):
        mapped = map_torchvision_resnet_key(key[len("backbone.body."):])
        return f"backbone.bottom_up.{mapped}" if mapped else None
    rules = [
        (r"^backbone\.fpn\.inner_blocks\.(\d+)\.0\.(weight|bias)$", r"backbone.lateral_convs.\1.\2"),
        (r"^backbone\.fpn\.layer_blocks\.(\d+)\.0\.(weight|bias)$", r"backbone.output_convs.\1.\2"),
        # older torchvision releases stored FPN convs without the ".0"
        (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(weight|bias)$", r"backbone.lateral_convs.\1.\2"),
        (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(weight|bias)$", r"backbone.output_convs.\1.\2"),
        (r"^rpn\.head\.conv\.0\.0\.(weight|bias)$", r"rpn.head.conv.\1"),
        (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.\1"),
        (r"^rpn\.head\.cls_logits\.(weight|bias)$", r"rpn.head.objectness.\1"),
        (r"^rpn\.head\.bbox_pred\.(weight|bias)$", r"rpn.head.deltas.\1"),
        (r"^roi_heads\.box_head\.fc6\.(weight|bias)$", r"roi_heads.box_head.fcs.0.\1"),
        (r"^roi_heads\.box_head\.fc7\.(weight|bias)$", r"roi_heads.box_head.fcs.1.\1"),
        (r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$", r"roi_heads.predictor.\1.\2"),
    ]
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def detect_detector_format(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("backbone.body.") for k in state) and any(k.startswith("roi_heads.box_predictor.") for k in state):
        return "torchvision-detection"
    return "native"


def load_detector_weights(model: FasterRCNN, path: str | Path) -> str:
    """Load a checkpoint file into ``model`` strictly; returns the detected format.

    Accepts this project's checkpoints (``model.safetensors`` of a run, or a state dict) and torchvision's
    ``fasterrcnn_resnet50_fpn`` checkpoints (e.g. ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``).
    """
    state = read_checkpoint(path)
    fmt = detect_detector_format(state)
    unexpected: list[str] = []
    if fmt == "torchvision-detection":
        state, unexpected = remap_keys(state, _map_torchvision_detection_key)
    hint = "is model.num_classes right? torchvision's COCO detectors have 90 classes + background"
    strict_load(model, state, str(path), fmt, unexpected, hint)
    return fmt
