"""Checks of a COCO-layout dataset split, for ``tools/check_data.py``: everything that would stop or
quietly change a training run, found before it starts.

Errors (a run would stop on them): an annotation file that is not COCO JSON, images or categories
without the fields training reads, duplicate ids, annotations naming an unknown image or category, a
``bbox`` that is not four finite numbers, image files that are missing, and with ``decode`` files that
cannot be decoded or whose size differs from the annotation. Warnings (a run handles them): boxes that
are empty or lie outside their image (dropped), boxes that cross the image border (clipped), images
without annotations (skipped in training).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from backbones.errors import UserError

from .images import read_image

MAX_EXAMPLES = 5


@dataclass
class SplitReport:
    """What ``check_split`` found: counts, and problems by kind with a few examples each."""

    annotation_file: Path
    image_dir: Path
    counts: Counter = field(default_factory=Counter)
    errors: dict[str, list[str]] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)

    def error(self, kind: str, example: str) -> None:
        self._add(self.errors, kind, example)

    def warning(self, kind: str, example: str) -> None:
        self._add(self.warnings, kind, example)

    def _add(self, table: dict[str, list[str]], kind: str, example: str) -> None:
        self.counts[kind] += 1
        examples = table.setdefault(kind, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(example)

    def lines(self) -> list[str]:
        """The report as printed: counts, then each kind of error and warning with its examples."""
        out = [f"{self.annotation_file} (images in {self.image_dir}): {self.counts['images']} images, "
               f"{self.counts['annotations']} annotations, {self.counts['categories']} categories"]
        for title, table in (("error", self.errors), ("warning", self.warnings)):
            for kind, examples in table.items():
                out.append(f"  {title}: {self.counts[kind]} {kind}; e.g. " + "; ".join(examples))
        if not self.errors and not self.warnings:
            out.append("  no problems found")
        return out


def _decode(path: Path) -> tuple[int, int] | str:
    """The decoded (height, width) of an image file, or why it cannot be decoded."""
    try:
        image = read_image(path)
    except UserError as error:
        return str(error)
    return image.shape[0], image.shape[1]


def check_split(annotation_file: Path, image_dir: Path, decode: bool = False, workers: int | None = None) -> SplitReport:
    """Check one split; see the module docstring. ``decode`` decodes every image on ``workers`` processes
    (default: every core) with a progress bar."""
    report = SplitReport(Path(annotation_file), Path(image_dir))
    data = _read_annotation_file(annotation_file, report)
    if data is None:
        return report
    if not report.image_dir.is_dir():
        report.error("image folder missing", str(image_dir))
    categories = _check_categories(data["categories"], report)
    images = _check_images(data["images"], report)
    _check_annotations(data["annotations"], images, categories, report)
    _warn_unannotated_images(images, report)
    if decode and report.image_dir.is_dir():
        _check_decoding(images, report, workers)
    return report


def _read_annotation_file(annotation_file: Path, report: SplitReport) -> dict[str, Any] | None:
    """The parsed annotation file, or None (with the error reported) if it is missing, not JSON, or not a
    mapping with lists of images, annotations and categories."""
    try:
        data = json.loads(Path(annotation_file).read_text())
    except FileNotFoundError:
        report.error("annotation file missing", str(annotation_file))
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        report.error("annotation file not valid JSON", f"{annotation_file}: {error}")
        return None
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        report.error("annotation file not a COCO instances file", f"no list {', '.join(missing)}")
        return None
    return data


def _check_categories(categories_in: list[Any], report: SplitReport) -> set[Any]:
    """Count and check the categories; the set of valid category ids."""
    categories: set[Any] = set()
    for cat in categories_in:
        report.counts["categories"] += 1
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            report.error("categories without an integer id and a name", str(cat)[:120])
        elif cat["id"] in categories:
            report.error("duplicate category ids", str(cat["id"]))
        else:
            categories.add(cat["id"])
    return categories


def _check_images(images_in: list[Any], report: SplitReport) -> dict[Any, dict[str, Any]]:
    """Count and check the images and that their files exist; image id -> file name, size and an
    annotation count (zero, filled in by ``_check_annotations``)."""
    images: dict[Any, dict[str, Any]] = {}
    for info in images_in:
        report.counts["images"] += 1
        try:
            image_id, file_name = info["id"], str(info["file_name"])
            height, width = int(info["height"]), int(info["width"])
        except (KeyError, TypeError, ValueError):
            report.error("images without id, file_name, height and width", str(info)[:120])
            continue
        if image_id in images:
            report.error("duplicate image ids", str(image_id))
            continue
        if height <= 0 or width <= 0:
            report.error("images with a non-positive size", f"image {image_id}: {width}x{height}")
        images[image_id] = {"file_name": file_name, "height": height, "width": width, "annotations": 0}
        if report.image_dir.is_dir() and not (report.image_dir / file_name).is_file():
            report.error("image files missing", f"{report.image_dir / file_name} (image id {image_id})")
    return images


def _check_annotations(annotations: list[Any], images: dict[Any, dict[str, Any]], categories: set[Any],
                       report: SplitReport) -> None:
    """Count and check the annotations (ids, image, category, box), counting each image's annotations."""
    annotation_ids: set[Any] = set()
    for ann in annotations:
        report.counts["annotations"] += 1
        if not isinstance(ann, dict):
            report.error("annotations that are not mappings", str(ann)[:120])
            continue
        where = f"annotation {ann.get('id')} of image {ann.get('image_id')}"
        if ann.get("id") in annotation_ids:
            report.error("duplicate annotation ids", str(ann.get("id")))
        annotation_ids.add(ann.get("id"))
        info = images.get(ann.get("image_id"))
        if info is None:
            report.error("annotations of unknown images", where)
            continue
        info["annotations"] += 1
        if ann.get("category_id") not in categories:
            report.error("annotations of unknown categories", f"{where}: category_id {ann.get('category_id')!r}")
        _check_box(ann.get("bbox"), where, info, report)


def _check_box(bbox: Any, where: str, info: dict[str, Any], report: SplitReport) -> None:
    """Check one annotation's ``bbox`` against its image: an error if it is not four numbers, a warning
    if training drops it (non-finite, empty, outside the image) or clips it (crossing the border)."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        report.error("annotations without a bbox of four numbers", f"{where}: {bbox!r}")
        return
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        report.warning("boxes with non-finite coordinates (dropped)", f"{where}: {bbox}")
        return
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, info["width"]), min(y + h, info["height"])
    if w <= 0 or h <= 0:
        report.warning("empty boxes (dropped)", f"{where}: {bbox}")
    elif x2 <= x1 or y2 <= y1:
        report.warning("boxes outside their image (dropped)", f"{where}: {bbox} in {info['width']}x{info['height']}")
    elif x < 0 or y < 0 or x + w > info["width"] or y + h > info["height"]:
        report.warning("boxes crossing the image border (clipped)", f"{where}: {bbox} in {info['width']}x{info['height']}")


def _warn_unannotated_images(images: dict[Any, dict[str, Any]], report: SplitReport) -> None:
    for image_id, info in images.items():
        if not info["annotations"]:
            report.warning("images without annotations (skipped in training)", f"image {image_id}")


def _check_decoding(images: dict[Any, dict[str, Any]], report: SplitReport, workers: int | None) -> None:
    """Decode every image whose file exists on ``workers`` processes (default: every core), reporting
    files that cannot be decoded or whose size differs from the annotation; counts the decoded ones."""
    present = [(i, info) for i, info in images.items() if (report.image_dir / info["file_name"]).is_file()]
    paths = [report.image_dir / info["file_name"] for _, info in present]
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        decoded = list(tqdm(pool.map(_decode, paths, chunksize=8), total=len(paths), desc="decode",
                            dynamic_ncols=True, mininterval=1.0))
    for (image_id, info), path, result in zip(present, paths, decoded):
        if isinstance(result, str):
            report.error("images that cannot be decoded", result)
        elif result != (info["height"], info["width"]):
            report.error("images whose size differs from the annotation",
                         f"{path} (image id {image_id}) is {result[1]}x{result[0]}, annotated "
                         f"{info['width']}x{info['height']}")
    report.counts["decoded"] = sum(not isinstance(r, str) for r in decoded)
