"""Semantic segmentation metrics: a confusion matrix accumulated over images (and summed over
processes), reduced to pixel accuracy, mean IoU and per-class IoU."""

from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = 255  # label of pixels that count neither as right nor as wrong (crowds, overlaps, borders)


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) counts, rows the true class, columns the predicted one; ``ignore_index`` pixels left out."""
    valid = target != ignore_index
    index = target[valid].long() * num_classes + prediction[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Pixel accuracy, mean IoU over the classes present (in the ground truth or the predictions) and
    per-class IoU from a confusion matrix."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = true_positive / union.clamp(min=1)
    present = union > 0
    metrics = {
        "mIoU": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_accuracy": float(true_positive.sum() / confusion.sum().clamp(min=1)),
    }
    names = class_names or [str(i) for i in range(len(iou))]
    for name, value, is_present in zip(names, iou.tolist(), present.tolist()):
        if is_present:
            metrics[f"IoU/{name}"] = value
    return metrics
