"""COCO metrics with pycocotools' own ``COCOeval``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def load_results(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"results file {path} is not valid JSON: {error}") from error
    if not isinstance(results, list):
        raise ValueError(f"results file {path} must hold a list of COCO results, got {type(results).__name__}")
    return results


def coco_evaluate(coco_gt: COCO, results: Sequence[dict[str, Any]], iou_type: str = "bbox") -> dict[str, float]:
    """Run ``COCOeval`` on ``results`` (COCO results format) and return its 12 summary numbers by name.

    pycocotools prints its standard summary (the 12 lines) to stdout. With no results at all, every
    number is 0 (pycocotools itself cannot load an empty result list).
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {', '.join(IOU_TYPES)}, got {iou_type!r}")
    if not results:
        print(f"no {iou_type} results to evaluate: every metric is 0")
        return {name: 0.0 for name in STAT_NAMES}
    coco_dt = coco_gt.loadRes(list(results))
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
