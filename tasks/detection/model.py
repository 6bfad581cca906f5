"""Faster R-CNN assembled from a backbone (+ FPN), an RPN and RoI heads (with a mask head: Mask R-CNN), built
from a config dict."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backbones import CONV_NORMS, FPN, Backbone
from backbones.errors import UserError
from heads import MASK_RULES, RPN, FCBoxHead, MaskHead, Res5BoxHead, RoIHeads, RoIPooler, paste_masks
from tasks.modeling.assembly import layout_backbone, merged, resolve_layout_backbone
from tasks.modeling.batching import IMAGENET_MEAN, IMAGENET_STD, INPUT_FORMATS, batch_images

LAYOUTS = ("fpn", "c4", "dc5")


class FasterRCNN(nn.Module):
    """backbone -> RPN -> RoI heads, with pixel normalization and padding inside the model; Mask R-CNN when
    the RoI heads have a mask head (``has_masks``).

    ``forward(images, targets=None, original_sizes=None)``:
    - ``images``: a list of ``(3, H, W)`` RGB tensors, ``uint8`` in 0..255 or float in 0..1 (sizes may
      differ; the batch is padded to the backbone's ``size_divisibility`` after normalization, or to the
      smallest of ``size_buckets`` that holds it). The
      network's own convention (``input_format``, ``input_range``: BGR in 0..255 for detectron2's and
      MSRA's weights) is applied inside, with ``pixel_mean``/``pixel_std`` in its units;
    - training (``model.train()``): ``targets`` (per image ``boxes`` (G, 4) x1y1x2y2 in input pixels,
      ``labels`` (G,) in 1..num_classes, optional ``iscrowd`` (G,); with masks ``masks`` (G, H, W) 0/1 in
      input pixels) are required; returns named losses;
    - evaluation: returns ``Detections``, a sequence of per image ``{"boxes", "scores", "labels"}`` (with
      masks also ``mask_probs`` (D, M, M), the masks in their boxes: ``paste_masks`` puts them in the image)
      kept at a fixed size on the device until read (``detections.cpu()``: the whole batch in one copy);
      boxes are rescaled to ``original_sizes`` ((h, w) per image) when given, else in input pixels.
    """

    def __init__(
        self,
        backbone: Backbone,
        rpn: RPN,
        roi_heads: RoIHeads,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
        channels_last: bool = False,
        input_format: str = "RGB",
        input_range: float = 1.0,
        size_buckets: Sequence[tuple[int, int]] = (),
    ):
        super().__init__()
        self.backbone, self.rpn, self.roi_heads = backbone, rpn, roi_heads
        self.size_buckets = [tuple(bucket) for bucket in size_buckets]  # (H, W) a batch is padded to (data.size_buckets)
        self.channels_last = channels_last
        self.input_format, self.input_range = input_format, input_range
        if channels_last:  # NHWC convolutions: much faster with oneDNN on the CPU and with cuDNN on tensor cores
            self.to(memory_format=torch.channels_last)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.roi_heads.num_classes

    @property
    def has_masks(self) -> bool:
        return self.roi_heads.mask_head is not None

    def paste_masks(self, detections: Mapping[str, torch.Tensor], size: Sequence[int]) -> dict[str, torch.Tensor]:
        """One image's detections with ``masks`` ``(D, h, w)`` bool: its ``mask_probs`` pasted at its boxes
        into an image of ``size`` (h, w) (the original size, for boxes rescaled to it), thresholded at 0.5,
        by the model's mask rules (torchvision's or detectron2's paste). On the host after ``cpu()``."""
        masks = paste_masks(detections["mask_probs"], detections["boxes"], size, self.roi_heads.mask_rules)
        return {**detections, "masks": masks}

    def preprocess(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalize each image, then pad all to one ``(N, 3, H, W)`` batch (zeros, bottom and right), of the
        smallest of ``size_buckets`` that holds it where they are set."""
        return batch_images(images, self.pixel_mean, self.pixel_std, self.backbone.size_divisibility,
                            self.channels_last, self.input_format, self.input_range, self.size_buckets)

    def forward(
        self,
        images: Sequence[torch.Tensor],
        targets: list[dict[str, torch.Tensor]] | None = None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ):
        if self.training and targets is None:
            raise ValueError("FasterRCNN in training mode needs targets (call model.eval() for detections)")
        batch, sizes = self.preprocess(images)
        # queued copies (no host wait): the sizes from the host, the targets from the DataLoader's pinned memory
        image_sizes = torch.tensor(sizes, dtype=torch.float32).to(batch.device, non_blocking=True)
        if self.training:
            return self.network(batch, image_sizes, pad_targets(targets, batch.device, batch.shape[-2:]))
        detections = self.network(batch, image_sizes)
        if original_sizes is not None:
            detections = detections.replace(boxes=torch.stack([
                rescale_boxes(boxes, size, original)
                for boxes, size, original in zip(detections.fields["boxes"], sizes, original_sizes)]))
        return detections

    def network(self, batch: torch.Tensor, image_sizes: torch.Tensor,
                targets: list[dict[str, torch.Tensor]] | None = None):
        """What runs on the device, from a padded batch ``(N, 3, H, W)``, the images' ``(h, w)`` ``(N, 2)`` and,
        in training, the padded targets (``pad_targets``) to the losses or the ``Detections``: tensors in,
        tensors out, whose shapes are the batch's and the targets' padded ones. What ``train.compile``
        compiles (``tasks/modeling/compiling.py``): one graph per batch shape and target count."""
        features = self.backbone(batch)
        if self.training:
            proposals, rpn_losses = self.rpn(features, image_sizes, targets)  # proposals: (boxes, valid)
            _, roi_losses = self.roi_heads(features, proposals, image_sizes, targets)
            return {**rpn_losses, **roi_losses}
        proposals, _ = self.rpn(features, image_sizes)
        detections, _ = self.roi_heads(features, proposals, image_sizes)
        return detections


def pad_targets(targets: Sequence[dict[str, torch.Tensor]], device: torch.device,
                padded_size: Sequence[int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Each image's ``boxes``, ``labels`` and ``iscrowd`` (zeros where absent), padded with label 0 (matched
    by nothing: the classes are 1..K) to one count for the batch, the next power of two from 8 up that holds
    its largest: the count of a compiled graph's inputs takes few values. ``masks`` ``(G, h, w)``, where the
    targets have them, are padded with zeros to that count and to the batch's ``padded_size`` (H, W).
    On ``device``, copied non-blocking (the DataLoader's pinned memory: the host does not wait). Nothing
    else of a target goes to the device."""
    count = max([len(t["boxes"]) for t in targets] + [8])
    count = 1 << (count - 1).bit_length()
    padded = []
    for target in targets:
        boxes, labels = target["boxes"], target["labels"]
        crowd = target.get("iscrowd", torch.zeros_like(labels))
        extra = count - len(boxes)
        image = {"boxes": F.pad(boxes.to(device, non_blocking=True), [0, 0, 0, extra]),
                 "labels": F.pad(labels.to(device, non_blocking=True), [0, extra]),
                 "iscrowd": F.pad(crowd.to(device, non_blocking=True), [0, extra])}
        if "masks" in target:
            masks = target["masks"]
            height, width = padded_size if padded_size is not None else masks.shape[-2:]
            image["masks"] = F.pad(masks.to(device, non_blocking=True),
                                   [0, width - masks.shape[-1], 0, height - masks.shape[-2], 0, extra])
        padded.append(image)
    return padded


def rescale_boxes(boxes: torch.Tensor, size: tuple[int, int], original: tuple[int, int]) -> torch.Tensor:
    """Boxes ``(..., 4)`` found in an image of ``size`` (h, w), in the pixels of the ``original`` (h, w) it
    was resized from. The ratios are float32 (torchvision's), computed on the host: nothing is copied to the
    device."""
    ratio_h, ratio_w = (float(np.float32(o) / np.float32(s)) for o, s in zip(original, size))
    scaled = boxes.clone()
    scaled[:, 0::2] *= ratio_w
    scaled[:, 1::2] *= ratio_h
    return scaled


# Defaults per layout, merged under what a config gives. Values follow torchvision's and detectron2's
# Faster R-CNN recipes.
_FPN_ANCHORS = {"sizes": [[32], [64], [128], [256], [512]], "aspect_ratios": [[0.5, 1.0, 2.0]], "grid_stride": "declared",
                "round": True}
_C4_ANCHORS = {"sizes": [[32, 64, 128, 256, 512]], "aspect_ratios": [[0.5, 1.0, 2.0]], "grid_stride": "declared",
               "round": True}
# what model.anchors and model.roi_heads.pooler_resolution default to, per layout
LAYOUT_ANCHORS = {"fpn": _FPN_ANCHORS, "c4": _C4_ANCHORS, "dc5": _C4_ANCHORS}
POOLER_RESOLUTION = {"fpn": 7, "c4": 14, "dc5": 7}
DEFAULTS: dict[str, Any] = {
    "layout": "fpn",
    "num_classes": 80,
    "weights": None,  # a whole detector to start training from (fine-tuning); see load_detector_weights
    "input_format": "RGB",  # channel order the network takes: RGB, or BGR (detectron2's, MSRA's weights)
    "input_range": 1.0,  # pixels scaled to 0..input_range before pixel_mean/pixel_std: 1.0, or 255.0
    "pixel_mean": list(IMAGENET_MEAN),  # in input_range units and input_format order
    "pixel_std": list(IMAGENET_STD),
    "channels_last": True,  # NHWC memory format for the convolutions (a speed option; see BENCHMARKS.md)
    "backbone": {"name": "resnet", "depth": 50, "stride_in_1x1": False, "norm": "FrozenBN", "freeze_at": 2,
                 "fold_frozen_bn": True},
    # norm: after each lateral and output convolution ("" none, BN, FrozenBN, SyncBN, GN; detectron2's FPN.NORM)
    "fpn": {"out_channels": 256, "top_block": "maxpool", "norm": ""},
    "anchors": None,  # per layout
    "rpn": {
        "iou_thresholds": [0.3, 0.7],
        "batch_size_per_image": 256,
        "positive_fraction": 0.5,
        "pre_nms_topk": [2000, 1000],
        "post_nms_topk": [2000, 1000],
        "nms_thresh": 0.7,
        "min_size": 1e-3,
        "score_thresh": 0.0,
        "box_loss_type": "smooth_l1",
        "smooth_l1_beta": 1.0 / 9,
    },
    "roi_heads": {
        "pooler_resolution": None,  # 7 (FPN, DC5), 14 (C4)
        "sampling_ratio": 2,
        "aligned": True,
        "pooler_impl": "auto",  # "torchvision", "sparse" (faster on the CPU) or "auto" (sparse on the CPU)
        # the FPN / DC5 box head (detectron2's FastRCNNConvFCHead): num_conv 3x3 convolutions of conv_dim, each
        # with norm ("" none, BN, FrozenBN, SyncBN, GN) and ReLU, then num_fc fc layers of fc_dim; the default
        # is the two-fc head, detectron2's "4conv1fc" is num_conv 4, num_fc 1 with a norm. C4's is res5.
        # C4 only: one more norm after the box head's res5 ("" none; MoCo's protocols: SyncBN, detectron2's
        # Res5ROIHeadsExtraNorm)
        "res5_norm": "",
        "num_conv": 0,
        "conv_dim": 256,
        "norm": "",
        "num_fc": 2,
        "fc_dim": 1024,
        "fg_iou": 0.5,
        "bg_iou": 0.5,
        "batch_size_per_image": 512,
        "positive_fraction": 0.25,
        "box_weights": [10.0, 10.0, 5.0, 5.0],
        "score_thresh": 0.05,
        "nms_thresh": 0.5,
        "detections_per_image": 100,
        "box_loss_type": "smooth_l1",
        "smooth_l1_beta": 1.0 / 9,
        "min_size": 1e-2,  # detections with a smaller side are dropped (torchvision); 0 keeps all (detectron2)
        # the best this many (proposal, class) boxes per image go to NMS, a fixed size (no host round trip);
        # 0: all that pass score_thresh and min_size (the exact rule of torchvision and detectron2)
        "topk_candidates": 1000,
    },
    "masks": False,  # Mask R-CNN: a mask head on the RoI heads, instance masks in the detections
    "mask_head": {
        "num_conv": None,  # 3x3 convolutions before the deconvolution: 4 (FPN, DC5), 0 (C4: it reads res5's map)
        "conv_dim": 256,
        "norm": "",  # after each 3x3 convolution ("" none, BN, FrozenBN, SyncBN, GN; detectron2's ROI_MASK_HEAD.NORM)
        "pooler_resolution": 14,  # its own RoIAlign (FPN, DC5); C4's reads the box head's res5 map
        "sampling_ratio": None,  # of its RoIAlign; default: roi_heads.sampling_ratio
        "rules": "torchvision",  # targets and paste as torchvision (or detectron2) computes them
    },
}


def resolve_detector_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` section with every default filled in: ``DEFAULTS``, the layout's anchors and pooler
    resolution, and the backbone builder's own defaults (less the keys the layout decides). What a run
    folder's ``config.yaml`` keeps, so that it rebuilds the same model whatever the defaults become;
    resolving a resolved section changes nothing. Unknown keys and values of the wrong type are errors."""
    top = merged(DEFAULTS, config, "model")
    layout = top["layout"]
    if layout not in LAYOUTS:
        raise UserError(f"model.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if top["input_format"] not in INPUT_FORMATS:
        raise UserError(f"model.input_format must be one of {', '.join(INPUT_FORMATS)}, got {top['input_format']!r}")
    if top["input_range"] not in (1, 255):
        raise UserError(f"model.input_range must be 1.0 (pixels in 0..1) or 255.0 (0..255), got {top['input_range']!r}")
    top["backbone"] = resolve_layout_backbone(top["backbone"], layout, tuple(_decided_backbone_keys(layout)))
    for section in ("rpn", "roi_heads", "fpn"):
        top[section] = merged(DEFAULTS[section], config.get(section), f"model.{section}")
    top["anchors"] = merged(LAYOUT_ANCHORS[layout], config.get("anchors"), "model.anchors")
    top["roi_heads"]["pooler_resolution"] = top["roi_heads"]["pooler_resolution"] or POOLER_RESOLUTION[layout]
    mask = top["mask_head"] = merged(DEFAULTS["mask_head"], config.get("mask_head"), "model.mask_head")
    if mask["num_conv"] is None:
        mask["num_conv"] = 0 if layout == "c4" else 4
    if mask["sampling_ratio"] is None:
        mask["sampling_ratio"] = top["roi_heads"]["sampling_ratio"]
    if mask["rules"] not in MASK_RULES:
        raise UserError(f"model.mask_head.rules must be one of {', '.join(MASK_RULES)}, got {mask['rules']!r}")
    _check_norms(top, layout)
    return top


def _check_norms(top: Mapping[str, Any], layout: str) -> None:
    """The FPN's and the heads' norms are names ``backbones.conv2d`` takes; C4's box head is ``res5``, whose
    norm is the backbone's: convolutions or a norm of the fc box head there are an error."""
    for section in ("fpn", "roi_heads", "mask_head"):
        if top[section]["norm"] not in CONV_NORMS:
            raise UserError(f"model.{section}.norm must be one of {', '.join(map(repr, CONV_NORMS))} ('': none), "
                            f"got {top[section]['norm']!r}")
    if layout == "c4" and (top["roi_heads"]["num_conv"] or top["roi_heads"]["norm"]):
        raise UserError("model.roi_heads.num_conv and model.roi_heads.norm shape the FPN and DC5 box head; C4's box "
                        "head is the res5 stage, normalized by model.backbone.norm (and model.roi_heads.res5_norm "
                        "after it): remove them")
    if top["roi_heads"]["res5_norm"] not in CONV_NORMS:
        raise UserError(f"model.roi_heads.res5_norm must be one of {', '.join(map(repr, CONV_NORMS))} ('': none), "
                        f"got {top['roi_heads']['res5_norm']!r}")
    if layout != "c4" and top["roi_heads"]["res5_norm"]:
        raise UserError(f"model.roi_heads.res5_norm is the norm after C4's res5 box head; layout {layout} has no "
                        "such head: remove it")


def _decided_backbone_keys(layout: str) -> dict[str, Any]:
    """The backbone keys the layout sets: the stages it reads, and for dc5 the dilated res5."""
    out_features = {"fpn": ["res2", "res3", "res4", "res5"], "c4": ["res4", "res5"], "dc5": ["res5"]}[layout]
    return {"out_features": out_features, **({"output_stride": 16} if layout == "dc5" else {})}


def build_detector(config: Mapping[str, Any], init_weights: bool = True) -> FasterRCNN:
    """Build a ``FasterRCNN`` from the ``model`` section of a config (see ``DEFAULTS`` for the keys).

    ``layout`` chooses the head: ``fpn`` (the backbone's res2..res5 feed an FPN; RPN on p2..p6; RoIAlign
    7x7 over p2..p5; two fc layers), ``c4`` (the paper's: RPN and RoIAlign 14x14 on res4, res5 as the box
    head) or ``dc5`` (res5 dilated to stride 16 feeds RPN and a 7x7 RoIAlign; two fc layers). The FPN's and
    the heads' norms (``fpn.norm``, ``roi_heads.norm`` with ``num_conv`` convolutions before the fc layers,
    ``mask_head.norm``) are detectron2's (its SyncBN and GN baselines); none by default. The
    backbone's ``out_features`` (and, for dc5, ``output_stride``) follow from the layout.
    ``init_weights`` loads the backbone's initialisation weights (``model.backbone.weights``), unless
    ``model.weights`` names a whole trained detector to start from: its caller loads that next
    (``DetectionTask.build_model``, with ``load_detector_weights``), so the backbone's are not read.
    ``init_weights=False`` skips all initialisation weights (for a full checkpoint loaded next).
    """
    top = resolve_detector_config(config)
    layout = top["layout"]
    backbone = layout_backbone(top["backbone"], layout, init_weights=init_weights and not top["weights"],
                               **_decided_backbone_keys(layout))

    rpn_cfg, roi_cfg, anchors = top["rpn"], dict(top["roi_heads"]), top["anchors"]
    pooler_resolution = roi_cfg.pop("pooler_resolution")
    pooler_kwargs = {k: roi_cfg.pop(k) for k in ("sampling_ratio", "aligned")}
    pooler_kwargs["impl"] = roi_cfg.pop("pooler_impl")
    box_head_cfg = {k: roi_cfg.pop(k) for k in ("num_fc", "fc_dim", "num_conv", "conv_dim", "norm")}
    backbone, rpn_features, roi_features, box_head = _layout_heads(layout, backbone, top["fpn"], pooler_resolution,
                                                                   box_head_cfg, roi_cfg.pop("res5_norm"))
    shapes = backbone.output_shape()
    rpn = RPN(
        shapes,
        rpn_features,
        anchor_sizes=anchors["sizes"],
        aspect_ratios=anchors["aspect_ratios"],
        grid_stride=anchors["grid_stride"],
        round_anchors=anchors["round"],
        **{k: tuple(v) if isinstance(v, list) else v for k, v in rpn_cfg.items()},
    )
    strides = [shapes[f].stride for f in roi_features]
    pooler = RoIPooler(strides, pooler_resolution, **pooler_kwargs)
    masks = _mask_branch(top, layout, shapes[roi_features[0]].channels, box_head, strides, pooler_kwargs)
    roi_heads = RoIHeads(
        shapes,
        roi_features,
        box_head,
        pooler,
        top["num_classes"],
        **{k: tuple(v) if isinstance(v, list) else v for k, v in roi_cfg.items()},
        **masks,
    )
    return FasterRCNN(backbone, rpn, roi_heads, top["pixel_mean"], top["pixel_std"], top["channels_last"],
                      top["input_format"], float(top["input_range"]))


def _mask_branch(top: Mapping[str, Any], layout: str, channels: int, box_head: nn.Module, strides: list[int],
                 pooler_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The RoI heads' mask arguments (none without ``model.masks``): on FPN and DC5 a mask head over its own
    RoIAlign of the box head's features; on C4 one over the box head's ``res5`` map (no pooler of its own)."""
    if not top["masks"]:
        return {}
    cfg = top["mask_head"]
    if layout == "c4":
        head = MaskHead(box_head.out_channels, top["num_classes"], cfg["num_conv"], cfg["conv_dim"], cfg["norm"])
        return {"mask_head": head, "mask_pooler": None, "mask_rules": cfg["rules"]}
    pooler = RoIPooler(strides, cfg["pooler_resolution"], cfg["sampling_ratio"], pooler_kwargs["aligned"],
                       impl=pooler_kwargs["impl"])
    head = MaskHead(channels, top["num_classes"], cfg["num_conv"], cfg["conv_dim"], cfg["norm"])
    return {"mask_head": head, "mask_pooler": pooler, "mask_rules": cfg["rules"]}


def _layout_heads(layout: str, backbone: Backbone, fpn_cfg: Mapping[str, Any], pooler_resolution: int,
                  box_head_cfg: Mapping[str, Any], res5_norm: str) -> tuple[Backbone, list[str], list[str], nn.Module]:
    """What the layout makes of the backbone: the feature extractor (an FPN over it, or itself without the
    ``res5`` stage that becomes C4's box head), the features the RPN and the RoI heads read, the box head
    (``box_head_cfg``: ``FCBoxHead``'s keys, for FPN and DC5; ``res5_norm``: the norm after C4's res5)."""
    if layout == "fpn":
        backbone = FPN(backbone, ["res2", "res3", "res4", "res5"], **fpn_cfg)
        shapes = backbone.output_shape()
        rpn_features = list(shapes)
        roi_features = [f for f in shapes if f != list(shapes)[-1]] if fpn_cfg["top_block"] != "none" else list(shapes)
        return backbone, rpn_features, roi_features, FCBoxHead(shapes[roi_features[0]].channels, pooler_resolution,
                                                               **box_head_cfg)
    if layout == "c4":
        res5_shape = backbone.output_shape()["res5"]
        res5 = backbone.pop_stage("res5")
        return backbone, ["res4"], ["res4"], Res5BoxHead(res5, res5_shape.channels, res5_norm)
    return backbone, ["res5"], ["res5"], FCBoxHead(backbone.output_shape()["res5"].channels, pooler_resolution,
                                                   **box_head_cfg)
