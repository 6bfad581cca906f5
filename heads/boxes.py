"""Box coding, IoU matching and balanced sampling: the pieces the RPN and the RoI heads share.

Boxes are ``(x1, y1, x2, y2)`` in pixels. IoU, NMS and clipping come from ``torchvision.ops``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import box_iou, nms

# Largest log-scale a decoded box may grow by (a box can become at most 1000/16 times its anchor).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes a box relative to a reference box as ``(dx, dy, dw, dh)`` (R-CNN parameterization) scaled by
    ``weights``, and decodes back. Both work elementwise on any leading shape."""

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights = weights
        self.scale_clamp = scale_clamp

    def encode(self, boxes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Deltas (..., 4) that turn ``reference`` (..., 4) into ``boxes`` (..., 4)."""
        wx, wy, ww, wh = self.weights
        ref_w = reference[..., 2] - reference[..., 0]
        ref_h = reference[..., 3] - reference[..., 1]
        ref_x = reference[..., 0] + 0.5 * ref_w
        ref_y = reference[..., 1] + 0.5 * ref_h
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        x = boxes[..., 0] + 0.5 * w
        y = boxes[..., 1] + 0.5 * h
        return torch.stack(
            (wx * (x - ref_x) / ref_w, wy * (y - ref_y) / ref_h, ww * torch.log(w / ref_w), wh * torch.log(h / ref_h)),
            dim=-1,
        )

    def decode(self, deltas: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Boxes from ``deltas`` (..., K*4) applied to ``reference`` (..., 4): (..., K*4), one box per group
        of four (K classes for class-specific regression). Computed in at least float32: under bf16/fp16
        autocast the deltas arrive in half precision, and rounding the reference boxes to it would move
        coordinates of 1000 px by up to 8 px (bf16's step there)."""
        dtype = torch.promote_types(deltas.dtype, torch.float32)
        deltas, reference = deltas.to(dtype), reference.to(dtype)
        wx, wy, ww, wh = self.weights
        widths = (reference[..., 2] - reference[..., 0]).unsqueeze(-1)
        heights = (reference[..., 3] - reference[..., 1]).unsqueeze(-1)
        ctr_x = reference[..., 0].unsqueeze(-1) + 0.5 * widths
        ctr_y = reference[..., 1].unsqueeze(-1) + 0.5 * heights
        dx = deltas[..., 0::4] / wx
        dy = deltas[..., 1::4] / wy
        dw = torch.clamp(deltas[..., 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[..., 3::4] / wh, max=self.scale_clamp)
        pred_x = dx * widths + ctr_x
        pred_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)
        half_h = 0.5 * (torch.exp(dh) * heights)
        boxes = torch.stack((pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h), dim=-1)
        return boxes.flatten(-2)


def clip_boxes(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Boxes ``(N, K, 4)`` clipped to their image, of ``(h, w)`` in ``sizes`` ``(N, 2)``: torchvision's
    ``clip_boxes_to_image``, batched, the sizes a tensor (so that neither a compiled graph nor an export
    fixes them at the sizes it was made with)."""
    sizes = sizes.to(boxes.dtype)[:, None, :]  # (N, 1, 2)
    x = boxes[..., 0::2].clamp(min=0).minimum(sizes[..., 1:])
    y = boxes[..., 1::2].clamp(min=0).minimum(sizes[..., :1])
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def ground_truth_iou(target: dict[str, torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    """IoU ``(G, B)`` of an image's ground-truth boxes with ``boxes`` ``(B, 4)``; rows of padding (label 0:
    the classes are 1..K) are -1, so that they match nothing, not even as a best low-quality match."""
    return box_iou(target["boxes"], boxes).masked_fill((target["labels"] == 0)[:, None], -1.0)


def box_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, beta: float,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Summed regression loss of ``pred`` and ``target`` (B, 4): ``smooth_l1`` (with ``beta``) or ``l1``,
    each box's term times its ``weight`` (B,) when given (0 for the boxes of a fixed-size set that do not
    count)."""
    if kind == "smooth_l1":
        loss = F.smooth_l1_loss(pred, target, beta=beta, reduction="none")
    elif kind == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    else:
        raise ValueError(f"unknown box loss {kind!r}; choose smooth_l1 or l1")
    return (loss if weight is None else loss * weight[:, None]).sum()


class Matcher:
    """Assigns each prediction (anchor or proposal) the ground truth of highest IoU.

    ``match(iou)`` takes IoUs ``(G, P)`` (``G`` may be 0) and returns ``(matched_gt (P,), labels (P,))``
    with labels 1 (IoU >= high), 0 (IoU < low) and -1 (in between: ignored). With
    ``allow_low_quality_matches``, each ground truth's best predictions (all ties) become positives even
    below ``high`` (the Faster R-CNN paper's rule (i) for anchors).
    """

    def __init__(self, high: float, low: float, allow_low_quality_matches: bool = False):
        if low > high:
            raise ValueError(f"matcher low threshold {low} above high threshold {high}")
        self.high, self.low, self.allow_low_quality_matches = high, low, allow_low_quality_matches

    def match(self, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_predictions = iou.shape[1]
        if iou.shape[0] == 0:  # no ground truth: everything is background
            zeros = torch.zeros(num_predictions, dtype=torch.int64, device=iou.device)
            return zeros, zeros.clone()
        best_iou, matched = iou.max(dim=0)
        # masked_fill, not boolean-mask assignment: the same labels with no host sync on a GPU
        labels = torch.ones_like(matched).masked_fill(best_iou < self.high, -1).masked_fill(best_iou < self.low, 0)
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1, keepdim=True).values
            is_best = ((iou == best_per_gt) & (best_per_gt > 0)).any(dim=0)
            labels = labels.masked_fill(is_best, 1)
        return matched, labels


def sample_balanced(labels: torch.Tensor, batch_size: int, positive_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positives (label 1) and negatives (label 0) for each row of ``labels`` (N, P), at most
    ``batch_size`` per row of which at most ``positive_fraction`` positive (negatives fill the rest).

    Batched over rows: a random key per element, ranked within positives and within negatives.
    Returns boolean masks ``(positive (N, P), negative (N, P))``.
    """
    positive = labels == 1
    negative = labels == 0
    num_pos = positive.sum(dim=1).clamp(max=int(batch_size * positive_fraction))
    num_neg = negative.sum(dim=1).clamp(max=batch_size - num_pos)
    keys = torch.rand(labels.shape, device=labels.device)

    def take(mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        ranked = torch.where(mask, keys, torch.full_like(keys, 2.0))  # candidates first, in random order
        order = ranked.argsort(dim=1)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return mask & (rank < count[:, None])

    return take(positive, num_pos), take(negative, num_neg)


def loops_over_groups(boxes: torch.Tensor) -> bool:
    """The CPU's choice in ``batched_nms``: above 4 000 box numbers one NMS per group is faster there (NMS
    compares each kept box with every later one, of any group), as torchvision's ``batched_nms`` decides;
    never while tracing or compiling (one call is one graph), and never on CUDA, where each NMS call is a
    host round trip."""
    return (boxes.device.type == "cpu" and boxes.numel() > 4000 and not torchvision._is_tracing()
            and not torch.compiler.is_compiling())


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each group (``groups`` (B,) integers): indices of the kept boxes, best score first.

    One ``torchvision.ops.nms`` call for all groups (the images and levels or classes of a whole batch: one
    host round trip on CUDA): each group's boxes are moved apart by ``group * (extent + 1)``. The shifted
    coordinates are float64, where adding the offsets to float32 boxes is exact, so the overlaps are the
    ones of the unshifted boxes to float32 rounding however many groups there are (shifted float32
    coordinates of a 1333-px image in 1000 groups would lose 0.1 px), except in an exported graph (ONNX's
    NonMaxSuppression takes float32 only; one image's classes there). On the CPU, for many boxes, one NMS
    per group (``loops_over_groups``): the same result, faster there."""
    if loops_over_groups(boxes):
        return torchvision.ops.batched_nms(boxes, scores, groups, iou_threshold)
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if not torch.compiler.is_exporting():  # an exported graph stays float32: ONNX's NonMaxSuppression takes no other
        boxes, scores = boxes.double(), scores.double()
    offsets = groups.to(boxes.dtype) * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def sampled_indices(sampled: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled elements of each row of ``sampled`` (N, P) as fixed-size indices: ``(index (N, S), valid
    (N, S))`` with ``S = min(size, P)``; each row lists its sampled elements in increasing order, then
    (``valid`` False) unsampled ones to fill the row. A ``topk``, not ``nonzero``: the sizes are known before
    the data, so the host never waits for the device."""
    count = sampled.shape[1]
    rank = torch.where(sampled, torch.arange(count, 0, -1, device=sampled.device), 0)  # earlier: higher; unsampled 0
    _, order = rank.topk(min(size, count), dim=1)  # sorted: the sampled ones first, in increasing order
    return order, sampled.gather(1, order)
