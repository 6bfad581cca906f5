"""Mask R-CNN's mask branch (He et al., ICCV 2017): per-class mask logits for each region, their training
targets and loss, and the paste of a region's mask into its image.

The head is detectron2's and torchvision's ``MaskRCNNConvUpsampleHead``: ``num_conv`` 3x3 convolutions, a
2x2 stride-2 deconvolution and a 1x1 convolution to one logit map per class. On FPN and DC5 it reads its
own 14x14 RoIAlign (4 convolutions: 28x28 masks); on C4 it reads the ``res5`` output of the box head's
pooled regions (no convolution: the deconvolution makes 14x14 masks of the 7x7 ``res5`` map), as the
paper's C4 layout and detectron2 have it.

Two conventions are written out, each exact against its library (``MASK_RULES``):

- ``torchvision``: targets are ``roi_align`` (unaligned, adaptive sampling) of the ground-truth masks in each
  region, kept soft; a mask is pasted by padding it with a zero border, growing its box to match, resizing
  it (bilinear) to the box's whole pixels and thresholding at ``> 0.5``;
- ``detectron2``: targets are ``roi_align`` (aligned, adaptive sampling) of the ground-truth bitmasks,
  thresholded at ``>= 0.5`` (its ``BitMasks.crop_and_resize``); a mask is pasted by sampling it
  (``grid_sample``) at each image pixel's centre inside the box, thresholded at ``>= 0.5``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from backbones import batch_norm_over, conv2d

MASK_RULES = ("torchvision", "detectron2")


class MaskHead(nn.Module):
    """``num_conv`` 3x3 convolutions of ``conv_dim`` (each followed by ``norm`` and ReLU), a 2x2 stride-2
    deconvolution (ReLU), a 1x1 convolution to ``num_classes`` mask logits (one map per class 1..K,
    background has none): regions ``(R, C, S, S)`` to logits ``(R, K, 2S, 2S)``. With a norm ("BN",
    "SyncBN", "GN", ...: detectron2's ``ROI_MASK_HEAD.NORM``) the convolutions have no bias
    (``convs.0.norm.*`` here, ``mask_fcn1.norm.*`` in detectron2); the deconvolution and the predictor have
    no norm and keep their bias. Weights initialised as detectron2's (MSRA fill for the convolutions,
    normal(0.001) for the predictor).

    ``forward(x, weight)``: in training the regions are a fixed number of slots per image, the sampled
    positives first (see ``RoIHeads``), ``weight`` ``(R,)`` 1 for the positives: a batch norm (BN, SyncBN)
    takes its statistics over those alone, as detectron2's mask head, which sees the positives only."""

    def __init__(self, in_channels: int, num_classes: int, num_conv: int = 4, conv_dim: int = 256, norm: str = ""):
        super().__init__()
        dims = [in_channels] + [conv_dim] * num_conv
        self.convs = nn.ModuleList(conv2d(a, b, 3, norm, padding=1) for a, b in zip(dims, dims[1:]))
        self.deconv = nn.ConvTranspose2d(dims[-1], conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        for layer in [*self.convs, self.deconv]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        for conv in self.convs:
            norm = getattr(conv, "norm", None)
            if weight is not None and isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.training:
                x = F.relu(batch_norm_over(norm, conv._conv_forward(x, conv.weight, None), weight))
            else:
                x = F.relu(conv(x))
        return self.predictor(F.relu(self.deconv(x)))


def class_masks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logit map of each region's class: ``logits`` ``(R, K, M, M)``, ``labels`` ``(R,)`` in 1..K ->
    ``(R, M, M)`` (a gather: fixed sizes)."""
    index = (labels - 1).clamp(min=0).view(-1, 1, 1, 1).expand(-1, 1, *logits.shape[2:])
    return logits.gather(1, index)[:, 0]


@torch.no_grad()
def mask_targets(masks: torch.Tensor, gt_index: torch.Tensor, boxes: torch.Tensor, size: int,
                 rules: str = "torchvision") -> torch.Tensor:
    """The ``size`` x ``size`` training target of each region: its matched ground-truth mask cropped to its
    box and resized. ``masks`` ``(N, G, H, W)`` (any dtype, 0/1) are each image's ground-truth masks in the
    batch's padded pixels, ``gt_index`` ``(N, R)`` the ground truth each region is matched to, ``boxes``
    ``(N, R, 4)``; returns ``(N * R, size, size)`` float. One ``roi_align`` over all images' masks (each
    region reads its own ground truth's map), as ``MASK_RULES`` says for ``rules``."""
    num_images, num_gt = masks.shape[:2]
    first = torch.arange(num_images, device=gt_index.device)[:, None] * num_gt
    index = (first + gt_index).to(boxes.dtype)[..., None]  # (N, R, 1): the map of (image, ground truth)
    rois = torch.cat([index, boxes], dim=2).flatten(0, 1)
    maps = masks.flatten(0, 1)[:, None].to(boxes.dtype)  # (N * G, 1, H, W)
    aligned = rules == "detectron2"
    targets = roi_align(maps, rois, (size, size), 1.0, 0, aligned)[:, 0]
    return (targets >= 0.5).to(targets.dtype) if aligned else targets


def mask_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each region's class logits ``(R, M, M)`` against its targets, averaged over
    its pixels and over the regions of ``weight`` ``(R,)`` 1 (the others of a fixed-size set weigh 0); 0
    without any."""
    per_region = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none").mean((1, 2))
    return (per_region * weight).sum() / weight.sum().clamp(min=1)


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, size: Sequence[int], rules: str = "torchvision") -> torch.Tensor:
    """Each region's mask probabilities ``(D, M, M)`` pasted into an image of ``size`` (h, w) at its box
    ``(D, 4)`` (the image's pixels) and thresholded at 0.5: ``(D, h, w)`` bool, as ``MASK_RULES`` says."""
    height, width = int(size[0]), int(size[1])
    out = torch.zeros((len(probs), height, width), dtype=torch.bool, device=probs.device)
    if rules == "detectron2":
        for mask, box, target in zip(probs.float(), boxes.float(), out):
            _paste_by_sampling(mask, box, target)
    else:
        side = probs.shape[-1]
        padded = F.pad(probs.float(), (1, 1, 1, 1))  # a zero border: the mask fades out at its box's edge
        for mask, box, target in zip(padded, _grown(boxes.float(), (side + 2) / side).to(torch.int64), out):
            _paste_by_resizing(mask, box, target)
    return out


def _grown(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """Boxes ``(D, 4)`` scaled by ``scale`` about their centres (the padded mask's box)."""
    half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale
    centre = (boxes[:, 2:] + boxes[:, :2]) * 0.5
    return torch.cat([centre - half, centre + half], dim=1)


def _paste_by_resizing(mask: torch.Tensor, box: torch.Tensor, out: torch.Tensor) -> None:
    """torchvision's paste: the mask resized (bilinear, half-pixel centres) to the box's whole pixels
    ``x1..x2`` inclusive, the part inside the image written, ``> 0.5``."""
    x1, y1, x2, y2 = box.tolist()
    w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    resized = F.interpolate(mask[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    height, width = out.shape
    top, bottom, left, right = max(y1, 0), min(y2 + 1, height), max(x1, 0), min(x2 + 1, width)
    if bottom > top and right > left:
        out[top:bottom, left:right] = resized[top - y1: bottom - y1, left - x1: right - x1] > 0.5


def _paste_by_sampling(mask: torch.Tensor, box: torch.Tensor, out: torch.Tensor) -> None:
    """detectron2's paste: the mask sampled bilinearly (``grid_sample``, zeros outside) at the centre of
    each image pixel of the box's neighbourhood, ``>= 0.5``."""
    height, width = out.shape
    x1, y1, x2, y2 = box
    left = max(int(torch.floor(x1)) - 1, 0)
    top = max(int(torch.floor(y1)) - 1, 0)
    right = min(int(torch.ceil(x2)) + 1, width)
    bottom = min(int(torch.ceil(y2)) + 1, height)
    if right <= left or bottom <= top:
        return
    ys = (torch.arange(top, bottom, device=mask.device, dtype=torch.float32) + 0.5 - y1) / (y2 - y1) * 2 - 1
    xs = (torch.arange(left, right, device=mask.device, dtype=torch.float32) + 0.5 - x1) / (x2 - x1) * 2 - 1
    grid = torch.stack([xs[None, :].expand(len(ys), -1), ys[:, None].expand(-1, len(xs))], dim=2)
    sampled = F.grid_sample(mask[None, None], grid[None], align_corners=False)[0, 0]
    out[top:bottom, left:right] = sampled >= 0.5
