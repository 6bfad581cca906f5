"""Fast R-CNN RoI heads: pool each proposal's features, classify it and refine its box.

Three layouts plug onto a backbone through its ``output_shape()``:
- FPN: multi-level RoIAlign 7x7 (the FPN paper's level assignment), two 1024-d fc layers (or detectron2's
  convolutions with a norm before them, e.g. its "4conv1fc");
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
from torchvision.ops import box_area, roi_align

from backbones import ShapeSpec, conv2d, make_norm

from .boxes import BoxCoder, Matcher, batched_nms, box_loss, clip_boxes, ground_truth_iou, sample_balanced, sampled_indices
from .detections import Detections
from .mask_head import MASK_RULES, MaskHead, class_masks, mask_loss, mask_targets
from .roi_align import sparse_roi_align

POOLER_IMPLS = ("auto", "torchvision", "sparse")


class RoIPooler(nn.Module):
    """RoIAlign of boxes over one or several levels; a box of side ``s`` reads level
    ``floor(canonical_level + log2(s / canonical_size))`` clamped to the available levels (FPN paper, eq. 1).

    ``impl``: ``torchvision`` (``torchvision.ops.roi_align``), ``sparse`` (the same RoIAlign as a sparse
    matrix product, much faster on the CPU, see ``heads/roi_align.py``) or ``auto`` (sparse for CPU
    tensors with a fixed ``sampling_ratio``, torchvision's kernel otherwise and under ``torch.compile``).
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

    def _sparse(self, feature: torch.Tensor) -> bool:
        """Whether the sparse kernel pools ``feature``: asked for, or ``auto`` on the CPU with a fixed sampling
        ratio, except while ``torch.compile`` traces the model (dynamo takes no sparse tensors)."""
        if self.impl == "auto":
            return feature.device.type == "cpu" and self.sampling_ratio > 0 and not torch.compiler.is_compiling()
        return self.impl == "sparse"

    def _align(self, feature: torch.Tensor, rois: torch.Tensor, scale: float) -> torch.Tensor:
        align = sparse_roi_align if self._sparse(feature) else roi_align
        return align(feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned)

    def forward(self, features: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """``(N * R, C, S, S)`` for the boxes ``(N, R, 4)`` of each image, image by image.

        Over several levels, torchvision's kernel pools every box at every level and keeps each box's own
        level (fixed sizes: no per-level selection for the host to wait for; RoIAlign is a small part of a
        step); the sparse CPU kernel pools each level's boxes alone (on the CPU nothing waits)."""
        num_images, per_image = boxes.shape[:2]
        index = torch.arange(num_images, device=boxes.device, dtype=boxes.dtype)[:, None, None].expand(-1, per_image, 1)
        rois = torch.cat([index, boxes], dim=2).flatten(0, 1)  # (N * R, 5): image index, x1, y1, x2, y2
        if len(features) == 1:
            return self._align(features[0], rois, self.scales[0])
        levels = self.level_of(rois[:, 1:])
        if not self._sparse(features[0]):
            out = None
            for level, (feature, scale) in enumerate(zip(features, self.scales)):
                pooled = self._align(feature, rois, scale)
                out = pooled if out is None else torch.where((levels == level)[:, None, None, None], pooled, out)
            return out
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
    """``num_conv`` 3x3 convolutions of ``conv_dim`` (each followed by ``norm`` and ReLU), flatten, then
    ``num_fc`` fully connected layers of ``fc_dim`` with ReLU: detectron2's ``FastRCNNConvFCHead``. The
    default (no convolution, two fc layers) is the FPN paper's and torchvision's head; ``num_conv=4,
    num_fc=1`` with a norm is detectron2's "4conv1fc" (its SyncBN and GN baselines). With a norm the
    convolutions have no bias (``convs.0.weight``, ``convs.0.norm.*``: detectron2's ``conv1.weight``,
    ``conv1.norm.*``). The convolutions start as detectron2's (MSRA fill); the fc layers as PyTorch's.

    In training a batch norm's statistics are those of the sampled regions, as detectron2's, and of the
    filler slots of an image with fewer candidates than ``batch_size_per_image`` (``RoIHeads``), which
    detectron2 does not have (rare on COCO: up to 2000 proposals an image in training)."""

    def __init__(self, in_channels: int, pooled_size: int, num_fc: int = 2, fc_dim: int = 1024, num_conv: int = 0,
                 conv_dim: int = 256, norm: str = ""):
        super().__init__()
        channels = [in_channels] + [conv_dim] * num_conv
        self.convs = nn.ModuleList(conv2d(a, b, 3, norm, padding=1) for a, b in zip(channels, channels[1:]))
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        dims = [channels[-1] * pooled_size * pooled_size] + [fc_dim] * num_fc
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.out_channels = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return x


class Res5BoxHead(nn.Module):
    """The C4 head: a ResNet ``res5`` stage over the pooled ``res4`` features (with ``norm``, one more norm
    after it), then global average pooling (``forward``); ``feature_map`` is the map before the pooling, what
    C4's mask head reads."""

    def __init__(self, res5: nn.Module, out_channels: int, norm: str = ""):
        super().__init__()
        self.res5 = res5
        self.out_channels = out_channels
        # one more norm after res5 ("": none): MoCo's C4 protocols (detectron2's Res5ROIHeadsExtraNorm, which
        # puts the backbone's norm, SyncBN, after the head's res5; its key is roi_heads.res5.norm.*)
        self.norm = make_norm(norm, out_channels) if norm else None

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res5(x)
        return self.norm(x) if self.norm is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))


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
    """Box classification and regression on proposals, and with a ``mask_head`` instance masks (Mask R-CNN).

    Training: the ground-truth boxes join the proposals; proposals are matched (IoU >= ``fg_iou``: the
    ground truth's class; below ``bg_iou``: background; matched to a crowd box: ignored), a balanced
    sample is drawn, and the losses are cross-entropy plus a box loss on the positives' deltas of their
    class. Inference: softmax scores, class-specific boxes clipped to the image, score threshold, boxes
    with a side below ``min_size`` dropped (torchvision: 0.01; detectron2 keeps all: 0), per-class NMS,
    the best ``detections_per_image``.

    Masks: the mask head reads ``mask_pooler``'s regions, or (``mask_pooler=None``: C4) the ``res5`` map of
    the box head's. In training it sees the sampled positives, at a fixed count per image (at most
    ``batch_size_per_image * positive_fraction`` are positive: that many slots, the empty ones weighing
    nothing), and its loss is the binary cross-entropy of the ground-truth class's map against
    ``mask_targets``; at inference it sees the final detections, and ``mask_probs`` ``(N, D, M, M)`` (the
    sigmoid of each detection's class map) joins them. ``mask_rules`` names the target convention
    (``heads/mask_head.py``).
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
        topk_candidates: int | None = None,
        mask_head: MaskHead | None = None,
        mask_pooler: RoIPooler | None = None,
        mask_rules: str = "torchvision",
    ):
        super().__init__()
        if mask_rules not in MASK_RULES:
            raise ValueError(f"mask rules must be one of {', '.join(MASK_RULES)}, got {mask_rules!r}")
        if mask_head is not None and mask_pooler is None and not isinstance(box_head, Res5BoxHead):
            raise ValueError("a mask head without its own pooler reads the res5 box head's map (C4)")
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
        self.min_size, self.topk_candidates = min_size, topk_candidates
        self.mask_head, self.mask_pooler, self.mask_rules = mask_head, mask_pooler, mask_rules

    @property
    def shares_res5(self) -> bool:
        """C4's mask head: it reads the box head's ``res5`` map of the same regions."""
        return self.mask_head is not None and self.mask_pooler is None

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: tuple[torch.Tensor, torch.Tensor],
        image_sizes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[Detections | None, dict[str, torch.Tensor]]:
        """``proposals``: the RPN's ``(boxes (N, P, 4), valid (N, P))``; ``image_sizes``: ``(h, w)`` per image
        ``(N, 2)``; ``targets`` as the RPN takes them (label 0: padding). Training: ``(None, losses)``;
        inference: ``(detections, {})``, per image ``{"boxes", "scores", "labels"}`` (and ``mask_probs``).
        With a mask head the targets carry ``masks`` ``(G, H, W)`` in the batch's padded pixels."""
        boxes, valid = proposals
        if targets is not None:
            boxes, labels, regression_targets, matched = self.sample_proposals(boxes, valid, targets)
        maps = [features[f] for f in self.in_features]
        pooled = self.pooler(maps, boxes)
        res5_map = self.box_head.feature_map(pooled) if self.shares_res5 else None
        x = res5_map.mean(dim=(2, 3)) if res5_map is not None else self.box_head(pooled)
        class_logits, box_deltas = self.predictor(x)
        if targets is not None:
            losses = self.losses(class_logits, box_deltas, labels.flatten(), regression_targets.flatten(0, 1))
            if self.mask_head is not None:
                losses["loss_mask"] = self.mask_losses(features, boxes, labels, matched, targets, res5_map)
            return None, losses
        detections = self.detect(class_logits, box_deltas, boxes, valid, image_sizes)
        if self.mask_head is not None:
            detections = self.detect_masks(features, detections)
        return detections, {}

    def _mask_logits(self, features: dict[str, torch.Tensor], boxes: torch.Tensor,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
        """The mask head's logits ``(N * R, K, M, M)`` for the regions ``boxes`` ``(N, R, 4)``; ``weight``
        ``(N * R,)``: the regions a batch norm of the head takes its statistics from (training)."""
        maps = [features[f] for f in self.in_features]
        if self.shares_res5:
            return self.mask_head(self.box_head.feature_map(self.pooler(maps, boxes)), weight)
        return self.mask_head(self.mask_pooler(maps, boxes), weight)

    def mask_losses(self, features: dict[str, torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor,
                    matched: torch.Tensor, targets: list[dict[str, torch.Tensor]],
                    res5_map: torch.Tensor | None) -> torch.Tensor:
        """The mask loss over each image's sampled positives (``boxes`` ``(N, S, 4)``, ``labels`` ``(N, S)``,
        ``matched`` ground truth ``(N, S)``), taken at a fixed count per image: the positive slots."""
        num_images, per_image = labels.shape
        slots = min(per_image, int(self.batch_size_per_image * self.positive_fraction))
        index, positive = sampled_indices(labels > 0, slots)  # (N, P): the positives first
        mask_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))
        if res5_map is not None:  # C4: the box head's res5 map of the same regions
            rows = (index + torch.arange(num_images, device=index.device)[:, None] * per_image).flatten()
            logits = self.mask_head(res5_map[rows], positive.flatten())
        else:
            logits = self._mask_logits(features, mask_boxes, positive.flatten())
        logits = class_masks(logits, labels.gather(1, index).flatten())
        gt_masks = torch.stack([t["masks"] for t in targets])  # (N, G, H, W)
        goal = mask_targets(gt_masks, matched.gather(1, index), mask_boxes, logits.shape[-1], self.mask_rules)
        return mask_loss(logits, goal, positive.flatten().to(logits.dtype))

    def detect_masks(self, features: dict[str, torch.Tensor], detections: Detections) -> Detections:
        """``mask_probs`` ``(N, D, M, M)``: the sigmoid of each detection's class map."""
        boxes, labels = detections.fields["boxes"], detections.fields["labels"]
        logits = class_masks(self._mask_logits(features, boxes), labels.flatten())
        return detections.replace(mask_probs=logits.sigmoid().view(*labels.shape, *logits.shape[1:]))

    @torch.no_grad()
    def sample_proposals(
        self, proposals: torch.Tensor, valid: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ground-truth boxes join the ``valid`` proposals ``(N, P, 4)``; a balanced sample of them:
        boxes ``(N, S, 4)``, class labels ``(N, S)`` (0: background; -1: not sampled, where an image has
        fewer than ``S`` to sample), regression targets ``(N, S, 4)`` and the index of the ground truth each
        is matched to ``(N, S)``, ``S = batch_size_per_image`` (or all candidates if fewer). Crowd boxes
        join as candidates never sampled."""
        num_gt = max(len(t["boxes"]) for t in targets)
        gt_boxes = proposals.new_zeros((len(targets), num_gt, 4))
        gt_ok = torch.zeros((len(targets), num_gt), dtype=torch.bool, device=proposals.device)
        for i, target in enumerate(targets):
            count = len(target["boxes"])
            gt_boxes[i, :count] = target["boxes"]
            gt_ok[i, :count] = ~target.get("iscrowd", torch.zeros_like(target["labels"])).bool() & (target["labels"] > 0)
        candidates = torch.cat([proposals, gt_boxes], dim=1)  # (N, P + G, 4)
        usable = torch.cat([valid, gt_ok], dim=1)
        labels, matched_boxes, matched_index = [], [], []
        for boxes, ok, target in zip(candidates, usable, targets):
            cls, matched, index = self._label(boxes, target)
            labels.append(cls.masked_fill(~ok, -1))
            matched_boxes.append(matched)
            matched_index.append(index)
        labels, matched_boxes, matched_index = torch.stack(labels), torch.stack(matched_boxes), torch.stack(matched_index)
        foreground = (labels > 0).long() - (labels < 0).long()  # 1 foreground, 0 background, -1 ignored
        positive, negative = sample_balanced(foreground, self.batch_size_per_image, self.positive_fraction)
        index, sampled = sampled_indices(positive | negative, self.batch_size_per_image)  # (N, S)
        index4 = index[..., None].expand(-1, -1, 4)
        boxes = candidates.gather(1, index4)
        regression_targets = self.box_coder.encode(matched_boxes.gather(1, index4), boxes)
        return (boxes, labels.gather(1, index).masked_fill(~sampled, -1), regression_targets,
                matched_index.gather(1, index))

    def _label(self, boxes: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image's candidates ``(B, 4)``: class labels (0 background, -1 ignored: between the IoU
        thresholds or matched to a crowd box), matched ground-truth boxes ``(B, 4)`` and their index ``(B,)``."""
        gt, gt_labels = target["boxes"], target["labels"]
        matched, match_labels = self.matcher.match(ground_truth_iou(target, boxes))
        if not gt.shape[0]:
            return torch.zeros_like(matched), torch.zeros_like(boxes), matched
        crowd = target.get("iscrowd", torch.zeros_like(gt_labels)).bool()
        cls = torch.where(match_labels == 1, gt_labels[matched], torch.zeros_like(matched))
        cls = cls.masked_fill((match_labels == -1) | (crowd[matched] & (match_labels != 0)), -1)
        return cls, gt[matched], matched

    def losses(
        self, class_logits: torch.Tensor, box_deltas: torch.Tensor, labels: torch.Tensor, regression_targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Cross-entropy over the sampled RoIs (``labels`` >= 0) and the box loss of the positives' deltas of
        their class, both over the number sampled."""
        sampled = labels >= 0
        num_sampled = sampled.sum().clamp(min=1)
        classes = labels.clamp(min=0)
        loss_cls = (F.cross_entropy(class_logits, classes, reduction="none") * sampled).sum() / num_sampled
        positive = labels > 0
        deltas = box_deltas.view(box_deltas.shape[0], -1, 4).gather(1, classes[:, None, None].expand(-1, 1, 4))[:, 0]
        targets = torch.where(positive[:, None], regression_targets, 0)  # others weigh zero (and may be inf)
        loss_box = box_loss(deltas, targets, self.box_loss_type, self.smooth_l1_beta, positive.to(deltas.dtype))
        return {"loss_cls": loss_cls, "loss_box": loss_box / num_sampled}

    def detect(
        self,
        class_logits: torch.Tensor,
        box_deltas: torch.Tensor,
        proposals: torch.Tensor,
        valid: torch.Tensor,
        image_sizes: torch.Tensor,
    ) -> Detections:
        """Per image the best ``detections_per_image`` class-specific boxes of the ``valid`` proposals
        ``(N, P, 4)``: scores above ``score_thresh``, sides of at least ``min_size``, per-class NMS.

        Candidates: with ``topk_candidates`` the best that many per image pass on at a fixed size (the
        result is the same unless fewer than ``detections_per_image`` boxes survive among them while more
        than that many passed the filters); without it (or while an ONNX export traces the model) all that
        pass. One NMS call for all images and classes. Its survivors are ranked in a fixed ``(N, P * K)``
        grid, whose ``detections_per_image`` lowest ranks per row are the result: a fixed size, nothing read
        back (``Detections`` reads the counts when the host asks for the per-image lists)."""
        num_images, per_image = valid.shape
        num_classes = self.num_classes
        boxes = self.box_coder.decode(box_deltas, proposals.flatten(0, 1)).view(num_images, -1, 4)
        boxes = clip_boxes(boxes, image_sizes).view(num_images, per_image, num_classes + 1, 4)[:, :, 1:]  # no background
        boxes = boxes.reshape(num_images, -1, 4)  # (N, P * K, 4), proposal-major
        scores = F.softmax(class_logits, dim=-1)[:, 1:].reshape(num_images, -1)  # (N, P * K)
        usable = valid.repeat_interleave(num_classes, dim=1) & (scores > self.score_thresh)
        if self.min_size > 0:  # torchvision's remove_small_boxes
            usable = usable & (boxes[..., 2] - boxes[..., 0] >= self.min_size) & (boxes[..., 3] - boxes[..., 1] >= self.min_size)
        if self.topk_candidates and not torch.jit.is_tracing():
            _, index = torch.where(usable, scores, -1.0).topk(min(self.topk_candidates, scores.shape[1]), dim=1)
            image = torch.where(usable.gather(1, index), torch.arange(num_images, device=index.device)[:, None],
                                num_images)  # those that do not pass: an image of their own, after the others
            image, index = image.flatten(), index.flatten()
        else:
            image, index = torch.where(usable)
        image_of = image.clamp(max=num_images - 1)
        labels = index % num_classes + 1
        keep = batched_nms(boxes[image_of, index], scores[image_of, index], image * num_classes + labels,
                           self.nms_thresh)  # best first
        # rank of each survivor in NMS order, in a grid of (image, candidate); an extra row for the filtered
        grid = boxes.shape[1]
        rank = torch.full(((num_images + 1) * grid,), keep.shape[0], dtype=torch.int64, device=keep.device)
        rank = rank.index_put((image[keep] * grid + index[keep],), torch.arange(keep.shape[0], device=keep.device))
        rank, best = rank.view(num_images + 1, grid)[:num_images].topk(min(self.detections_per_image, grid), dim=1,
                                                                        largest=False)  # (N, D), best first
        return Detections({"boxes": boxes.gather(1, best[..., None].expand(-1, -1, 4)), "scores": scores.gather(1, best),
                           "labels": best % num_classes + 1}, rank < keep.shape[0])
