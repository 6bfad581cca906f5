"""Detection data: COCO's ``instances_*.json`` + an image folder (boxes and instance masks), held as a
``CocoTable`` (numpy columns; pycocotools' index only for evaluation), and PASCAL VOC's VOCdevkit folders
(boxes); both augmented with albumentations (boxes and instance masks move with the image)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from backbones.errors import UserError, UserFileNotFoundError
from tasks.config import Config, resolve_path
from tasks.data.coco import COCO_CATEGORIES, CocoSplit, offsets, read_coco_json
from tasks.data.images import ShortestEdgeResize, read_image
from tasks.data.voc import VOC_CLASSES, read_voc_sets
from tasks.evaluation.voc import VocTruth

logger = logging.getLogger(__name__)
LABEL_MAPS = ("contiguous", "coco_id")


@dataclass
class ImageRecord:
    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # (G, 4) float32 x1, y1, x2, y2, clipped to the image
    labels: np.ndarray  # (G,) int64
    iscrowd: np.ndarray  # (G,) bool
    rows: slice  # the boxes' annotation rows among the kept ones (``CocoDetection.annotation_rows``)


class DetectionItems(Dataset):
    """The items of a detection dataset, whatever its annotations' format: ``(image (3, H, W) uint8, target)``,
    ``target`` holding ``boxes``, ``labels``, ``iscrowd`` (after augmentation), with masks ``masks`` ``(G, H,
    W)`` uint8 0/1, ``image_id`` and ``orig_size`` (h, w) of the file. A subclass gives ``record(index)``,
    ``image(index)`` and, with ``masks``, ``instance_masks(record)``; ``transform`` and ``masks`` are set."""

    transform: A.Compose | None
    masks: bool

    def record(self, index: int) -> ImageRecord:
        raise NotImplementedError

    def image(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def instance_masks(self, record: ImageRecord) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Item ``index``, or ``(index, seed)`` to draw its augmentation from ``seed`` (reproducible
        training streams)."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None and self.transform is not None:
            self.transform.set_random_seed(seed)
        record = self.record(index)
        image = self.image(index)
        boxes, labels, iscrowd = record.boxes, record.labels, record.iscrowd
        masks = self.instance_masks(record) if self.masks else None
        if self.transform is not None:
            extra = {"masks": list(masks)} if masks is not None and len(masks) else {}
            out = self.transform(image=image, bboxes=boxes, labels=labels, iscrowd=iscrowd.astype(np.int64),
                                 index=np.arange(len(boxes)), **extra)
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels, iscrowd = np.asarray(out["labels"], dtype=np.int64), np.asarray(out["iscrowd"]).astype(bool)
            if masks is not None:  # the masks of the boxes the transform kept
                kept = np.asarray(out["index"], dtype=np.int64)
                masks = np.stack(out["masks"])[kept] if len(kept) else np.zeros((0, *image.shape[:2]), np.uint8)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "iscrowd": torch.from_numpy(iscrowd),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
        }
        if masks is not None:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), target


class CocoDetection(DetectionItems, CocoSplit):
    """Images with their boxes, labels and crowd flags (and with ``masks=True`` their instance masks).

    - ``label_map="contiguous"``: the categories, sorted by id, become labels 1..K; ``"coco_id"``: the
      label is the COCO category id (torchvision's 91-way convention). ``label_to_category`` maps back.
    - Crowd annotations are kept with ``iscrowd`` set: the heads neither use them as positives nor as
      negatives. Boxes that are degenerate once clipped to the image, or not finite, are dropped, counted
      in ``self.dropped`` and in one warning.
    - ``train=True`` skips images without any non-crowd box; evaluation keeps every image.
    - The boxes of every image are packed in a few arrays (``record(i)`` unpacks one image's): the
      dataset holds no per-image Python objects, so forked DataLoader workers do not copy it.

    - ``masks=True``: each kept annotation's mask (polygons or crowd RLE, as pycocotools' ``annToMask`` draws
      it) is drawn at the file's size when the item is read and moves with the image (resized nearest,
      flipped); the table keeps the polygons and RLEs compactly, not the masks.

    Items are ``(image (3, H, W) uint8, target)``, ``target`` holding ``boxes``, ``labels``, ``iscrowd``
    (after augmentation), with ``masks=True`` ``masks`` ``(G, H, W)`` uint8 0/1, ``image_id`` and
    ``orig_size`` (h, w) of the file.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        transform: A.Compose | None = None,
        train: bool = False,
        label_map: str = "contiguous",
        masks: bool = False,
    ):
        if label_map not in LABEL_MAPS:
            raise UserError(f"data.label_map must be one of {', '.join(LABEL_MAPS)}, got {label_map!r}")
        super().__init__(annotation_file, image_dir, segmentation=masks)
        self.transform, self.train, self.masks = transform, train, masks
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
        self.annotation_rows = np.flatnonzero(proper)  # the table's annotation row of each kept box
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
                           int(table.widths[row]), self._boxes[boxes], self._labels[boxes], self._crowd[boxes], boxes)

    def instance_masks(self, record: ImageRecord) -> np.ndarray:
        """The ``(G, H, W)`` uint8 masks of ``record``'s boxes, at the file's size."""
        rows = self.annotation_rows[record.rows]
        return np.stack([self.table.mask(int(r), record.height, record.width) for r in rows]) if len(rows) else \
            np.zeros((0, record.height, record.width), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.image_rows)

    def describe(self, index: int) -> str:
        """Item ``index``'s image file (what an error names)."""
        return str(self.image_dir / self.table.file_name(int(self.image_rows[index])))

    def aspect_groups(self) -> list[int]:
        """0 for landscape (w >= h), 1 for portrait: the training stream batches them apart."""
        return (self.table.widths[self.image_rows] < self.table.heights[self.image_rows]).astype(int).tolist()

    def image(self, index: int) -> np.ndarray:
        """Item ``index``'s decoded image, checked against the size the annotations give."""
        return self.read_image(int(self.image_rows[index]))


class VocDetection(DetectionItems):
    """PASCAL VOC images with their boxes (detectron2's 0-based pixels, clipped to the image) and labels 1..20
    (``VOC_CLASSES`` in VOC order), from one or several VOCdevkit ``(year folder, split)`` sets joined in order
    (``tasks/data/voc.py``).

    Difficult objects are trained on, as detectron2 (and so the protocols of MoCo and its successors) trains:
    its VOC reader keeps them. For evaluation they are the metric's ignore regions (``truths``), with the XML's
    boxes as they are. ``train=True`` skips images without objects. Items are numbered 0..N-1 in the sets'
    order: ``target["image_id"]`` is that number and ``image_names`` the file stems the results file uses.
    Boxes are packed in a few arrays, as ``CocoDetection``'s are, so that DataLoader workers share them."""

    category_ids = list(range(1, len(VOC_CLASSES) + 1))
    category_names = {i + 1: name for i, name in enumerate(VOC_CLASSES)}
    label_to_category = {label: label for label in category_ids}
    num_classes = len(VOC_CLASSES)

    def __init__(self, sets: Sequence[tuple[str | Path, str]], transform: A.Compose | None = None, train: bool = False):
        self.sets, self.transform, self.train, self.masks = [(Path(r), s) for r, s in sets], transform, train, False
        images = read_voc_sets(self.sets)
        self.where = " + ".join(f"{root} {split}" for root, split in self.sets)
        counts = np.asarray([len(image.truth.labels) for image in images], dtype=np.int64)
        self._start = offsets(counts)
        self._raw = np.concatenate([i.truth.boxes for i in images] or [np.zeros((0, 4))]).astype(np.float64)
        self._labels = np.concatenate([i.truth.labels for i in images] or [np.zeros(0, np.int64)]) + 1
        self._difficult = np.concatenate([i.truth.difficult for i in images] or [np.zeros(0, bool)])
        self.heights = np.asarray([i.height for i in images], dtype=np.int64)
        self.widths = np.asarray([i.width for i in images], dtype=np.int64)
        self.image_names = np.asarray([i.image_id for i in images])
        self.files = np.asarray([str(i.file) for i in images])
        self.annotation_files = np.asarray([str(i.annotation) for i in images])
        image_of_box = np.repeat(np.arange(len(images)), counts)
        w, h = self.widths[image_of_box], self.heights[image_of_box]
        boxes = np.stack([np.clip(self._raw[:, 0], 0, w), np.clip(self._raw[:, 1], 0, h),
                          np.clip(self._raw[:, 2], 0, w), np.clip(self._raw[:, 3], 0, h)], axis=1)
        self._proper = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        self._boxes = boxes.astype(np.float32)
        self.dropped = Counter({"boxes degenerate after clipping to the image": int((~self._proper).sum())} if
                               (~self._proper).any() else {})
        usable = np.bincount(image_of_box[self._proper], minlength=len(images))
        self.image_rows = np.flatnonzero(usable > 0) if train else np.arange(len(images))
        self.skipped_images = len(images) - len(self.image_rows)
        if self.dropped:
            logger.warning("%s: dropped %s", self.where, ", ".join(f"{n} {why}" for why, n in self.dropped.items()))
        if self.skipped_images:
            logger.info("%s: %d images without objects skipped for training", self.where, self.skipped_images)

    def __len__(self) -> int:
        return len(self.image_rows)

    def record(self, index: int) -> ImageRecord:
        row = int(self.image_rows[index])
        rows = slice(int(self._start[row]), int(self._start[row + 1]))
        keep = self._proper[rows]
        return ImageRecord(row, str(self.files[row]), int(self.heights[row]), int(self.widths[row]),
                           self._boxes[rows][keep], self._labels[rows][keep], np.zeros(int(keep.sum()), bool), rows)

    def image(self, index: int) -> np.ndarray:
        row = int(self.image_rows[index])
        image = read_image(self.files[row], self.image_names[row], self.annotation_files[row])
        if image.shape[:2] != (self.heights[row], self.widths[row]):
            raise UserError(f"image {self.files[row]} is {image.shape[1]}x{image.shape[0]} but "
                            f"{self.annotation_files[row]} says {self.widths[row]}x{self.heights[row]}")
        return image

    def describe(self, index: int) -> str:
        """Item ``index``'s image file (what an error names)."""
        return str(self.files[int(self.image_rows[index])])

    def aspect_groups(self) -> list[int]:
        """0 for landscape (w >= h), 1 for portrait: the training stream batches them apart."""
        return (self.widths[self.image_rows] < self.heights[self.image_rows]).astype(int).tolist()

    def truths(self) -> dict[str, VocTruth]:
        """Every item's objects as the metric reads them (the XML's boxes, unclipped; class indices 0..19;
        the difficult flags), by file stem."""
        out = {}
        for row in self.image_rows:
            rows = slice(int(self._start[row]), int(self._start[row + 1]))
            out[str(self.image_names[row])] = VocTruth(self._raw[rows], self._labels[rows] - 1, self._difficult[rows])
        return out


def detection_transform(
    train: bool,
    short_sizes: Sequence[int] = (640, 672, 704, 736, 768, 800),
    max_size: int = 1333,
    flip_prob: float = 0.5,
) -> A.Compose:
    """Shortest-edge resize (a size drawn from ``short_sizes`` in training, their largest at test time),
    plus horizontal flip in training. Boxes in ``pascal_voc`` (x1, y1, x2, y2) pixels, with their
    ``labels``, ``iscrowd`` and ``index`` (which of the given boxes each kept one is); instance ``masks``
    move with the image."""
    steps: list[A.BasicTransform] = [ShortestEdgeResize(short_sizes if train else [max(short_sizes)], max_size)]
    if train and flip_prob > 0:
        steps.append(A.HorizontalFlip(p=flip_prob))
    return A.Compose(
        steps, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels", "iscrowd", "index"], clip=True)
    )


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images, targets = zip(*batch)
    return list(images), list(targets)


def label_names(config: Config, run_dir: Path | None, num_classes: int) -> tuple[dict[int, int], dict[int, str]]:
    """label -> COCO category id, and label -> name, for the config's label map. With ``coco_id`` every
    label is its own category id (torchvision's detectors also output the ids COCO leaves unused). On VOC
    (``data.format: voc``), labels 1..20 are the VOC classes in VOC order."""
    if config.data.format == "voc":
        return dict(VocDetection.label_to_category), dict(VocDetection.category_names)
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
