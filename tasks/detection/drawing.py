"""Detection inference output: COCO results entries, class names and colours, drawings."""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

logger = logging.getLogger(__name__)


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
    filled background of that colour; their ``masks`` (D, H, W), where given, filled translucent in the same
    colour under the boxes."""
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
    if "masks" in detections:
        canvas = draw_segmentation_masks(canvas, detections["masks"][keep].bool(), alpha=0.45, colors=colors)
    drawn = draw_bounding_boxes(canvas, detections["boxes"][keep].float(), labels=texts, colors=colors, width=2,
                                fill_labels=True, label_colors=text_colors)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 6) -> Image.Image:
    """Two pictures of one height next to each other on white (ground truth | predictions)."""
    out = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    return out

