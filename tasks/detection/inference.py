"""Detection inference on image files: test-time resize, model, boxes back in original pixels, COCO
results, drawings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from backbones.errors import UserFileNotFoundError

from ..data import ShortestEdgeResize, read_image
from .model import FasterRCNN

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
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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


class DetectionPredictor:
    """Runs a detector on RGB ``uint8`` arrays ``(H, W, 3)`` of any size: resizes to the test scale
    (shorter side ``min_size``, longer at most ``max_size``) and returns boxes in the array's pixels."""

    def __init__(self, model: FasterRCNN, min_size: int, max_size: int, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.resize = ShortestEdgeResize([min_size], max_size)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        resized = [torch.from_numpy(self.resize(image=img)["image"]).permute(2, 0, 1) for img in images]
        detections = self.model(resized, original_sizes=[img.shape[:2] for img in images])
        return [{k: v.cpu() for k, v in d.items()} for d in detections]


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


def draw_detections(
    image: np.ndarray, detections: Mapping[str, torch.Tensor], names: Mapping[int, str], min_score: float = 0.5
) -> Image.Image:
    """The image with its detections of score >= ``min_score`` drawn as boxes with ``name score``."""
    keep = detections["scores"] >= min_score
    if not keep.any():
        return Image.fromarray(np.ascontiguousarray(image))
    labels = [f"{names.get(int(label), str(int(label)))} {score:.2f}"
              for label, score in zip(detections["labels"][keep], detections["scores"][keep])]
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    drawn = draw_bounding_boxes(canvas, detections["boxes"][keep], labels=labels, colors="red", width=2)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def load_images(paths: Sequence[Path]) -> list[np.ndarray]:
    return [read_image(p) for p in paths]
