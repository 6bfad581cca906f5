"""A synthetic COCO-format dataset: coloured shapes of several classes on textured backgrounds.

Deterministic from a seed. Writes the standard COCO layout under a root folder::

    annotations/instances_{train,val}2017.json   boxes, polygon masks, areas, categories
    {train,val}2017/*.jpg                        the images
    semantic_{train,val}2017/*.png               per-pixel class index (0 background)

Shapes do not overlap, so every polygon is also the visible mask and the semantic masks are exact.

    python -m tasks.data.synthetic datasets/synthetic --num-train 400 --num-val 100 --size 128

``--crops`` writes instead a classification set in the image-folder layout (``generate_crops``): every
shape cut out of its image, ``{train,val}/<shape>/*.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

from tasks.config import Config

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour gradient plus blurred noise and a few stripes: texture, not a flat colour."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-60, 60, (2, 3))
    image = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    noise = cv2.GaussianBlur(rng.normal(0, 25, (size, size, 3)).astype(np.float32), (0, 0), 2)
    image += noise
    for _ in range(rng.integers(0, 4)):
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 20)
        image += 12 * np.sin((x * math.cos(angle) + y * math.sin(angle)) * size / period * 2 * math.pi)[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_polygon(kind: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """(K, 2) polygon of a circle (32 vertices), square or triangle centred at (cx, cy)."""
    vertices = {1: 32, 2: 4, 3: 3}[kind]
    start = angle + (math.pi / 4 if kind == 2 else -math.pi / 2 if kind == 3 else 0)
    t = start + np.arange(vertices) * 2 * math.pi / vertices
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def make_image(rng: np.random.Generator, size: int, max_objects: int = 4):
    """One image, its objects as (category id, polygon) and its semantic mask."""
    image = _background(rng, size)
    semantic = np.zeros((size, size), np.uint8)
    objects: list[tuple[int, np.ndarray]] = []
    placed: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            radius = rng.uniform(0.08, 0.22) * size
            cx, cy = rng.uniform(radius, size - radius, 2)
            if all(math.hypot(cx - px, cy - py) > radius + pr + 2 for px, py, pr in placed):
                break
        else:
            continue
        kind = int(rng.integers(1, len(CATEGORIES) + 1))
        polygon = _shape_polygon(kind, cx, cy, radius, rng.uniform(0, 2 * math.pi))
        colour = rng.uniform(0, 255, 3)
        while np.abs(colour - image[int(cy), int(cx)]).sum() < 120:  # stand out from the background
            colour = rng.uniform(0, 255, 3)
        points = np.round(polygon * 16).astype(np.int32)  # sub-pixel precision for cv2 (shift=4)
        cv2.fillPoly(image, [points], colour.tolist(), lineType=cv2.LINE_AA, shift=4)
        cv2.fillPoly(semantic, [points], kind, lineType=cv2.LINE_8, shift=4)
        placed.append((cx, cy, radius))
        objects.append((kind, polygon))
    return image, objects, semantic


def generate(root: str | Path, num_train: int = 400, num_val: int = 100, size: int = 128, seed: int = 0) -> Path:
    """Write the dataset under ``root`` (see the module docstring). Returns ``root``."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count, split_seed in (("train2017", num_train, seed), ("val2017", num_val, seed + 1)):
        rng = np.random.default_rng(split_seed)
        (root / split).mkdir(exist_ok=True)
        (root / f"semantic_{split}").mkdir(exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            image, objects, semantic = make_image(rng, size)
            image_id = index + 1
            file_name = f"{image_id:06d}.jpg"
            cv2.imwrite(str(root / split / file_name), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(str(root / f"semantic_{split}" / f"{image_id:06d}.png"), semantic)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            for kind, polygon in objects:
                clipped = np.clip(polygon, 0, size)
                x1, y1 = clipped.min(axis=0)
                x2, y2 = clipped.max(axis=0)
                area = float(cv2.contourArea(clipped.astype(np.float32)))
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": kind,
                    "bbox": [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2), round(float(y2 - y1), 2)],
                    "segmentation": [np.round(clipped, 2).ravel().tolist()],
                    "area": round(area, 2),
                    "iscrowd": 0,
                })
        dataset = {"images": images, "annotations": annotations, "categories": CATEGORIES,
                   "info": {"description": f"synthetic shapes, seed {seed}"}}
        tmp = root / "annotations" / f".instances_{split}.json.tmp"
        tmp.write_text(json.dumps(dataset))
        tmp.replace(root / "annotations" / f"instances_{split}.json")  # the annotation file appears last
    return root


def ensure_generated(root: str | Path, num_train: int, num_val: int, size: int, seed: int) -> Path:
    """Generate the dataset unless both annotation files already exist."""
    root = Path(root)
    if not all((root / "annotations" / f"instances_{s}.json").is_file() for s in ("train2017", "val2017")):
        generate(root, num_train, num_val, size, seed)
    return root


def generate_crops(root: str | Path, num_train: int = 400, num_val: int = 100, size: int = 128, seed: int = 0,
                   crop_size: int = 32) -> Path:
    """A classification set in the image-folder layout, ``root/{train,val}/<shape>/*.png``: every shape of
    ``num_train`` (``num_val``) synthetic images cut out as a square around its box (enlarged by a quarter,
    so some background and parts of neighbours show) and resized to ``crop_size``. Returns ``root``."""
    root = Path(root)
    names = {c["id"]: c["name"] for c in CATEGORIES}
    for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1)):
        rng = np.random.default_rng(split_seed)
        for name in names.values():
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, objects, _ = make_image(rng, size)
            padded = cv2.copyMakeBorder(image, size, size, size, size, cv2.BORDER_REFLECT)  # crops may pass the edge
            for number, (kind, polygon) in enumerate(objects):
                (x1, y1), (x2, y2) = polygon.min(axis=0), polygon.max(axis=0)
                half = 0.625 * max(x2 - x1, y2 - y1)
                cx, cy = (x1 + x2) / 2 + size, (y1 + y2) / 2 + size
                crop = padded[int(round(cy - half)):int(round(cy + half)), int(round(cx - half)):int(round(cx + half))]
                crop = cv2.resize(crop, (crop_size, crop_size), interpolation=cv2.INTER_AREA)
                cv2.imwrite(str(root / split / names[kind] / f"{index:06d}_{number}.png"), crop[..., ::-1])
    (root / "done").write_text("generated\n")  # written last: a complete set
    return root


def ensure_crops(root: str | Path, num_train: int, num_val: int, size: int, seed: int, crop_size: int = 32) -> Path:
    """Generate the crops (``generate_crops``) unless a complete set is already there."""
    root = Path(root)
    if not (root / "done").is_file():
        generate_crops(root, num_train, num_val, size, seed, crop_size)
    return root


def prepare_data_root(config: Config) -> Path:
    """``data.root``, generating the synthetic dataset there first when ``data.synthetic`` asks for it."""
    root = Path(config.data.root)
    if config.data.synthetic is not None:
        s = config.data.synthetic
        ensure_generated(root, s.num_train, s.num_val, s.size, s.seed)
    return root
