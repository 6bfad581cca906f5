"""Detection inference output: COCO results entries, class names and colours, drawings."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from backbones.errors import UserError, UserFileNotFoundError

from ..coco_table import read_coco_json
from ..config import Config, resolve_path
from ..data import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)


# COCO 2017 category id -> name (the 80 "thing" categories).
COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


def list_images(path: str | Path) -> list[Path]:
    """``path`` itself if it is an image file, else the image files in the folder, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserFileNotFoundError(f"input not found: {path}")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserFileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return files


def label_names(config: Config, run_dir: Path | None, num_classes: int) -> tuple[dict[int, int], dict[int, str]]:
    """label -> COCO category id, and label -> name, for the config's label map. With ``coco_id`` every
    label is its own category id (torchvision's detectors also output the ids COCO leaves unused)."""
    annotations = resolve_path(config.data.root, config.data.val.annotations)
    # an 80-class contiguous model without its dataset at hand (a model-zoo download, say) is COCO's
    coco_model = not annotations.is_file() and num_classes == len(COCO_CATEGORIES)
    if run_dir is not None and (run_dir / "categories.json").is_file():
        categories = json.loads((run_dir / "categories.json").read_text())
    elif config.data.label_map == "coco_id" or coco_model:
        if config.data.label_map != "coco_id":
            logger.info("labels 1..80 named as COCO's categories (%s not found)", annotations)
        categories = [{"id": i, "name": n} for i, n in COCO_CATEGORIES.items()]
    elif not annotations.is_file():
        raise UserFileNotFoundError(
            f"the config maps labels to categories by data.label_map=contiguous, which needs the category list "
            f"of {annotations} (data.root, data.val.annotations) or a run folder's categories.json"
        )
    else:
        categories = read_coco_json(annotations)["categories"]
    categories = sorted(categories, key=lambda c: c["id"])
    if config.data.label_map == "contiguous" and len(categories) != num_classes:
        raise UserError(f"the model has {num_classes} classes but its category list has {len(categories)}: give the "
                        "run folder the model was trained in, or set model.num_classes / data.val.annotations to match")
    if config.data.label_map == "coco_id":
        return {i: i for i in range(1, num_classes + 1)}, {c["id"]: c["name"] for c in categories}
    return ({i + 1: c["id"] for i, c in enumerate(categories)}, {i + 1: c["name"] for i, c in enumerate(categories)})


def to_coco_results(
    detections: Mapping[str, torch.Tensor], image_id: int, label_to_category: Mapping[int, int]
) -> list[dict[str, Any]]:
    """COCO results entries: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``. Labels with
    no category (in ``label_to_category``) have nothing to be scored against and are left out."""
    boxes = detections["boxes"].tolist()
    return [
        {
            "image_id": image_id,
            "category_id": int(label_to_category[int(label)]),
            "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
            "score": round(float(score), 5),
        }
        for (x1, y1, x2, y2), score, label in zip(boxes, detections["scores"].tolist(), detections["labels"].tolist())
        if int(label) in label_to_category  # e.g. the ids COCO leaves unused, which torchvision's 91-way heads have
    ]


# Distinct, saturated colours (Tableau 20's strong half and a few more): class ``label`` is drawn in
# PALETTE[label % len(PALETTE)], the same in every picture.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 128, 128), (255, 215, 0),
           (128, 0, 0), (0, 0, 128), (255, 0, 255), (0, 255, 127)]


def class_color(label: int) -> tuple[int, int, int]:
    return PALETTE[int(label) % len(PALETTE)]


def draw_detections(
    image: np.ndarray, detections: Mapping[str, torch.Tensor], names: Mapping[int, str], min_score: float = 0.5
) -> Image.Image:
    """The image with its detections of score >= ``min_score`` (all of them when ``detections`` has no
    ``scores``: ground truth) drawn as boxes in their class's colour, each labelled ``name score`` on a
    filled background of that colour."""
    scores = detections.get("scores")
    keep = scores >= min_score if scores is not None else torch.ones(len(detections["labels"]), dtype=torch.bool)
    if not keep.any():
        return Image.fromarray(np.ascontiguousarray(image))
    labels = detections["labels"][keep].tolist()
    texts = [names.get(label, str(label)) for label in labels]
    if scores is not None:
        texts = [f"{text} {score:.2f}" for text, score in zip(texts, scores[keep].tolist())]
    colors = [class_color(label) for label in labels]
    text_colors = ["black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white" for r, g, b in colors]
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    drawn = draw_bounding_boxes(canvas, detections["boxes"][keep].float(), labels=texts, colors=colors, width=2,
                                fill_labels=True, label_colors=text_colors)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 6) -> Image.Image:
    """Two pictures of one height next to each other on white (ground truth | predictions)."""
    out = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    return out

