"""Load classifier weights: this project's classification checkpoints, or a torchvision / timm ImageNet
ResNet classifier whole (backbone and ``fc``)."""

from __future__ import annotations

from pathlib import Path

from backbones import ResNet
from backbones.weights import (
    _check_resnet_layout,
    fetch_named_weights,
    is_weights_name,
    keep_new_heads,
    map_torchvision_resnet_key,
    read_checkpoint,
    remap_keys,
    strict_load,
)

from .model import ImageClassifier

HEAD_KEYS = ("fc.weight", "fc.bias")


def _map_torchvision_classifier_key(key: str) -> str | None:
    """torchvision (or timm) ``resnet*`` key -> this project's classifier key."""
    if key in HEAD_KEYS:
        return key
    mapped = map_torchvision_resnet_key(key)
    return f"backbone.{mapped}" if mapped else None


def detect_classifier_format(state: dict) -> str:
    """``torchvision-resnet`` (``conv1.weight``, ``layer1.*``, ``fc.*``) or ``native``."""
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        return "torchvision-resnet"
    return "native"


def load_classifier_weights(model: ImageClassifier, source: str | Path, new_classes: bool = False) -> str:
    """Load a whole classifier into ``model`` strictly; returns the detected format.

    ``source`` is a file (a run's ``model.safetensors``, a torchvision ``resnet*.pth``) or a name such as
    ``torchvision:resnet50.IMAGENET1K_V1``. ``new_classes=True`` (fine-tuning on other classes) leaves the
    ``fc`` layer initialised where its shape differs from the checkpoint's, and logs it; every other
    tensor still loads strictly."""
    source = str(source)
    state = fetch_named_weights(source) if is_weights_name(source) else read_checkpoint(source)
    fmt = detect_classifier_format(state)
    unexpected: list[str] = []
    if fmt == "torchvision-resnet":
        if isinstance(model.backbone, ResNet):  # same shapes whatever the layout: check that it is theirs
            _check_resnet_layout(model.backbone, source, stride_in_1x1=False)
        state, unexpected = remap_keys(state, _map_torchvision_classifier_key)
    if new_classes:
        keep_new_heads(model, state, HEAD_KEYS)
    hint = ("is model.num_classes right? To fine-tune on other classes, start training from these weights with "
            "model.weights, or give them to model.backbone.weights")
    strict_load(model, state, source, fmt, unexpected, hint)
    return fmt
