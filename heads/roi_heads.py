"""Fast R-CNN RoI heads: pool each proposal's features, classify it and refine its box.

Three layouts plug onto a backbone through its ``output_shape()``:
- FPN: multi-level RoIAlign 7x7 (the FPN paper's level assignment), two 1024-d fc layers;
- C4 (the ResNet paper's detector): RoIAlign 14x14 on ``res4``, the ``res5`` stage as the box head,
  global average pooling;
- DC5: RoIAlign 7x7 on a dilated ``res5`` (stride 16), two fc layers.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_area, box_iou, remove_small_boxes, roi_align

from backbones import ShapeSpec

from .boxes import BoxCoder, Matcher, batched_nms, box_loss, clip_boxes, sample_balanced
from .roi_align import sparse_roi_align

POOLER_IMPLS = ("auto", "torchvision", "sparse")


class RoIPooler(nn.Module):
    """RoIAlign of boxes over one or several levels; a box of side ``s`` reads level
    ``floor(canonical_level + log2(s / canonical_size))`` clamped to the available levels (FPN paper, eq. 1).

    ``impl``: ``torchvision`` (``torchvision.ops.roi_align``), ``sparse`` (the same RoIAlign as a sparse
    matrix product, much faster on the CPU, see ``heads/roi_align.py``) or ``auto`` (sparse for CPU
    tensors with a fixed ``sampling_ratio``, torchvision's kernel otherwise).
    """

    def __init__(
        self,
        strides: Sequence[int],
        output_size: int,
        sampling_ratio: int = 2,
        aligned: bool = True,
        canonical_size: int = 224,
        canonical_level: int = 4,
        impl: str = "auto",
    ):
        super().__init__()
        if impl not in POOLER_IMPLS:
            raise ValueError(f"RoI pooler impl must be one of {', '.join(POOLER_IMPLS)}, got {impl!r}")
        if impl == "sparse" and sampling_ratio <= 0:
            raise ValueError("the sparse RoI pooler needs sampling_ratio > 0")
        self.impl = impl
        self.scales = [1.0 / s for s in strides]
        self.output_size, self.sampling_ratio, self.aligned = output_size, sampling_ratio, aligned
        self.min_level = int(math.log2(strides[0]))
        self.max_level = int(math.log2(strides[-1]))
        if len(strides) > 1 and self.max_level - self.min_level != len(strides) - 1:
            raise ValueError(f"RoI pooler levels must have doubling strides, got {list(strides)}")
        self.canonical_size, self.canonical_level = canonical_size, canonical_level

    def level_of(self, boxes: torch.Tensor) -> torch.Tensor:
        size = torch.sqrt(box_area(boxes))
        level = torch.floor(self.canonical_level + torch.log2(size / self.canonical_size) + 1e-6)
        return (level.clamp(self.min_level, self.max_level) - self.min_level).to(torch.int64)

    def _align(self, feature: torch.Tensor, rois: torch.Tensor, scale: float) -> torch.Tensor:
        sparse = self.impl == "sparse" or (self.impl == "auto" and feature.device.type == "cpu" and self.sampling_ratio > 0)
        align = sparse_roi_align if sparse else roi_align
        return align(feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned)

    def forward(self, features: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """``(R, C, S, S)`` for the boxes of all images, in order."""
        index = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)])
        rois = torch.cat([index, torch.cat(boxes)], dim=1)  # (R, 5): image index, x1, y1, x2, y2
        if len(features) == 1:
            return self._align(features[0], rois, self.scales[0])
        levels = self.level_of(rois[:, 1:])
        out = rois.new_zeros((rois.shape[0], features[0].shape[1], self.output_size, self.output_size),
                             dtype=features[0].dtype)
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            selected = torch.where(levels == level)[0]
            out.index_copy_(0, selected, self._align(feature, rois[selected], scale).to(out.dtype))
        return out


@contextlib.contextmanager
def torchvision_roi_align(model: nn.Module) -> Iterator[nn.Module]:
    """While active, every ``RoIPooler`` of ``model`` runs torchvision's kernel (the one ONNX export, FLOP
    counting and CUDA take; the sparse CPU one has no ONNX form); their ``impl`` restored afterwards."""
    poolers = [m for m in model.modules() if isinstance(m, RoIPooler)]
    saved = [m.impl for m in poolers]
    try:
        for m in poolers:
            m.impl = "torchvision"
        yield model
    finally:
        for m, impl in zip(poolers, saved):
            m.impl = impl


class FCBoxHead(nn.Module):
    """Flatten, then ``num_fc`` fully connected layers with ReLU."""

    def __init__(self, in_channels: int, pooled_size: int, num_fc: int = 2, fc_dim: int = 1024):
        super().__init__()
        dims = [in_channels * pooled_size * pooled_size] + [fc_dim] * num_fc
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.out_channels = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return x


class Res5BoxHead(nn.Module):
    """The C4 head: a ResNet ``res5`` stage over the pooled ``res4`` features, then global average pooling."""

    def __init__(self, res5: nn.Module, out_channels: int):
        super().__init__()
        self.res5 = res5
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res5(x).mean(dim=(2, 3))


class FastRCNNPredictor(nn.Module):
    """Class logits (``num_classes`` + background at index 0) and class-specific box deltas."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, (num_classes + 1) * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Box classification and regression on proposals.

    Training: the ground-truth boxes join the proposals; proposals are matched (IoU >= ``fg_iou``: the
    ground truth's class; below ``bg_iou``: background; matched to a crowd box: ignored), a balanced
    sample is drawn, and the losses are cross-entropy plus a box loss on the positives' deltas of their
    class. Inference: softmax scores, class-specific boxes clipped to the image, score threshold, boxes
    with a side below ``min_size`` dropped (torchvision: 0.01; detectron2 keeps all: 0), per-class NMS,
    the best ``detections_per_image``.
    """

    def __init__(
        self,
        input_shapes: dict[str, ShapeSpec],
        in_features: Sequence[str],
        box_head: nn.Module,
        pooler: RoIPooler,
        num_classes: int,
        fg_iou: float = 0.5,
        bg_iou: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
        box_loss_type: str = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9,
        min_size: float = 1e-2,
    ):
        super().__init__()
        missing = [f for f in in_features if f not in input_shapes]
        if missing:
            raise ValueError(f"RoI heads in_features {missing} are not among the backbone outputs {list(input_shapes)}")
        self.in_features = list(in_features)
        self.pooler = pooler
        self.box_head = box_head
        self.predictor = FastRCNNPredictor(box_head.out_channels, num_classes)
        self.num_classes = num_classes
        self.matcher = Matcher(fg_iou, bg_iou, allow_low_quality_matches=False)
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.box_coder = BoxCoder(box_weights)
        self.score_thresh, self.nms_thresh, self.detections_per_image = score_thresh, nms_thresh, detections_per_image
        self.box_loss_type, self.smooth_l1_beta = box_loss_type, smooth_l1_beta
        self.min_size = min_size

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if targets is not None:
            proposals, labels, regression_targets = self.sample_proposals(proposals, targets)
        maps = [features[f] for f in self.in_features]
        x = self.box_head(self.pooler(maps, proposals))
        class_logits, box_deltas = self.predictor(x)
        if targets is not None:
            return [], self.losses(class_logits, box_deltas, labels, regression_targets)
        return self.detect(class_logits, box_deltas, proposals, image_sizes), {}

    @torch.no_grad()
    def sample_proposals(
        self, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Sampled proposals per image, their class labels (0: background) and regression targets."""
        candidates, labels, matched_boxes = [], [], []
        for image_proposals, target in zip(proposals, targets):
            gt, gt_labels = target["boxes"], target["labels"]
            crowd = target.get("iscrowd", torch.zeros_like(gt_labels)).bool()
            boxes = torch.cat([image_proposals, gt[~crowd]])
            matched, match_labels = self.matcher.match(box_iou(gt, boxes))
            if gt.shape[0]:
                cls = torch.where(match_labels == 1, gt_labels[matched], torch.zeros_like(matched))
                cls = cls.masked_fill((match_labels == -1) | (crowd[matched] & (match_labels != 0)), -1)
                matched_boxes.append(gt[matched])
            else:
                cls = torch.zeros_like(matched)
                matched_boxes.append(torch.zeros_like(boxes))
            candidates.append(boxes)
            labels.append(cls)
        longest = max(len(c) for c in candidates)
        padded = torch.full((len(labels), longest), -1, dtype=torch.int64, device=labels[0].device)
        for i, cls in enumerate(labels):
            padded[i, : len(cls)] = (cls > 0).long() + (cls < 0).long() * -1  # 1 foreground, 0 bg, -1 ignore
        positive, negative = sample_balanced(padded, self.batch_size_per_image, self.positive_fraction)
        keep = positive | negative
        sampled, sampled_labels, sampled_targets = [], [], []
        for i, (boxes, cls, gt_boxes) in enumerate(zip(candidates, labels, matched_boxes)):
            chosen = torch.where(keep[i, : len(cls)])[0]
            sampled.append(boxes[chosen])
            sampled_labels.append(cls[chosen])
            sampled_targets.append(self.box_coder.encode(gt_boxes[chosen], boxes[chosen]))
        return sampled, torch.cat(sampled_labels), torch.cat(sampled_targets)

    def losses(
        self, class_logits: torch.Tensor, box_deltas: torch.Tensor, labels: torch.Tensor, regression_targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        loss_cls = F.cross_entropy(class_logits, labels)
        positive = torch.where(labels > 0)[0]
        deltas = box_deltas.view(box_deltas.shape[0], box_deltas.shape[1] // 4, 4)[positive, labels[positive]]
        loss_box = box_loss(deltas, regression_targets[positive], self.box_loss_type, self.smooth_l1_beta)
        return {"loss_cls": loss_cls, "loss_box": loss_box / max(labels.numel(), 1)}

    def detect(
        self,
        class_logits: torch.Tensor,
        box_deltas: torch.Tensor,
        proposals: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        boxes = self.box_coder.decode(box_deltas, torch.cat(proposals)).view(box_deltas.shape[0], box_deltas.shape[1] // 4, 4)
        scores = F.softmax(class_logits, dim=-1)
        counts = [p.shape[0] for p in proposals]  # traced sizes in an ONNX export, not constants
        results = []
        for image_boxes, image_scores, size in zip(boxes.split(counts), scores.split(counts), image_sizes):
            image_boxes = clip_boxes(image_boxes, size)[:, 1:].reshape(-1, 4)  # drop background
            labels = torch.arange(1, self.num_classes + 1, device=scores.device).expand(image_scores.shape[0], -1)
            image_scores = image_scores[:, 1:].reshape(-1)
            labels = labels.reshape(-1)
            keep = torch.where(image_scores > self.score_thresh)[0]
            image_boxes, image_scores, labels = image_boxes[keep], image_scores[keep], labels[keep]
            if self.min_size > 0:
                keep = remove_small_boxes(image_boxes, min_size=self.min_size)
                image_boxes, image_scores, labels = image_boxes[keep], image_scores[keep], labels[keep]
            keep = batched_nms(image_boxes, image_scores, labels, self.nms_thresh)[: self.detections_per_image]
            results.append({"boxes": image_boxes[keep], "scores": image_scores[keep], "labels": labels[keep]})
        return results
