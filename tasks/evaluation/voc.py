"""PASCAL VOC detection metrics, as the official devkit computes them (``VOCevaldet``, ported to Python by
py-faster-rcnn and detectron2): per-class average precision at an IoU threshold, with the VOC2007 11-point
rule or the area rule (VOC2010 on), the mean over classes (mAP at IoU 0.5), and the COCO-style AP (the mean
over IoU 0.50:0.95), AP50 and AP75 that the self-supervised literature reports after detectron2.

Coordinates are detectron2's: boxes in 0-based pixels ``(x1, y1, x2, y2)`` where the XML's 1-based
``(xmin, ymin, xmax, ymax)`` read as ``(xmin - 1, ymin - 1, xmax, ymax)``. The metric works in the devkit's
coordinates: each box goes back to 1-based as ``(x1 + 1, y1 + 1, x2, y2)`` and the IoU counts inclusive
pixels (``+ 1`` on every width and height), exactly as the devkit does.

Difficult objects are ignore regions: a detection matched to one is neither a true nor a false positive,
and they are not counted among the positives. A class with no positive (every object of it difficult, or
none) has no AP (``None``) and stays out of the means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backbones.errors import UserError

from .coco import read_results_list

RULES = ("11point", "area")
IOU_THRESHOLDS = tuple(t / 100 for t in range(50, 100, 5))


@dataclass
class VocTruth:
    """One image's objects: ``boxes`` ``(G, 4)`` 0-based ``(x1, y1, x2, y2)``, ``labels`` ``(G,)`` class
    indices, ``difficult`` ``(G,)`` flags."""

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


@dataclass
class VocDetections:
    """Detections of every image, in the order given: ``image_ids`` ``(D,)``, ``labels`` ``(D,)`` class
    indices, ``scores`` ``(D,)``, ``boxes`` ``(D, 4)`` 0-based ``(x1, y1, x2, y2)``."""

    image_ids: Sequence[str]
    labels: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray


@dataclass
class VocReport:
    """``per_class[t][c]``: class ``c``'s AP at ``IOU_THRESHOLDS[t]`` (``None``: the class has no positive);
    ``summary``: ``mAP`` (IoU 0.5, the VOC number), ``AP`` (mean over 0.50:0.95), ``AP50``, ``AP75``."""

    rule: str
    class_names: Sequence[str]
    per_class: list[list[float | None]]
    summary: dict[str, float] = field(default_factory=dict)

    def class_ap(self, threshold: float = 0.5) -> dict[str, float | None]:
        row = self.per_class[IOU_THRESHOLDS.index(threshold)]
        return dict(zip(self.class_names, row))


def average_precision(recall: np.ndarray, precision: np.ndarray, rule: str) -> float:
    """The devkit's AP of a precision/recall curve: ``11point``, the mean of the best precision at recall
    >= 0, 0.1, ..., 1 (VOC2007); ``area``, the area under the curve made monotone (VOC2010 on)."""
    if rule == "11point":
        # the devkit's thresholds, np.arange's floating-point values included (0.30000000000000004, ...)
        return float(sum(precision[recall >= t].max(initial=0.0) for t in np.arange(0.0, 1.1, 0.1)) / 11)
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope: best precision at this recall or more
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def _inclusive_iou(box: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of one box with each of ``truth`` ``(G, 4)``, both in the devkit's 1-based inclusive pixels."""
    width = np.maximum(np.minimum(truth[:, 2], box[2]) - np.maximum(truth[:, 0], box[0]) + 1.0, 0.0)
    height = np.maximum(np.minimum(truth[:, 3], box[3]) - np.maximum(truth[:, 1], box[1]) + 1.0, 0.0)
    inter = width * height
    union = ((box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
             + (truth[:, 2] - truth[:, 0] + 1.0) * (truth[:, 3] - truth[:, 1] + 1.0) - inter)
    return inter / union


def _class_ap(truths: dict[str, VocTruth], detections: VocDetections, label: int, threshold: float,
              rule: str) -> float | None:
    """One class's AP at one IoU threshold: detections in descending score (the devkit's ``argsort`` of the
    negated scores, ties as it orders them), each matched greedily to the unmatched object it overlaps most."""
    positives = sum(int(np.sum((t.labels == label) & ~t.difficult)) for t in truths.values())
    if positives == 0:
        return None
    mine = np.flatnonzero(detections.labels == label)
    order = mine[np.argsort(-detections.scores[mine])]
    hits = np.zeros(len(order))
    misses = np.zeros(len(order))
    taken: dict[str, np.ndarray] = {}
    for k, d in enumerate(order):
        image = detections.image_ids[d]
        truth = truths[image]
        objects = np.flatnonzero(truth.labels == label)
        if len(objects) == 0:
            misses[k] = 1
            continue
        box = detections.boxes[d] + np.array([1.0, 1.0, 0.0, 0.0])  # back to the devkit's 1-based pixels
        overlaps = _inclusive_iou(box, truth.boxes[objects] + np.array([1.0, 1.0, 0.0, 0.0]))
        best = int(np.argmax(overlaps))
        if overlaps[best] > threshold:
            if truth.difficult[objects[best]]:
                continue  # an ignore region: neither a hit nor a miss
            used = taken.setdefault(image, np.zeros(len(truth.labels), dtype=bool))
            if used[objects[best]]:
                misses[k] = 1  # a duplicate of an object already found
            else:
                hits[k], used[objects[best]] = 1, True
        else:
            misses[k] = 1
    hits, misses = np.cumsum(hits), np.cumsum(misses)
    recall = hits / positives
    precision = hits / np.maximum(hits + misses, np.finfo(np.float64).eps)
    return average_precision(recall, precision, rule)


def evaluate_voc(truths: dict[str, VocTruth], detections: VocDetections, class_names: Sequence[str],
                 rule: str = "11point", thresholds: Sequence[float] = IOU_THRESHOLDS) -> VocReport:
    """Every class's AP at every threshold, and the summary (see ``VocReport``). Every detection's image must
    be one of ``truths`` (the caller checks, naming the file)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
    per_class = [[_class_ap(truths, detections, c, t, rule) for c in range(len(class_names))] for t in thresholds]
    means = [float(np.mean([ap for ap in row if ap is not None])) if any(ap is not None for ap in row) else 0.0
             for row in per_class]
    summary = {"AP": float(np.mean(means)), "mAP": means[list(thresholds).index(0.5)] if 0.5 in thresholds else 0.0}
    for name, t in (("AP50", 0.5), ("AP75", 0.75)):
        if t in thresholds:
            summary[name] = means[list(thresholds).index(t)]
    return VocReport(rule, list(class_names), per_class, summary)


def load_voc_detections(path: str | Path, image_ids: Sequence[str], num_classes: int) -> VocDetections:
    """A results file in COCO's results format for a VOC split: ``image_id`` the file stem (a string),
    ``category_id`` 1..K in VOC order, ``score``, ``bbox`` ``[x, y, w, h]`` in 0-based pixels. Anything else (an
    image not in the split, a category out of range) is a ``UserError`` naming the file and the entry."""
    path = Path(path)
    return voc_detections(read_results_list(path, "results"), image_ids, num_classes, f"results file {path}")


def voc_detections(entries: Sequence[Any], image_ids: Sequence[str], num_classes: int, where: str) -> VocDetections:
    """COCO-format results entries (as ``load_voc_detections`` reads them) as ``VocDetections``; a wrong entry is
    a ``UserError`` naming ``where`` and the entry."""
    known = set(image_ids)
    ids, labels, scores, boxes = [], [], [], []
    for index, entry in enumerate(entries):
        problem = _voc_entry_problem(entry, known, num_classes)
        if problem:
            raise UserError(f"{where}, entry {index}: {problem} (got {str(entry)[:200]})")
        x, y, w, h = entry["bbox"]
        ids.append(str(entry["image_id"]))
        labels.append(int(entry["category_id"]) - 1)
        scores.append(float(entry["score"]))
        boxes.append((x, y, x + w, y + h))
    return VocDetections(ids, np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64),
                         np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def _voc_entry_problem(entry: Any, known: set[str], num_classes: int) -> str | None:
    if not isinstance(entry, dict):
        return "not a mapping"
    if str(entry.get("image_id")) not in known:
        return f"image_id {entry.get('image_id')!r} is not an image of the split (image ids are the file stems)"
    category = entry.get("category_id")
    if not isinstance(category, int) or isinstance(category, bool) or not 1 <= category <= num_classes:
        return f"category_id must be 1..{num_classes} (the classes in VOC order)"
    if not isinstance(entry.get("score"), (int, float)) or isinstance(entry.get("score"), bool):
        return "no numeric 'score'"
    bbox = entry.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        return "'bbox' is not four numbers [x, y, w, h]"
    return None


def voc_report_json(report: VocReport) -> dict[str, Any]:
    """What ``tools/eval.py --voc`` writes: the rule, the summary, each class's AP at IoU 0.5 and at every
    threshold."""
    return {"rule": report.rule, **report.summary, "per_class": report.class_ap(0.5),
            "per_class_by_iou": {f"{t:.2f}": dict(zip(report.class_names, row))
                                 for t, row in zip(IOU_THRESHOLDS, report.per_class)}}


def format_voc_report(report: VocReport) -> str:
    """The per-class table at IoU 0.5 and the summary line, as printed."""
    lines = [f"VOC detection ({report.rule} rule), AP per class at IoU 0.5:"]
    lines += [f"{name:<14}{'—' if ap is None else f'{100 * ap:6.2f}'}" for name, ap in report.class_ap(0.5).items()]
    s = report.summary
    lines.append(f"mAP {100 * s['mAP']:.2f}; COCO-style AP {100 * s['AP']:.2f}, AP50 {100 * s['AP50']:.2f}, "
                 f"AP75 {100 * s['AP75']:.2f}")
    return "\n".join(lines)
