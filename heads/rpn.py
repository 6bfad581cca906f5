"""Region Proposal Network (Ren et al., "Faster R-CNN", NeurIPS 2015), over one or several feature levels."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones import ShapeSpec

from .anchors import AnchorGenerator
from .boxes import BoxCoder, Matcher, batched_nms, box_loss, clip_boxes, ground_truth_iou, sample_balanced, sampled_indices


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
        on a whole map it is the largest convolution backward of an FPN detector's training step.

        Every anchor's patch is gathered from every level and kept (multiplied by one) at its own level only
        (by zero elsewhere): fixed sizes, no per-level selection the host would wait for."""
        num_anchors = self.objectness.out_channels
        sizes = [f.shape[-2] * f.shape[-1] * num_anchors for f in features]
        starts = [sum(sizes[:lvl]) for lvl in range(len(sizes))]
        level = sum((index >= start).long() for start in starts[1:]) if len(starts) > 1 else torch.zeros_like(index)
        conv_weight = self.conv.weight.permute(0, 2, 3, 1).flatten(1)  # (C_out, 3 * 3 * C_in), (ky, kx, c)
        head_weight, head_bias = self._outputs_layer()
        offsets = torch.arange(-1, 2, device=index.device)  # 3x3 window, padding 1
        patches = None
        for lvl, feature in enumerate(features):
            batch, channels, height, width = feature.shape
            location = (index - starts[lvl]).clamp(0, sizes[lvl] - 1) // num_anchors
            ys = (location // width)[:, None, None] + offsets[None, :, None]  # (S, 3, 1)
            xs = (location % width)[:, None, None] + offsets[None, None, :]  # (S, 1, 3)
            # zero padding outside the map, and nothing from the levels the anchor is not on
            keep = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width) & (level == lvl)[:, None, None]
            # index_select, not advanced indexing: the backward of the latter (index_put_ with accumulate) adds
            # the overlapping patches with unordered atomic float adds across CPU threads, so the gradients (and
            # a whole run) changed with the machine's load; index_select's backward sums in a fixed order
            pixel = (image[:, None, None] * height + ys.clamp(0, height - 1)) * width + xs.clamp(0, width - 1)
            flat = feature.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # a view if channels-last
            gathered = flat.index_select(0, pixel.reshape(-1)).view(len(index), 3, 3, channels)  # (S, 3, 3, C)
            gathered = gathered * keep[..., None].to(gathered.dtype)
            patches = gathered if patches is None else patches + gathered  # exact: one level's patch plus zeros
        hidden = F.relu(F.linear(patches.flatten(1), conv_weight, self.conv.bias))
        out = F.linear(hidden, head_weight.flatten(1), head_bias)  # (S, A + A * 4)
        picked = torch.arange(len(index), device=index.device)
        anchor = index % num_anchors  # every level's anchors start at a multiple of num_anchors
        return out[picked, anchor], out[:, num_anchors:].reshape(-1, num_anchors, 4)[picked, anchor]


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
        image_sizes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
        """Proposals ``(boxes (N, P, 4), valid (N, P))`` (detached; see ``select_proposals``) and, when
        ``targets`` are given, the losses. ``image_sizes``: each image's ``(h, w)``, ``(N, 2)``. ``targets``:
        per image ``boxes`` ``(G, 4)``, ``labels`` ``(G,)`` (label 0: padding, matched by nothing) and
        optional ``iscrowd`` ``(G,)``."""
        maps = [features[f] for f in self.in_features]
        anchors = self.anchors(maps)
        boxes, _, valid = self.propose(maps, anchors, image_sizes)
        losses: dict[str, torch.Tensor] = {}
        if targets is not None:
            losses = self.losses(maps, anchors, targets)
        return (boxes, valid), losses

    def anchors(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The anchors of all levels ``(A_total, 4)``, in ``flatten_levels`` order."""
        strides = self.anchor_generator.strides
        padded_size = (maps[0].shape[-2] * strides[0], maps[0].shape[-1] * strides[0])
        return torch.cat(self.anchor_generator([tuple(m.shape[-2:]) for m in maps], padded_size))

    @torch.no_grad()  # proposals carry no gradient; the losses recompute the head where they read it
    def propose(self, maps: list[torch.Tensor], anchors: torch.Tensor,
                image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Proposals ``(N, P, 4)``, their objectness logits ``(N, P)`` and ``valid`` ``(N, P)``, best first
        per image (see ``select_proposals``), from the feature maps of ``in_features`` and their ``anchors``
        (``self.anchors(maps)``)."""
        logits, deltas = self.head(maps)
        per_level = [m.shape[-2] * m.shape[-1] * self.anchor_generator.num_anchors[0] for m in maps]
        logits, deltas = flatten_levels(logits, deltas)  # (N, A_total), (N, A_total, 4)
        boxes = self.box_coder.decode(deltas, anchors.unsqueeze(0)).view(maps[0].shape[0], -1, 4)
        return self.select_proposals(boxes, logits, image_sizes, per_level)

    def select_proposals(
        self, boxes: torch.Tensor, logits: torch.Tensor, image_sizes: torch.Tensor, per_level: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k per level, clip, drop tiny and low-scoring boxes, NMS within each image and level, keep the
        best ``post_nms_topk`` per image: torchvision's and detectron2's rule, at fixed sizes. Returns the
        proposals ``(N, P, 4)``, their objectness logits ``(N, P)`` and ``valid`` ``(N, P)``, best first per
        image, ``P = min(post_nms_topk, sum of the per-level k)``; where fewer boxes survive, the rest of the
        row is filled with boxes that are not ``valid``.

        All images and levels go through one NMS call (the one host round trip of the proposals); the
        dropped boxes join it in a group of their own, where they touch nothing, and stay not valid."""
        pre_k = self.pre_nms_topk[0 if self.training else 1]
        post_k = self.post_nms_topk[0 if self.training else 1]
        num_images = boxes.shape[0]
        top_indices, top_levels = [], []
        offset = 0
        for level, count in enumerate(per_level):
            k = _at_most(count, pre_k)
            _, index = logits[:, offset : offset + count].topk(k, dim=1)  # (N, k)
            top_indices.append(index + offset)
            top_levels.append(torch.full_like(index, level))
            offset += count
        index = torch.cat(top_indices, dim=1)
        levels = torch.cat(top_levels, dim=1)  # (N, K)
        logits = logits.gather(1, index)  # (N, K)
        boxes = clip_boxes(boxes.gather(1, index[..., None].expand(-1, -1, 4)), image_sizes)  # (N, K, 4)
        scores = torch.sigmoid(logits)  # NMS ranks by probability, as torchvision does
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = (widths >= self.min_size) & (heights >= self.min_size) & (widths > 0) & (heights > 0)
        valid = valid & (scores >= self.score_thresh)
        num_levels = len(per_level)
        image = torch.arange(num_images, device=boxes.device)[:, None]
        groups = torch.where(valid, image * num_levels + levels, num_images * num_levels)  # dropped: a group apart
        keep = batched_nms(boxes.flatten(0, 1), scores.flatten(), groups.flatten(), self.nms_thresh)
        kept = scores.new_zeros(scores.numel()).index_fill(0, keep, 1).view_as(valid).bool() & valid
        _, order = torch.where(kept, scores, -1.0).topk(_at_most(index.shape[1], post_k), dim=1)  # (N, P), best first
        return boxes.gather(1, order[..., None].expand(-1, -1, 4)), logits.gather(1, order), kept.gather(1, order)

    @torch.no_grad()
    def label_anchors(
        self, anchors: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image and anchor: label (1 object, 0 background, -1 ignored: between the IoU thresholds or
        matched to a crowd box) and the matched ground-truth box. ``(N, A)``, ``(N, A, 4)``."""
        labels, matched_boxes = [], []
        for target in targets:
            gt = target["boxes"]
            matched, image_labels = self.matcher.match(ground_truth_iou(target, anchors))
            if gt.shape[0] == 0:
                matched_boxes.append(torch.zeros_like(anchors))
            else:
                matched_boxes.append(gt[matched])
                if "iscrowd" in target:
                    image_labels = image_labels.masked_fill(target["iscrowd"][matched].bool() & (image_labels != 0), -1)
            labels.append(image_labels)
        return torch.stack(labels), torch.stack(matched_boxes)

    def losses(
        self, maps: list[torch.Tensor], anchors: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Binary cross-entropy on the sampled anchors and the box loss on the positive ones, both over the
        number sampled. The head's outputs are computed for the sampled anchors alone (``RPNHead.at``), a
        fixed ``batch_size_per_image`` of them per image (those not sampled weigh zero)."""
        labels, matched_boxes = self.label_anchors(anchors, targets)
        positive, negative = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
        index, valid = sampled_indices(positive | negative, self.batch_size_per_image)  # (N, S)
        image = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
        logits, deltas = self.head.at(maps, image.flatten(), index.flatten())
        is_positive = positive.gather(1, index).flatten()
        weight = valid.flatten().to(logits.dtype)
        num_sampled = weight.sum().clamp(min=1)
        matched = matched_boxes.gather(1, index[..., None].expand(-1, -1, 4)).flatten(0, 1)
        target_deltas = self.box_coder.encode(matched, anchors[index.flatten()])
        target_deltas = torch.where(is_positive[:, None], target_deltas, 0)  # others weigh zero (and may be inf)
        loss_box = box_loss(deltas, target_deltas, self.box_loss_type, self.smooth_l1_beta,
                            is_positive.to(deltas.dtype)) / num_sampled
        loss_objectness = F.binary_cross_entropy_with_logits(
            logits, is_positive.to(logits.dtype), weight=weight, reduction="sum"
        ) / num_sampled
        return {"loss_rpn_objectness": loss_objectness, "loss_rpn_box": loss_box}
