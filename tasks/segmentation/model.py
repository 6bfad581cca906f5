"""Semantic segmentation: a backbone + FCN head (+ auxiliary head), built from a config dict."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones import Backbone
from backbones.errors import UserError
from heads.fcn import FCNHead, SegmentationHead
from tasks.evaluation.miou import IGNORE_INDEX
from tasks.modeling.assembly import layout_backbone, merged, resolve_layout_backbone
from tasks.modeling.batching import IMAGENET_MEAN, IMAGENET_STD, batch_images

LAYOUTS = {"fcn": None, "fcn32s": ["res5"], "fcn16s": ["res5", "res4"], "fcn8s": ["res5", "res4", "res3"]}


class SemanticSegmentor(nn.Module):
    """backbone -> FCN head (-> auxiliary FCN head on another stage), logits at input resolution.

    ``forward(images, targets=None)``: ``images`` a list of ``(3, H, W)`` RGB tensors (``uint8`` 0..255 or
    float 0..1), normalized and zero-padded into one batch inside the model. Training: ``targets`` hold a
    ``mask`` (H, W) of class indices with ``ignore_index`` for unlabelled pixels; returns ``loss_seg``
    (cross-entropy) and ``loss_aux`` (weighted by ``aux_weight``). Evaluation: per image ``(K, H, W)``
    logits at the image's size.
    """

    def __init__(self, backbone: Backbone, head: SegmentationHead, aux_head: nn.Module | None = None,
                 aux_feature: str = "res4", aux_weight: float = 0.5, pixel_mean: Sequence[float] = IMAGENET_MEAN,
                 pixel_std: Sequence[float] = IMAGENET_STD, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.backbone, self.head, self.aux_head = backbone, head, aux_head
        self.aux_feature, self.aux_weight, self.ignore_index = aux_feature, aux_weight, ignore_index
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.head.head.classifier.out_channels

    def preprocess(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        return batch_images(images, self.pixel_mean, self.pixel_std, self.backbone.size_divisibility)

    def forward(self, images: Sequence[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        if self.training and targets is None:
            raise ValueError("SemanticSegmentor in training mode needs targets with masks")
        batch, sizes = self.preprocess(images)
        features = self.backbone(batch)
        logits = F.interpolate(self.head(features), size=batch.shape[-2:], mode="bilinear", align_corners=False)
        if not self.training:
            return [logits[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]
        masks = torch.full(batch.shape[:1] + batch.shape[-2:], self.ignore_index, dtype=torch.int64, device=batch.device)
        for i, target in enumerate(targets):
            mask = target["mask"]
            masks[i, : mask.shape[-2], : mask.shape[-1]] = mask.to(batch.device)
        losses = {"loss_seg": F.cross_entropy(logits, masks, ignore_index=self.ignore_index)}
        if self.aux_head is not None:
            aux = F.interpolate(self.aux_head(features[self.aux_feature]), size=batch.shape[-2:], mode="bilinear",
                                align_corners=False)
            losses["loss_aux"] = self.aux_weight * F.cross_entropy(aux, masks, ignore_index=self.ignore_index)
        return losses


DEFAULTS: dict[str, Any] = {
    "layout": "fcn",
    "num_classes": 21,
    "pixel_mean": list(IMAGENET_MEAN),
    "pixel_std": list(IMAGENET_STD),
    "backbone": {"name": "resnet", "depth": 50, "stride_in_1x1": False},
    "output_stride": 8,  # layout fcn: the backbone dilates to this stride
    "aux": True,
    "aux_weight": 0.5,
    "head_norm": "BN",
    "dropout": 0.1,
}


def _decided_backbone_keys(layout: str, aux: bool, output_stride: int) -> dict[str, Any]:
    """The backbone keys the layout sets: the stages its heads read, and for fcn the dilation."""
    wanted = set(LAYOUTS[layout] or ["res5"]) | ({"res4"} if aux else set())
    decided: dict[str, Any] = {"out_features": [f for f in ("res2", "res3", "res4", "res5") if f in wanted]}
    if layout == "fcn":
        decided["output_stride"] = output_stride
    return decided


def resolve_segmenter_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` section with every default filled in (``DEFAULTS`` and the backbone builder's own,
    less the keys the layout decides): what a run folder's ``config.yaml`` keeps. Idempotent."""
    cfg = merged(DEFAULTS, config, "model")
    layout = cfg["layout"]
    if layout not in LAYOUTS:
        raise UserError(f"model.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout != "fcn" and cfg["output_stride"] != 32:
        if "output_stride" in dict(config):
            raise UserError(f"model.output_stride applies to layout fcn; {layout} needs an undilated backbone "
                            "(output_stride 32)")
        cfg["output_stride"] = 32
    decided = _decided_backbone_keys(layout, cfg["aux"], cfg["output_stride"])
    cfg["backbone"] = resolve_layout_backbone(cfg["backbone"], layout, tuple(decided))
    return cfg


def build_segmenter(config: Mapping[str, Any], init_weights: bool = True) -> SemanticSegmentor:
    """Build from the ``model`` section of a config (keys: ``DEFAULTS``).

    ``layout``: ``fcn`` (FCN head on ``res5`` of a ResNet dilated to ``output_stride`` 8, 16 or 32, as
    torchvision's FCN) or ``fcn32s``/``fcn16s``/``fcn8s`` (undilated ResNet, skip fusion from ``res4`` and
    ``res3`` as in Long et al.). ``aux`` adds an FCN head on ``res4`` whose loss is weighted by
    ``aux_weight``. The backbone's ``out_features`` follow from the layout. ``init_weights=False`` skips
    the backbone's initialisation weights (for a full checkpoint loaded next).
    """
    cfg = resolve_segmenter_config(config)
    layout = cfg["layout"]
    in_features = LAYOUTS[layout] or ["res5"]
    decided = _decided_backbone_keys(layout, cfg["aux"], cfg["output_stride"])
    backbone = layout_backbone(cfg["backbone"], layout, init_weights=init_weights, **decided)
    shapes = backbone.output_shape()
    head = SegmentationHead(shapes, in_features, cfg["num_classes"], cfg["head_norm"], cfg["dropout"])
    aux_head = FCNHead(shapes["res4"].channels, cfg["num_classes"], cfg["head_norm"], cfg["dropout"]) if cfg["aux"] else None
    return SemanticSegmentor(backbone, head, aux_head, "res4", cfg["aux_weight"], cfg["pixel_mean"], cfg["pixel_std"])
