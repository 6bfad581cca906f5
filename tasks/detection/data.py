"""COCO detection data: ``instances_*.json`` + an image folder, held as a ``CocoTable`` (numpy columns;
pycocotools' index only for evaluation), augmented with albumentations (boxes move with the image)."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
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

from ..coco_table import CocoTable, offsets, read_coco_json
from ..data import ShortestEdgeResize, read_image

logger = logging.getLogger(__name__)
LABEL_MAPS = ("contiguous", "coco_id")


def load_coco(annotation_file: str | Path) -> COCO:
    """A pycocotools index of ``annotation_file`` (for evaluation; training reads a ``CocoTable``), with an
    error naming the file if it is missing or not a COCO instances file."""
    path = Path(annotation_file)
    coco = COCO()
    coco.dataset = read_coco_json(path)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco.createIndex()
        except (KeyError, TypeError) as error:
            raise UserError(f"annotation file {path} has a malformed entry: {error!r}") from error
    return coco


def check_image_dir(image_dir: str | Path) -> Path:
    """``image_dir`` as a ``Path``, with an error naming it if it does not exist."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise UserFileNotFoundError(f"image folder not found: {image_dir}; check data.root and the image folder")
    return image_dir


class CocoSplit(Dataset):
    """What the COCO datasets share: the split's files, its ``CocoTable`` (compact, shared with workers)
    and, for evaluation only, pycocotools' index of the same file (``coco``, built on first use)."""

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, segmentation: bool = False):
        self.image_dir = check_image_dir(image_dir)
        self.annotation_file = Path(annotation_file)
        self.table = CocoTable(self.annotation_file, segmentation=segmentation)

    @functools.cached_property
    def coco(self) -> COCO:
        """pycocotools' index of the annotation file (what COCOeval reads); built when first asked for."""
        return load_coco(self.annotation_file)

    def read_image(self, row: int) -> np.ndarray:
        """The decoded image of table row ``row``, checked against the size the annotations give."""
        table = self.table
        image_id, path = int(table.image_ids[row]), self.image_dir / table.file_name(row)
        image = read_image(path, image_id, self.annotation_file)
        height, width = int(table.heights[row]), int(table.widths[row])
        if image.shape[:2] != (height, width):
            raise UserError(f"image {path} (image id {image_id}) is {image.shape[1]}x{image.shape[0]} but the "
                            f"annotations say {width}x{height}")
        return image


@dataclass
class ImageRecord:
    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # (G, 4) float32 x1, y1, x2, y2, clipped to the image
    labels: np.ndarray  # (G,) int64
    iscrowd: np.ndarray  # (G,) bool


class CocoDetection(CocoSplit):
    """Images with their boxes, labels and crowd flags.

    - ``label_map="contiguous"``: the categories, sorted by id, become labels 1..K; ``"coco_id"``: the
      label is the COCO category id (torchvision's 91-way convention). ``label_to_category`` maps back.
    - Crowd annotations are kept with ``iscrowd`` set: the heads neither use them as positives nor as
      negatives. Boxes that are degenerate once clipped to the image, or not finite, are dropped, counted
      in ``self.dropped`` and in one warning.
    - ``train=True`` skips images without any non-crowd box; evaluation keeps every image.
    - The boxes of every image are packed in a few arrays (``record(i)`` unpacks one image's): the
      dataset holds no per-image Python objects, so forked DataLoader workers do not copy it.

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
        super().__init__(annotation_file, image_dir)
        self.transform, self.train = transform, train
        table = self.table
        self.category_ids = [c["id"] for c in table.categories]
        if label_map == "contiguous":
            self.category_to_label = {c: i + 1 for i, c in enumerate(self.category_ids)}
        else:
            self.category_to_label = {c: c for c in self.category_ids}
        self.label_to_category = {v: k for k, v in self.category_to_label.items()}
        self.num_classes = max(self.category_to_label.values(), default=0)
        self.category_names = {c["id"]: c["name"] for c in table.categories}

        # boxes clipped to their image (float64 as in the file, then float32), kept unless degenerate
        image_of_row = table.image_of_rows()
        x, y, w, h = table.bboxes.T
        finite = np.isfinite(table.bboxes).all(axis=1)
        width, height = table.widths[image_of_row], table.heights[image_of_row]
        with np.errstate(invalid="ignore"):
            boxes = np.stack([np.clip(x, 0, width), np.clip(y, 0, height),
                              np.clip(x + w, 0, width), np.clip(y + h, 0, height)], axis=1)
            proper = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        self.dropped: Counter[str] = Counter()  # reason -> count
        if (~finite).any():
            self.dropped["boxes with non-finite coordinates"] = int((~finite).sum())
        if (finite & ~proper).any():
            self.dropped["boxes degenerate after clipping to the image"] = int((finite & ~proper).sum())
        self.crowd = int((proper & table.iscrowd).sum())  # crowd annotations kept as ignore regions
        self.kept = int((proper & ~table.iscrowd).sum())  # annotations used as objects
        labels = np.asarray([self.category_to_label[c] for c in self.category_ids], dtype=np.int64)
        self._boxes = boxes[proper].astype(np.float32)
        self._labels = labels[np.searchsorted(self.category_ids, table.category_ids[proper])]
        self._crowd = table.iscrowd[proper]
        kept_images = image_of_row[proper]
        self._box_start = offsets(np.bincount(kept_images, minlength=len(table)))
        objects = np.bincount(kept_images[~self._crowd], minlength=len(table))
        self.image_rows = np.flatnonzero(objects > 0) if train else np.arange(len(table))  # the items' table rows
        self.skipped_images = len(table) - len(self.image_rows)
        if self.dropped:
            logger.warning("%s: dropped %s", self.annotation_file, ", ".join(f"{n} {why}" for why, n in self.dropped.items()))
        if self.skipped_images:
            logger.info("%s: %d images without usable boxes skipped for training", self.annotation_file,
                        self.skipped_images)

    def record(self, index: int) -> ImageRecord:
        """Item ``index``'s image and its boxes (clipped, x1, y1, x2, y2), labels and crowd flags."""
        row, table = int(self.image_rows[index]), self.table
        boxes = slice(int(self._box_start[row]), int(self._box_start[row + 1]))
        return ImageRecord(int(table.image_ids[row]), table.file_name(row), int(table.heights[row]),
                           int(table.widths[row]), self._boxes[boxes], self._labels[boxes], self._crowd[boxes])

    def __len__(self) -> int:
        return len(self.image_rows)

    def aspect_groups(self) -> list[int]:
        """0 for landscape (w >= h), 1 for portrait: the training stream batches them apart."""
        return (self.table.widths[self.image_rows] < self.table.heights[self.image_rows]).astype(int).tolist()

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Item ``index``, or ``(index, seed)`` to draw its augmentation from ``seed`` (reproducible
        training streams)."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None and self.transform is not None:
            self.transform.set_random_seed(seed)
        record = self.record(index)
        image = self.read_image(int(self.image_rows[index]))
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
