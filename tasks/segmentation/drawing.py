"""Drawing a class map as a coloured overlay with a legend."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def palette(num_classes: int) -> np.ndarray:
    """(K, 3) distinct colours; class 0 (background) is black (left undrawn in overlays)."""
    colours = np.zeros((num_classes, 3), np.uint8)
    for k in range(1, num_classes):  # the Pascal VOC bit-interleaving palette
        c, i = k, 0
        while c:
            for channel in range(3):
                colours[k, channel] |= ((c >> channel) & 1) << (7 - i)
            c >>= 3
            i += 1
    return colours


def draw_segmentation(image: np.ndarray, classes: np.ndarray, class_names: Sequence[str],
                      alpha: float = 0.5) -> Image.Image:
    """``image`` (H, W, 3) with every non-background pixel of ``classes`` (H, W) tinted by its class colour,
    and a legend of the classes present."""
    colours = palette(len(class_names))
    overlay = image.astype(np.float32)
    tinted = classes > 0
    overlay[tinted] = (1 - alpha) * overlay[tinted] + alpha * colours[classes[tinted]]
    canvas = Image.fromarray(overlay.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    y = 2
    for k in sorted(set(np.unique(classes).tolist()) - {0}):
        if k >= len(class_names):
            continue
        draw.rectangle([2, y, 12, y + 10], fill=tuple(int(v) for v in colours[k]), outline=(255, 255, 255))
        draw.text((16, y), class_names[k], fill=(255, 255, 255))
        y += 14
    return canvas
