"""A picture of classified images: each image enlarged, captioned with its true and predicted class."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def prediction_grid(images: Sequence[np.ndarray], captions: Sequence[tuple[str, str, float]], columns: int = 8,
                    cell: int = 128) -> Image.Image:
    """``images`` ((H, W, 3) uint8) in a grid of ``cell``-pixel squares, each above two caption lines: the
    true class, and the predicted class with its probability (green when right, red when wrong)."""
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * cell, rows * (cell + 28)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for index, (image, (truth, predicted, probability)) in enumerate(zip(images, captions)):
        x, y = (index % columns) * cell, (index // columns) * (cell + 28)
        canvas.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (x, y))
        draw.text((x + 2, y + cell + 1), f"true: {truth}", fill=(0, 0, 0))
        colour = (0, 140, 0) if truth == predicted else (200, 0, 0)
        draw.text((x + 2, y + cell + 14), f"pred: {predicted} {probability:.2f}", fill=colour)
    return canvas
