"""Region Proposal Network (Ren et al., "Faster R-CNN", NeurIPS 2015), over one or several feature levels."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from backbones import ShapeSpec

from .anchors import AnchorGenerator
from .boxes import BoxCoder, Matcher, batched_nms, box_loss, clip_boxes, sample_balanced


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then per anchor an objectness logit and four box deltas (1x1 convs).

    ``forward`` runs the head over whole maps (for proposals); ``at`` runs it at chosen anchors only (for
    the losses, which read a few hundred anchors per image).
    """

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness = nn.Conv2d(in_channels, num_anchors, 1)
        self.deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def _apply(self, fn, recurse: bool = True):
        """After ``.to(...)``: the 1x1 output weights stay in the standard (contiguous) layout, whatever
        memory format was asked for. ``at`` uses them as ``(out, in)`` matrices, so their gradients come
        back contiguous; a parameter in channels-last strides would disagree with its own gradient, which
        DDP's gradient buckets refuse ("Grad strides do not match bucket view strides": a copy per step).
        For a 1x1 kernel both layouts hold the same bytes in the same order, so nothing else changes."""
        super()._apply(fn, recurse)
        for layer in (self.objectness, self.deltas):
            standard = layer.weight.data.clone(memory_format=torch.contiguous_format)
            if layer.weight.stride() != standard.stride():  # is_contiguous() ignores size-1 dims: compare strides
                layer.weight.data = standard
        return self

    def _outputs_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The objectness and delta 1x1 convs as one (weight, bias): one pass over the features forward
        and backward, about half the time of two on the CPU, with the same parameters."""
        return (torch.cat([self.objectness.weight, self.deltas.weight]),
                torch.cat([self.objectness.bias, self.deltas.bias]))

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        weight, bias = self._outputs_layer()
        num_anchors = self.objectness.out_channels
        logits, deltas = [], []
        for x in features:
            out = F.conv2d(F.relu(self.conv(x), inplace=True), weight, bias)
            logits.append(out[:, :num_anchors])  # (N, A, H, W)
            deltas.append(out[:, num_anchors:])  # (N, A*4, H, W)
        return logits, deltas

    def at(self, features: list[torch.Tensor], image: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's objectness logit ``(S,)`` and deltas ``(S, 4)`` for single anchors: ``image[i]`` and
        ``index[i]`` (into the anchors of all levels in ``flatten_levels`` order). The same function as
        ``forward`` read at those anchors, but the 3x3 conv is computed only at their locations (as a
        product with the gathered 3x3 patches), so the backward pass costs nothing on the rest of the maps:
        on a whole map it is the largest convolution backward of an FPN detector's training step."""
        num_anchors = self.objectness.out_channels
        sizes = torch.tensor([f.shape[-2] * f.shape[-1] * num_anchors for f in features],
                             pin_memory=index.is_cuda).to(index.device, non_blocking=True)  # copied without a wait
        ends = sizes.cumsum(0)
        level = torch.searchsorted(ends, index, right=True)
        conv_weight = self.conv.weight.permute(0, 2, 3, 1).flatten(1)  # (C_out, 3 * 3 * C_in), (ky, kx, c)
        head_weight, head_bias = self._outputs_layer()
        head_weight = head_weight.flatten(1)
        offsets = torch.arange(-1, 2, device=index.device)  # 3x3 window, padding 1
        rows, logits, deltas = [], [], []
        for lvl, feature in enumerate(features):
            row = torch.where(level == lvl)[0]
            batch, channels, height, width = feature.shape
            local = index[row] - (ends[lvl] - sizes[lvl])
            location, anchor = local // num_anchors, local % num_anchors
            ys = (location // width)[:, None, None] + offsets[None, :, None]  # (S, 3, 1)
            xs = (location % width)[:, None, None] + offsets[None, None, :]  # (S, 1, 3)
            inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)  # zero padding outside the map
            # index_select, not advanced indexing: the backward of the latter (index_put_ with accumulate) adds
            # the overlapping patches with unordered atomic float adds across CPU threads, so the gradients (and
            # a whole run) changed with the machine's load; index_select's backward sums in a fixed order
            pixel = (image[row][:, None, None] * height + ys.clamp(0, height - 1)) * width + xs.clamp(0, width - 1)
            flat = feature.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # a view if channels-last
            patches = flat.index_select(0, pixel.reshape(-1)).view(len(row), 3, 3, channels)  # (S, 3, 3, C)
            patches = patches * inside[..., None].to(patches.dtype)
            hidden = F.relu(F.linear(patches.flatten(1), conv_weight, self.conv.bias))
            out = F.linear(hidden, head_weight, head_bias)  # (S, A + A * 4)
            picked = torch.arange(len(row), device=index.device)
            rows.append(row)
            logits.append(out[picked, anchor])
            deltas.append(out[:, num_anchors:].reshape(-1, num_anchors, 4)[picked, anchor])
        order = torch.cat(rows).argsort()
        return torch.cat(logits)[order], torch.cat(deltas)[order]


def flatten_levels(logits: list[torch.Tensor], deltas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level ``(N, A, H, W)`` / ``(N, A*4, H, W)`` -> ``(N, sum H*W*A)`` / ``(N, sum H*W*A, 4)``, in the
    anchors' order (cell-major, anchor-minor)."""
    flat_logits, flat_deltas = [], []
    for logit, delta in zip(logits, deltas):
        n, a, h, w = logit.shape
        flat_logits.append(logit.permute(0, 2, 3, 1).reshape(n, -1))
        flat_deltas.append(delta.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    return torch.cat(flat_logits, dim=1), torch.cat(flat_deltas, dim=1)


def _at_most(count: int, k: int) -> int:
    """``min(count, k)``. While an ONNX export traces the model, ``count`` (a feature map's size) is a
    traced value: the minimum is then taken by a graph operation, so that it follows the input's size
    instead of being frozen at the size of the example the export ran on."""
    if torch.jit.is_tracing():
        return torch.clamp(torch.as_tensor(count), max=k)
    return min(count, k)


class RPN(nn.Module):
    """Proposals from anchors: objectness + box deltas, per-level top-k, clipping, small-box removal, NMS
    (per level), top-k per image. In training also the losses: binary cross-entropy on a balanced sample
    of anchors and a box loss on its positives.

    Args:
        input_shapes: ``output_shape()`` of the backbone (or FPN) it reads.
        in_features: levels to read, e.g. ``["p2", ..., "p6"]`` or ``["res4"]``; all of equal channels.
        anchor_sizes / aspect_ratios: per level (one entry is repeated for every level).
        pre_nms_topk / post_nms_topk: ``(train, test)``; the first per level, the second per image.
        min_size: proposals with a side shorter than this, or empty, are dropped (``1e-3`` is torchvision's
            rule, ``0`` detectron2's).
        crowd boxes of the targets (``iscrowd``) are ignored: anchors matched to them are neither positive
        nor negative.
    """

    def __init__(
        self,
        input_shapes: dict[str, ShapeSpec],
        in_features: Sequence[str],
        anchor_sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),),
        grid_stride: str = "declared",
        round_anchors: bool = True,
        iou_thresholds: tuple[float, float] = (0.3, 0.7),
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_topk: tuple[int, int] = (2000, 1000),
        post_nms_topk: tuple[int, int] = (2000, 1000),
        nms_thresh: float = 0.7,
        min_size: float = 1e-3,
        score_thresh: float = 0.0,
        box_loss_type: str = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9,
        box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    ):
        super().__init__()
        missing = [f for f in in_features if f not in input_shapes]
        if missing:
            raise ValueError(f"RPN in_features {missing} are not among the backbone outputs {list(input_shapes)}")
        channels = {input_shapes[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"RPN levels {list(in_features)} must have equal channels, got {channels}")
        if len(aspect_ratios) == 1:
            aspect_ratios = list(aspect_ratios) * len(in_features)
        if len(anchor_sizes) == 1:
            anchor_sizes = list(anchor_sizes) * len(in_features)
        self.in_features = list(in_features)
        self.anchor_generator = AnchorGenerator(
            anchor_sizes, aspect_ratios, [input_shapes[f].stride for f in in_features], grid_stride, round_anchors
        )
        if len(set(self.anchor_generator.num_anchors)) != 1:
            raise ValueError("every RPN level needs the same number of anchors per location (one shared head)")
        self.head = RPNHead(channels.pop(), self.anchor_generator.num_anchors[0])
        self.box_coder = BoxCoder(box_weights)
        self.matcher = Matcher(iou_thresholds[1], iou_thresholds[0], allow_low_quality_matches=True)
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.pre_nms_topk, self.post_nms_topk = pre_nms_topk, post_nms_topk
        self.nms_thresh, self.min_size, self.score_thresh = nms_thresh, min_size, score_thresh
        self.box_loss_type, self.smooth_l1_beta = box_loss_type, smooth_l1_beta

    def forward(
        self,
        features: dict[str, torch.Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Proposals ``[(K_i, 4)]`` per image (detached) and, when ``targets`` are given, the losses."""
        maps = [features[f] for f in self.in_features]
        anchors = self.anchors(maps)
        proposals, _ = self.propose(maps, anchors, image_sizes)
        losses: dict[str, torch.Tensor] = {}
        if targets is not None:
            losses = self.losses(maps, anchors, targets)
        return proposals, losses

    def anchors(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The anchors of all levels ``(A_total, 4)``, in ``flatten_levels`` order."""
        strides = self.anchor_generator.strides
        padded_size = (maps[0].shape[-2] * strides[0], maps[0].shape[-1] * strides[0])
        return torch.cat(self.anchor_generator([tuple(m.shape[-2:]) for m in maps], padded_size))

    @torch.no_grad()  # proposals carry no gradient; the losses recompute the head where they read it
    def propose(self, maps: list[torch.Tensor], anchors: torch.Tensor,
                image_sizes: list[tuple[int, int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image the proposals ``(K, 4)`` and their objectness logits ``(K,)``, best first, from the
        feature maps of ``in_features`` and their ``anchors`` (``self.anchors(maps)``)."""
        logits, deltas = self.head(maps)
        per_level = [m.shape[-2] * m.shape[-1] * self.anchor_generator.num_anchors[0] for m in maps]
        logits, deltas = flatten_levels(logits, deltas)  # (N, A_total), (N, A_total, 4)
        boxes = self.box_coder.decode(deltas, anchors.unsqueeze(0)).view(len(image_sizes), -1, 4)
        return self.select_proposals(boxes, logits, image_sizes, per_level)

    def select_proposals(
        self, boxes: torch.Tensor, logits: torch.Tensor, image_sizes: list[tuple[int, int]], per_level: list[int]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Top-k per level (batched over images), then per image: clip, drop tiny and low-scoring boxes,
        NMS within each level, keep the best ``post_nms_topk``. Returns per image the proposals ``(K, 4)``
        and their objectness logits ``(K,)``, best first."""
        pre_k = self.pre_nms_topk[0 if self.training else 1]
        post_k = self.post_nms_topk[0 if self.training else 1]
        num_images = boxes.shape[0]
        top_indices, top_levels = [], []
        offset = 0
        for level, count in enumerate(per_level):
            k = _at_most(count, pre_k)
            _, index = logits[:, offset : offset + count].topk(k, dim=1)  # (N, k)
            top_indices.append(index + offset)
            top_levels.append(torch.full_like(index[0], level))
            offset += count
        index = torch.cat(top_indices, dim=1)
        levels = torch.cat(top_levels)
        batch = torch.arange(num_images, device=boxes.device)[:, None]
        top_logits = logits[batch, index]  # (N, K)
        boxes = boxes[batch, index]  # (N, K, 4)

        proposals, proposal_logits = [], []
        for image_boxes, image_logits, size in zip(boxes, top_logits, image_sizes):
            image_boxes = clip_boxes(image_boxes, size)
            image_scores = torch.sigmoid(image_logits)  # NMS ranks by probability, as torchvision does
            widths, heights = image_boxes[:, 2] - image_boxes[:, 0], image_boxes[:, 3] - image_boxes[:, 1]
            keep = (widths >= self.min_size) & (heights >= self.min_size) & (widths > 0) & (heights > 0)
            keep = torch.where(keep & (image_scores >= self.score_thresh))[0]
            keep = keep[batched_nms(image_boxes[keep], image_scores[keep], levels[keep], self.nms_thresh)[:post_k]]
            proposals.append(image_boxes[keep])
            proposal_logits.append(image_logits[keep])
        return proposals, proposal_logits

    @torch.no_grad()
    def label_anchors(
        self, anchors: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image and anchor: label (1 object, 0 background, -1 ignored: between the IoU thresholds or
        matched to a crowd box) and the matched ground-truth box. ``(N, A)``, ``(N, A, 4)``."""
        labels, matched_boxes = [], []
        for target in targets:
            gt = target["boxes"]
            matched, image_labels = self.matcher.match(box_iou(gt, anchors))
            if gt.shape[0] == 0:
                matched_boxes.append(torch.zeros_like(anchors))
            else:
                matched_boxes.append(gt[matched])
                if "iscrowd" in target:
                    image_labels[target["iscrowd"][matched].bool() & (image_labels != 0)] = -1
            labels.append(image_labels)
        return torch.stack(labels), torch.stack(matched_boxes)

    def losses(
        self, maps: list[torch.Tensor], anchors: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Binary cross-entropy on the sampled anchors and the box loss on the positive ones, both over the
        number sampled. The head's outputs are computed for the sampled anchors alone (``RPNHead.at``)."""
        labels, matched_boxes = self.label_anchors(anchors, targets)
        positive, negative = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
        image, index = torch.where(positive | negative)
        num_sampled = max(len(index), 1)
        logits, deltas = self.head.at(maps, image, index)
        is_positive = positive[image, index]
        target_deltas = self.box_coder.encode(matched_boxes[image, index][is_positive], anchors[index][is_positive])
        loss_box = box_loss(deltas[is_positive], target_deltas, self.box_loss_type, self.smooth_l1_beta) / num_sampled
        loss_objectness = F.binary_cross_entropy_with_logits(
            logits, is_positive.to(logits.dtype), reduction="sum"
        ) / num_sampled
        return {"loss_rpn_objectness": loss_objectness, "loss_rpn_box": loss_box}
