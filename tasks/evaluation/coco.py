"""COCO metrics: pycocotools' own ``COCOeval`` (the reference), or the ``faster-coco-eval`` package's C++
implementation of the same computation (an optional backend: its 12 numbers equal pycocotools' to 1e-6,
tested on the official reference files); detections as COCO results entries, the format both read."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backbones.errors import UserError, UserFileNotFoundError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
BACKENDS = ("pycocotools", "faster_coco_eval")


def read_results_list(path: Path, what: str) -> list:
    """The JSON list a results file holds (its entries unchecked); a missing file, invalid JSON or another
    type is a ``UserError`` naming the file (``what``: the entries it should hold, for the message)."""
    if not path.is_file():
        raise UserFileNotFoundError(f"results file not found: {path}")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"results file {path} is not valid JSON: {error}") from error
    if not isinstance(results, list):
        raise UserError(f"results file {path} must hold a list of {what}, got {type(results).__name__}")
    return results


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """A COCO results file: a list of ``{"image_id", "category_id", "score"}`` entries with a ``bbox`` or a
    ``segmentation``. Anything else is a ``UserError`` naming the file and the first bad entry."""
    path = Path(path)
    results = read_results_list(path, "COCO results")
    for index, entry in enumerate(results):
        problem = _entry_problem(entry)
        if problem:
            raise UserError(f"results file {path}, entry {index}: {problem} (got {str(entry)[:200]})")
    return results


def results_to_array(results: Sequence[dict[str, Any]]) -> np.ndarray:
    """Box results as one ``(N, 7)`` float64 array ``[image_id, x, y, w, h, score, category_id]`` (the
    layout pycocotools' ``loadNumpyAnnotations`` reads): a few dozen bytes a result where a dict takes
    several hundred, for sending results between processes."""
    array = np.zeros((len(results), 7), dtype=np.float64)
    for row, r in zip(array, results):
        row[0], row[1:5], row[5], row[6] = r["image_id"], r["bbox"], r["score"], r["category_id"]
    return array


def array_to_results(array: np.ndarray, segmentations: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The COCO results entries of a ``results_to_array`` array (exactly the values that went in), with the
    ``segmentations`` of the same entries where given."""
    results = [{"image_id": int(row[0]), "category_id": int(row[6]), "bbox": row[1:5].tolist(), "score": float(row[5])}
               for row in array]
    for result, segmentation in zip(results, segmentations or ()):
        result["segmentation"] = segmentation
    return results


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Binary masks ``(D, H, W)`` as COCO RLEs (``{"size": [H, W], "counts": str}``, pycocotools' encoding:
    what results files and ``COCOeval`` read)."""
    if not len(masks):
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0)))
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()} for rle in rles]


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one COCO results entry, or None."""
    if not isinstance(entry, dict):
        return "not a mapping"
    for key in ("image_id", "category_id", "score"):
        if not isinstance(entry.get(key), (int, float)) or isinstance(entry.get(key), bool):
            return f"no numeric {key!r}"
    bbox = entry.get("bbox")
    if "segmentation" not in entry and bbox is None:
        return "neither 'bbox' nor 'segmentation'"
    if bbox is not None and (not isinstance(bbox, list) or len(bbox) != 4
                             or not all(isinstance(v, (int, float)) for v in bbox)):
        return "'bbox' is not four numbers [x, y, w, h]"
    return None


@dataclass
class CocoReport:
    """What one COCO evaluation gives: the 12 summary numbers by name; per category of the ground truth
    ``{"category_id", "name", "AP", "AP50", "AP75"}`` (all areas, 100 detections an image; ``None`` for
    a category without ground truth), from the same accumulated precision, so that the mean of the
    categories' AP is the summary AP; and the precision-recall curves behind them: ``recall`` (R,) and,
    for IoU 0.5 and 0.75, ``precision[iou]`` (K categories, R) with -1 where a category has no ground truth."""

    summary: dict[str, float]
    per_category: list[dict[str, Any]] = field(default_factory=list)
    recall: np.ndarray = field(default_factory=lambda: np.zeros(0))
    precision: dict[float, np.ndarray] = field(default_factory=dict)


def coco_evaluate(coco_gt: COCO, results: Sequence[dict[str, Any]], iou_type: str = "bbox",
                  backend: str = "pycocotools") -> dict[str, float]:
    """The 12 summary numbers of ``coco_report``."""
    return coco_report(coco_gt, results, iou_type, backend).summary


def coco_report(coco_gt: COCO, results: Sequence[dict[str, Any]], iou_type: str = "bbox",
                backend: str = "pycocotools") -> CocoReport:
    """Run COCO evaluation on ``results`` (COCO results format): see ``CocoReport``.

    ``backend``: ``pycocotools`` (``COCOeval``, the reference) or ``faster_coco_eval`` (the same numbers,
    several times faster; ``pip install faster-coco-eval``). Either prints the standard summary (the 12
    lines) to stdout. With no results at all, every number is 0 (pycocotools itself cannot load an empty
    result list). Results for images the ground truth does not have, or without what ``iou_type`` needs,
    are a ``UserError``.
    """
    if iou_type not in IOU_TYPES:
        raise UserError(f"iou_type must be one of {', '.join(IOU_TYPES)}, got {iou_type!r}")
    if backend not in BACKENDS:
        raise UserError(f"the COCO evaluation backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not results:
        print(f"no {iou_type} results to evaluate: every metric is 0")
        return CocoReport({name: 0.0 for name in STAT_NAMES})
    unknown = sorted({r["image_id"] for r in results} - set(coco_gt.getImgIds()))
    if unknown:
        raise UserError(f"{len(unknown)} image ids of the results are not in the ground truth (first: "
                        f"{unknown[:5]}): are the results for this annotation file?")
    needed = "bbox" if iou_type == "bbox" else "segmentation"
    lacking = next((i for i, r in enumerate(results) if needed not in r), None)
    if lacking is not None:
        raise UserError(f"result {lacking} has no {needed!r}, which --iou-type {iou_type} evaluates")
    # copies (loadRes adds keys: area, id, a bbox as an array); an entry with a bbox is read as a box result
    # (loadRes replaces its segmentation by the box), so the segm evaluation reads the masks alone
    unused = "bbox" if iou_type == "segm" else "segmentation"
    results = [{k: v for k, v in r.items() if k != unused} for r in results]
    if backend == "faster_coco_eval":
        evaluator = _faster_coco_eval(coco_gt, results, iou_type)
    else:
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    summary = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    precision = np.asarray(evaluator.eval["precision"])[:, :, :, 0, -1]  # (T, R, K): area "all", 100 detections
    thresholds = np.asarray(evaluator.params.iouThrs)
    curves = {iou: precision[np.isclose(thresholds, iou)][0].T for iou in (0.5, 0.75)}
    return CocoReport(summary, _per_category(evaluator, coco_gt), np.asarray(evaluator.params.recThrs), curves)


def _per_category(evaluator, coco_gt: COCO) -> list[dict[str, Any]]:
    """Per-category AP, AP50, AP75 from the evaluator's accumulated precision (IoU thresholds x recall
    points x categories x areas x max detections; -1 where a category has no ground truth)."""
    precision = np.asarray(evaluator.eval["precision"])
    thresholds = np.asarray(evaluator.params.iouThrs)

    def mean(values: np.ndarray) -> float | None:
        values = values[values > -1]
        return float(values.mean()) if values.size else None

    rows = []
    for k, category in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]  # area "all", the largest max-detections setting
        rows.append({"category_id": int(category), "name": coco_gt.cats[category].get("name", str(category)),
                     "AP": mean(p), "AP50": mean(p[np.isclose(thresholds, 0.5)]),
                     "AP75": mean(p[np.isclose(thresholds, 0.75)])})
    return rows


def format_per_category(rows: list[dict[str, Any]], iou_type: str = "bbox") -> str:
    """The per-category table printed under the summary (best first; categories without ground truth last)."""
    ordered = sorted(rows, key=lambda r: -1 if r["AP"] is None else r["AP"], reverse=True)
    width = max([len(r["name"]) for r in rows] + [8])
    lines = [f"{iou_type} per category:", f"{'category':<{width}}  {'AP':>6}  {'AP50':>6}  {'AP75':>6}"]
    for row in ordered:
        cells = ["   n/a" if row[k] is None else f"{100 * row[k]:6.1f}" for k in ("AP", "AP50", "AP75")]
        lines.append(f"{row['name']:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def _faster_coco_eval(coco_gt: COCO, results: Sequence[dict[str, Any]], iou_type: str):
    """faster-coco-eval's evaluator over the same ground truth (its own index of ``coco_gt.dataset``)."""
    try:
        from faster_coco_eval import COCO as FastCOCO  # noqa: PLC0415  optional backend (the fast-eval extra)
        from faster_coco_eval import COCOeval_faster  # noqa: PLC0415
    except ImportError as error:
        raise UserError("the faster_coco_eval backend needs the faster-coco-eval package: pip install "
                        "faster-coco-eval (or the project's extra: pip install -e '.[fast-eval]')") from error
    gt = FastCOCO()
    gt.dataset = coco_gt.dataset
    gt.createIndex()
    return COCOeval_faster(gt, gt.loadRes(results), iou_type, print_function=print)


def to_coco_results(
    detections: Mapping[str, torch.Tensor], image_id: int, label_to_category: Mapping[int, int]
) -> list[dict[str, Any]]:
    """COCO results entries: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``, and where the
    detections have ``masks`` (D, H, W) their ``segmentation`` (RLE). Labels with no category (in
    ``label_to_category``) have nothing to be scored against and are left out."""
    boxes = detections["boxes"].tolist()
    known = [int(label) in label_to_category  # e.g. the ids COCO leaves unused, which torchvision's 91-way heads have
             for label in detections["labels"].tolist()]
    results = [
        {
            "image_id": image_id,
            "category_id": int(label_to_category[int(label)]),
            "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
            "score": round(float(score), 5),
        }
        for (x1, y1, x2, y2), score, label, ok in zip(boxes, detections["scores"].tolist(),
                                                     detections["labels"].tolist(), known) if ok
    ]
    if "masks" in detections:
        for result, rle in zip(results, encode_masks(detections["masks"][torch.tensor(known, dtype=torch.bool)])):
            result["segmentation"] = rle
    return results
