"""COCO detection data: ``instances_*.json`` + an image folder, read with pycocotools, augmented with
albumentations (boxes move with the image)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import albumentations as A
import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from backbones.errors import UserError, UserFileNotFoundError

from ..data import ShortestEdgeResize, read_image

logger = logging.getLogger(__name__)
LABEL_MAPS = ("contiguous", "coco_id")


def load_coco(annotation_file: str | Path) -> COCO:
    """A pycocotools index of ``annotation_file``, with an error naming the file if it is missing or not a
    COCO instances file."""
    path = Path(annotation_file)
    if not path.is_file():
        raise UserFileNotFoundError(f"annotation file not found: {path}; check data.root and the annotation name")
    try:
        with open(path) as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"annotation file {path} is not valid JSON: {error}") from error
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(dataset, dict) or k not in dataset]
    if missing:
        raise UserError(f"annotation file {path} is not a COCO instances file: no {', '.join(missing)}")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco.createIndex()
        except (KeyError, TypeError) as error:
            raise UserError(f"annotation file {path} has a malformed entry: {error!r}") from error
    return coco


def load_coco_split(annotation_file: str | Path, image_dir: str | Path) -> tuple[Path, Path, COCO]:
    """``(annotation_file, image_dir, load_coco(annotation_file))`` of a dataset split, with an error
    naming the image folder if it does not exist."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise UserFileNotFoundError(f"image folder not found: {image_dir}; check data.root and the image folder")
    return Path(annotation_file), image_dir, load_coco(annotation_file)


@dataclass
class ImageRecord:
    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # (G, 4) float32 x1, y1, x2, y2, clipped to the image
    labels: np.ndarray  # (G,) int64
    iscrowd: np.ndarray  # (G,) bool


class CocoDetection(Dataset):
    """Images with their boxes, labels and crowd flags.

    - ``label_map="contiguous"``: the categories, sorted by id, become labels 1..K; ``"coco_id"``: the
      label is the COCO category id (torchvision's 91-way convention). ``label_to_category`` maps back.
    - Crowd annotations are kept with ``iscrowd`` set: the heads neither use them as positives nor as
      negatives. Boxes that are degenerate once clipped to the image are dropped, counted in
      ``self.dropped`` and in one warning.
    - ``train=True`` skips images without any non-crowd box; evaluation keeps every image.

    Items are ``(image (3, H, W) uint8, target)``, ``target`` holding ``boxes``, ``labels``, ``iscrowd``
    (after augmentation), ``image_id`` and ``orig_size`` (h, w) of the file.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        transform: A.Compose | None = None,
        train: bool = False,
        label_map: str = "contiguous",
    ):
        if label_map not in LABEL_MAPS:
            raise UserError(f"data.label_map must be one of {', '.join(LABEL_MAPS)}, got {label_map!r}")
        self.annotation_file, self.image_dir, self.coco = load_coco_split(annotation_file, image_dir)
        self.transform, self.train = transform, train
        self.category_ids = sorted(self.coco.getCatIds())
        if label_map == "contiguous":
            self.category_to_label = {c: i + 1 for i, c in enumerate(self.category_ids)}
        else:
            self.category_to_label = {c: c for c in self.category_ids}
        self.label_to_category = {v: k for k, v in self.category_to_label.items()}
        self.num_classes = max(self.category_to_label.values(), default=0)
        self.category_names = {c["id"]: c["name"] for c in self.coco.loadCats(self.category_ids)}

        self.kept = 0  # annotations used as objects
        self.crowd = 0  # crowd annotations kept as ignore regions
        self.dropped: Counter[str] = Counter()  # reason -> count
        self.records: list[ImageRecord] = []
        self.skipped_images = 0
        for image_id in sorted(self.coco.getImgIds()):
            record = self._record(image_id)
            if train and not (~record.iscrowd).any():
                self.skipped_images += 1
                continue
            self.records.append(record)
        if self.dropped:
            logger.warning("%s: dropped %s", self.annotation_file, ", ".join(f"{n} {why}" for why, n in self.dropped.items()))
        if self.skipped_images:
            logger.info("%s: %d images without usable boxes skipped for training", self.annotation_file,
                        self.skipped_images)

    def _record(self, image_id: int) -> ImageRecord:
        info = self.coco.imgs[image_id]
        try:
            height, width, _ = int(info["height"]), int(info["width"]), str(info["file_name"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"image {image_id} in {self.annotation_file} lacks a valid height, width or file_name: "
                            f"{info!r}") from None
        boxes, labels, crowd = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            where = f"annotation {ann.get('id')} of image {image_id} in {self.annotation_file}"
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise UserError(f"{where} has no valid 'bbox' [x, y, w, h]: {bbox!r}")
            if ann.get("category_id") not in self.category_to_label:
                raise UserError(f"{where} has category_id {ann.get('category_id')!r}, not among the categories")
            try:
                x, y, w, h = (float(v) for v in bbox)
            except (TypeError, ValueError):
                raise UserError(f"{where} has a 'bbox' that is not four numbers: {bbox!r}") from None
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                self.dropped["boxes with non-finite coordinates"] += 1
                continue
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 <= x1 or y2 <= y1:
                self.dropped["boxes degenerate after clipping to the image"] += 1
                continue
            boxes.append((x1, y1, x2, y2))
            labels.append(self.category_to_label[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)))
            if crowd[-1]:
                self.crowd += 1
            else:
                self.kept += 1
        return ImageRecord(
            image_id,
            info["file_name"],
            height,
            width,
            np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64),
            np.asarray(crowd, dtype=bool),
        )

    def __len__(self) -> int:
        return len(self.records)

    def aspect_groups(self) -> list[int]:
        """0 for landscape (w >= h), 1 for portrait: the training stream batches them apart."""
        return [0 if r.width >= r.height else 1 for r in self.records]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Item ``index``, or ``(index, seed)`` to draw its augmentation from ``seed`` (reproducible
        training streams)."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None and self.transform is not None:
            self.transform.set_random_seed(seed)
        record = self.records[index]
        image = read_image(self.image_dir / record.file_name, record.image_id, self.annotation_file)
        if image.shape[:2] != (record.height, record.width):
            raise UserError(
                f"image {self.image_dir / record.file_name} (image id {record.image_id}) is "
                f"{image.shape[1]}x{image.shape[0]} but the annotations say {record.width}x{record.height}"
            )
        boxes, labels, iscrowd = record.boxes, record.labels, record.iscrowd
        if self.transform is not None:
            out = self.transform(image=image, bboxes=boxes, labels=labels, iscrowd=iscrowd.astype(np.int64))
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels, iscrowd = np.asarray(out["labels"], dtype=np.int64), np.asarray(out["iscrowd"]).astype(bool)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "iscrowd": torch.from_numpy(iscrowd),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
        }
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), target


def detection_transform(
    train: bool,
    short_sizes: Sequence[int] = (640, 672, 704, 736, 768, 800),
    max_size: int = 1333,
    flip_prob: float = 0.5,
) -> A.Compose:
    """Shortest-edge resize (a size drawn from ``short_sizes`` in training, their largest at test time),
    plus horizontal flip in training. Boxes in ``pascal_voc`` (x1, y1, x2, y2) pixels."""
    steps: list[A.BasicTransform] = [ShortestEdgeResize(short_sizes if train else [max(short_sizes)], max_size)]
    if train and flip_prob > 0:
        steps.append(A.HorizontalFlip(p=flip_prob))
    return A.Compose(
        steps, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels", "iscrowd"], clip=True)
    )


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images, targets = zip(*batch)
    return list(images), list(targets)
