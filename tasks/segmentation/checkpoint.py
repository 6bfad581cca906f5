"""Load segmentation weights: this project's checkpoints or torchvision's FCN checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

from backbones.weights import map_torchvision_resnet_key, read_checkpoint, remap_keys, strict_load

from .model import SemanticSegmentor

_HEAD_PARTS = {"0": "conv", "1": "norm", "4": "classifier"}


def map_torchvision_fcn_key(key: str) -> str | None:
    """torchvision ``fcn_resnet50/101`` key -> this project's ``fcn`` layout key."""
    if key.startswith("backbone."):
        mapped = map_torchvision_resnet_key(key[len("backbone."):])
        return f"backbone.{mapped}" if mapped else None
    if m := re.match(r"^(classifier|aux_classifier)\.([014])\.(.*)$", key):
        prefix = "head.head" if m[1] == "classifier" else "aux_head"
        return f"{prefix}.{_HEAD_PARTS[m[2]]}.{m[3]}"
    return None


def load_segmenter_weights(model: SemanticSegmentor, path: str | Path) -> str:
    """Load a checkpoint file into ``model`` strictly; returns the detected format (``native`` or
    ``torchvision-fcn``, e.g. ``fcn_resnet101_coco-7ecb50ca.pth``)."""
    state = read_checkpoint(path)
    unexpected: list[str] = []
    fmt = "torchvision-fcn" if any(k.startswith("classifier.4.") for k in state) else "native"
    if fmt == "torchvision-fcn":
        state, unexpected = remap_keys(state, map_torchvision_fcn_key)
    hint = "is model.num_classes right? torchvision's FCN checkpoints have 21 classes (background + VOC)"
    strict_load(model, state, str(path), fmt, unexpected, hint)
    return fmt
