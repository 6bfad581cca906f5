"""Load detector weights: this project's own checkpoints, torchvision's and detectron2's Faster R-CNNs and
Mask R-CNNs.

Each foreign format is a key mapping (plus the few tensors laid out differently: the background class of
detectron2's box predictor and of torchvision's mask predictor, detectron2's RPN anchor order), then one
strict load: every tensor placed, every shape checked.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from backbones.errors import UserError
from backbones.weights import (
    fetch_named_weights,
    is_weights_name,
    keep_new_heads,
    map_by_rules,
    map_detectron2_resnet_key,
    map_torchvision_resnet_key,
    read_checkpoint,
    remap_keys,
    strict_load,
)

from .model import FasterRCNN

logger = logging.getLogger(__name__)

PREDICTOR_KEYS = tuple(f"roi_heads.predictor.{layer}.{p}" for layer in ("cls_score", "bbox_pred") for p in ("weight", "bias")) + (
    "roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias")  # the per-class parts
MASK_PREDICTOR_KEYS = PREDICTOR_KEYS[-2:]


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
        # maskrcnn_resnet50_fpn: MaskRCNNHeads (Conv2dNormActivation blocks; older releases: mask_fcn1..4)
        (r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$", r"roi_heads.mask_head.convs.\1.\2"),
        (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$", lambda m: f"roi_heads.mask_head.convs.{int(m[1]) - 1}.{m[2]}"),
        (r"^roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)$", r"roi_heads.mask_head.deconv.\1"),
        (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)$", r"roi_heads.mask_head.predictor.\1"),
    ]
    return map_by_rules(key, rules)


def _from_torchvision_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's mask predictor has a map for the background class too (index 0), which no detection
    reads (its labels are 1..K); ours has the K classes' maps only."""
    return {k: v[1:] if k in MASK_PREDICTOR_KEYS else v for k, v in state.items()}


def _map_detectron2_detection_key(key: str) -> str | None:
    """detectron2 ``GeneralizedRCNN`` key (FPN, C4 or DC5 Faster R-CNN) -> this project's key."""
    if key.startswith("backbone.bottom_up."):  # FPN: the ResNet under the FPN
        mapped = map_detectron2_resnet_key(key[len("backbone.bottom_up."):])
        return f"backbone.bottom_up.{mapped}" if mapped else None
    if m := re.match(r"^backbone\.fpn_(lateral|output)([2-5])\.(weight|bias|norm\.\w+)$", key):  # norm: FPN.NORM
        return f"backbone.{m[1]}_convs.{int(m[2]) - 2}.{m[3]}"
    if key.startswith("backbone."):  # C4, DC5: the ResNet itself
        mapped = map_detectron2_resnet_key(key[len("backbone."):])
        return f"backbone.{mapped}" if mapped else None
    if m := re.match(r"^roi_heads\.res5\.norm\.(\w+)$", key):  # C4: the norm after res5 (Res5ROIHeadsExtraNorm)
        return f"roi_heads.box_head.norm.{m[1]}"
    if key.startswith("roi_heads.res5."):  # C4: res5 is the box head
        mapped = map_detectron2_resnet_key(key[len("roi_heads."):])
        return f"roi_heads.box_head.{mapped}" if mapped else None
    return map_by_rules(key, [
        (r"^proposal_generator\.rpn_head\.conv\.(weight|bias)$", r"rpn.head.conv.\1"),
        (r"^proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)$", r"rpn.head.objectness.\1"),
        (r"^proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)$", r"rpn.head.deltas.\1"),
        (r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$", r"roi_heads.predictor.\1.\2"),
        (r"^roi_heads\.box_head\.fc(\d+)\.(weight|bias)$", lambda m: f"roi_heads.box_head.fcs.{int(m[1]) - 1}.{m[2]}"),
        # FastRCNNConvFCHead's convolutions (ROI_BOX_HEAD.NUM_CONV, with ROI_BOX_HEAD.NORM: conv1.norm.*)
        (r"^roi_heads\.box_head\.conv(\d+)\.(weight|bias|norm\.\w+)$",
         lambda m: f"roi_heads.box_head.convs.{int(m[1]) - 1}.{m[2]}"),
        (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias|norm\.\w+)$",
         lambda m: f"roi_heads.mask_head.convs.{int(m[1]) - 1}.{m[2]}"),
        (r"^roi_heads\.mask_head\.(deconv|predictor)\.(weight|bias)$", r"roi_heads.mask_head.\1.\2"),
    ])


def _from_detectron2_layout(model: FasterRCNN, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors detectron2 lays out differently, in this project's layout (``state`` in our names):

    - its class scores put the background last (ours: first), and its class-specific box deltas have no
      background slot (ours: four unused rows first, zero here);
    - its RPN orders a location's anchors size-major (for each size, each aspect ratio), ours ratio-major:
      the objectness and delta outputs are permuted to match (one anchor size per level, as with FPN,
      makes that the identity).
    """
    state = dict(state)
    for key in ("roi_heads.predictor.cls_score.weight", "roi_heads.predictor.cls_score.bias"):
        if key in state:
            state[key] = torch.cat([state[key][-1:], state[key][:-1]])
    for key in ("roi_heads.predictor.bbox_pred.weight", "roi_heads.predictor.bbox_pred.bias"):
        if key in state:
            state[key] = torch.cat([state[key].new_zeros((4, *state[key].shape[1:])), state[key]])
    generator = model.rpn.anchor_generator
    sizes, ratios = len(generator.sizes[0]), len(generator.aspect_ratios[0])
    order = torch.tensor([s * ratios + r for r in range(ratios) for s in range(sizes)])  # ours[i] = theirs[order[i]]
    for key in ("rpn.head.objectness.weight", "rpn.head.objectness.bias"):
        if key in state and state[key].shape[0] == len(order):
            state[key] = state[key][order]
    for key in ("rpn.head.deltas.weight", "rpn.head.deltas.bias"):
        if key in state and state[key].shape[0] == 4 * len(order):
            state[key] = state[key].view(len(order), 4, *state[key].shape[1:])[order].flatten(0, 1)
    return state


def _check_detectron2_normalization(model: FasterRCNN, state: dict[str, torch.Tensor], source: str) -> None:
    """Older detectron2 checkpoints store the input normalization; it must be the config's."""
    for name in ("pixel_mean", "pixel_std"):
        if name in state:
            theirs, ours = state.pop(name).flatten().float(), getattr(model, name).flatten().cpu()
            if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-3):
                raise UserError(f"weights {source} were trained with {name} {theirs.tolist()}, the config has "
                                f"model.{name} {ours.tolist()}: set model.{name} (and input_format/input_range) "
                                "to the checkpoint's")


def _check_mask_head(model: FasterRCNN, state: dict[str, torch.Tensor], source: str, new_classes: bool) -> None:
    """A checkpoint with a mask head for a model without one, or the other way round, is a ``UserError``
    saying which key to set; except that fine-tuning a Mask R-CNN from a Faster R-CNN (``new_classes``)
    starts its mask head initialised (logged), the rest loading strictly."""
    has_masks = any(k.startswith("roi_heads.mask_head.") for k in state)
    if has_masks and not model.has_masks:
        raise UserError(f"weights {source} are a Mask R-CNN's (they hold a mask head) but the config's model has "
                        "none: set model.masks=true (configs/mask_rcnn_*.yaml) to load them")
    if model.has_masks and not has_masks:
        if not new_classes:
            raise UserError(f"weights {source} hold no mask head but the config's model is a Mask R-CNN "
                            "(model.masks: true): give a Mask R-CNN's weights, set model.masks=false, or start "
                            "training from them with model.weights (the mask head then starts initialised)")
        own = {k: v for k, v in model.state_dict().items() if k.startswith("roi_heads.mask_head.")}
        logger.info("left initialised: the mask head (%d tensors; %s has none)", len(own), source)
        state.update(own)


def detect_detector_format(state: dict[str, torch.Tensor]) -> str:
    """``torchvision-detection``, ``detectron2-detection`` or ``native``."""
    if any(k.startswith("backbone.body.") for k in state) and any(k.startswith("roi_heads.box_predictor.") for k in state):
        return "torchvision-detection"
    if any(k.startswith("proposal_generator.") for k in state) and any(k.startswith("roi_heads.box_predictor.") for k in state):
        return "detectron2-detection"
    return "native"


def load_detector_weights(model: FasterRCNN, source: str | Path, new_classes: bool = False) -> str:
    """Load a checkpoint into ``model`` strictly; returns the detected format.

    ``source`` is a file or a weights name. Accepted: this project's checkpoints (``model.safetensors`` of
    a run, or a state dict), torchvision's ``fasterrcnn_resnet50_fpn`` and ``maskrcnn_resnet50_fpn``
    checkpoints, and detectron2's model-zoo files (``.pkl``, read without running code; or
    ``detectron2:COCO-Detection/<name>`` / ``detectron2:COCO-InstanceSegmentation/<name>``, fetched and
    cached). ``new_classes=True`` (fine-tuning on another class count) leaves the class, box and mask
    predictors initialised where their shapes differ from the checkpoint's, and logs them; everything
    else still loads strictly.
    """
    source = str(source)
    state = fetch_named_weights(source) if is_weights_name(source) else read_checkpoint(source)
    fmt = detect_detector_format(state)
    unexpected: list[str] = []
    if fmt == "torchvision-detection":
        state, unexpected = remap_keys(state, _map_torchvision_detection_key)
        state = _from_torchvision_layout(state)
    elif fmt == "detectron2-detection":
        _check_detectron2_normalization(model, state, source)
        state, unexpected = remap_keys(state, _map_detectron2_detection_key)
        state = _from_detectron2_layout(model, state)
    _check_mask_head(model, state, source, new_classes)
    if new_classes:
        keep_new_heads(model, state, PREDICTOR_KEYS)
    hints = {"torchvision-detection": "is model.num_classes right? torchvision's COCO detectors have 90 classes + background",
             "detectron2-detection": "is model.num_classes right (detectron2's COCO detectors have 80)? To fine-tune "
                                     "on other classes, start training from these weights with model.weights"}
    strict_load(model, state, source, fmt, unexpected, hints.get(fmt, "is model.num_classes right?"))
    return fmt
