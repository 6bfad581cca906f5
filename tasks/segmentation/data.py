"""Semantic segmentation data: what every split shares (``SemanticSegmentationSplit``: the item, its
transform, the class names) and COCO's, built from ``instances_*.json`` (polygons and RLEs held packed in a
``CocoTable``, drawn with pycocotools' mask functions when an image is read). Label-PNG folders are
``mask_folder.MaskFolderSegmentation``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from backbones.errors import UserError
from tasks.config import Config
from tasks.data.coco import COCO_CATEGORIES, CocoSplit
from tasks.data.images import ShortestEdgeResize
from tasks.evaluation.miou import IGNORE_INDEX

IGNORE = IGNORE_INDEX  # crowds and overlaps of selected classes
# The 20 Pascal VOC categories as COCO category ids, in VOC's class order (label i + 1); torchvision's
# COCO FCN references are trained and evaluated on these.
VOC20_COCO_IDS = [5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]
CLASS_SETS = ("voc20", "coco80", "all")


class SemanticSegmentationSplit(Dataset):
    """What the segmentation splits share: ``class_names`` (index 0..K-1), ``num_classes``, ``transform`` and
    ``train``, and the item built from ``load(index)``'s image and class mask.

    Items are ``(image (3, H, W) uint8, {"mask": (H, W) int64, "image_id", "orig_size"})``, class indices
    0..K-1 and ``IGNORE`` (255) in the mask. In training the transform moves image and mask together; for
    evaluation only the image is transformed and the mask stays at the original resolution (metrics are
    computed there). ``item[(index, seed)]`` seeds the random transform (the engine's reproducible order).
    """

    class_names: list[str]
    transform: A.Compose | None = None
    train: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Item ``index``'s RGB image (H, W, 3) uint8, its class mask (H, W) uint8 and its image id."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Item ``index``'s image file (what an error names)."""
        raise NotImplementedError

    def item_name(self, index: int) -> str:
        """A file-name stem for item ``index`` (its drawing in the run's visualizations)."""
        return str(index)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, mask, image_id = self.load(index)
        orig_size = (int(mask.shape[0]), int(mask.shape[1]))
        if self.transform is not None:
            if seed is not None:
                self.transform.set_random_seed(seed)
            if self.train:
                out = self.transform(image=image, mask=mask)
                image, mask = out["image"], out["mask"]
            else:
                image = self.transform(image=image)["image"]
        target = {"mask": torch.from_numpy(mask.astype(np.int64)), "image_id": image_id, "orig_size": orig_size}
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), target


class CocoSegmentation(SemanticSegmentationSplit, CocoSplit):
    """Images with per-pixel class masks (0 background, 1..K the selected categories, 255 ignore).

    ``class_set``: ``voc20`` (the 20 VOC categories in VOC order), ``coco80`` (the 80 COCO categories by
    id) or ``all`` (every category of the file by id). Instances of other categories are background.
    Pixels where instances of different selected classes overlap, and crowd regions of selected
    classes, are ignored (255). ``train=True`` keeps only images whose selected, non-crowd annotations
    cover at least ``min_pixels`` (by their COCO ``area``). The polygons and RLEs are held packed in the
    split's ``CocoTable`` and drawn when an image is read.

    Items as ``SemanticSegmentationSplit``'s, ``image_id`` the COCO image id.
    """

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, class_set: str = "coco80",
                 transform: A.Compose | None = None, train: bool = False, min_pixels: int = 1000):
        if class_set not in CLASS_SETS:
            raise UserError(f"data.class_set must be one of {', '.join(CLASS_SETS)}, got {class_set!r}")
        super().__init__(annotation_file, image_dir, segmentation=True)
        self.transform, self.train = transform, train
        table = self.table
        all_ids = [c["id"] for c in table.categories]
        if class_set == "voc20":
            missing = [c for c in VOC20_COCO_IDS if c not in all_ids]
            if missing:
                raise UserError(f"{self.annotation_file} lacks the VOC categories {missing}; use class_set coco80/all")
            chosen = VOC20_COCO_IDS
        elif class_set == "coco80":
            chosen = all_ids if len(all_ids) == 80 else None
            if chosen is None:
                raise UserError(f"{self.annotation_file} has {len(all_ids)} categories, not COCO's 80; use class_set all")
        else:
            chosen = all_ids
        self.category_to_label = {c: i + 1 for i, c in enumerate(chosen)}
        names = {c["id"]: c["name"] for c in table.categories}
        self.class_names = ["background"] + [names[c] for c in chosen]
        rows = np.arange(len(table))
        if train:  # the area of each image's selected, non-crowd annotations
            selected = np.isin(table.category_ids, chosen) & ~table.iscrowd
            area = np.bincount(table.image_of_rows()[selected], weights=table.areas[selected], minlength=len(table))
            rows = rows[area >= min_pixels]
        self.image_ids = table.image_ids[rows]  # the items' COCO image ids

    def semantic_mask(self, image_id: int) -> np.ndarray:
        """The (H, W) uint8 class mask of ``image_id`` at the original resolution."""
        table = self.table
        row = int(np.searchsorted(table.image_ids, image_id))
        height, width = int(table.heights[row]), int(table.widths[row])
        mask = np.zeros((height, width), np.uint8)
        conflict = np.zeros(mask.shape, bool)
        crowd = np.zeros(mask.shape, bool)
        for ann in range(table.rows(row).start, table.rows(row).stop):
            label = self.category_to_label.get(int(table.category_ids[ann]))
            if label is None:
                continue
            region = table.mask(ann, height, width).astype(bool)
            if table.iscrowd[ann]:
                crowd |= region
                continue
            conflict |= region & (mask != 0) & (mask != label)
            mask[region & (mask == 0)] = label
        mask[conflict | crowd] = IGNORE
        return mask

    def __len__(self) -> int:
        return len(self.image_ids)

    def describe(self, index: int) -> str:
        """Item ``index``'s image file (what an error names)."""
        row = int(np.searchsorted(self.table.image_ids, int(self.image_ids[index])))
        return str(self.image_dir / self.table.file_name(row))

    def item_name(self, index: int) -> str:
        return str(int(self.image_ids[index]))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        image_id = int(self.image_ids[index])
        image = self.read_image(int(np.searchsorted(self.table.image_ids, image_id)))
        return image, self.semantic_mask(image_id), image_id


def segmentation_transform(train: bool, short_sizes: Sequence[int], max_size: int, crop_size: int = 0,
                           flip_prob: float = 0.5) -> A.Compose:
    """Training: shorter side drawn from ``short_sizes`` (random scale), padding (image 0, mask 255) and a
    random crop to ``crop_size``, horizontal flip. Test: shorter side ``max(short_sizes)``."""
    if not train:
        return A.Compose([ShortestEdgeResize([max(short_sizes)], max_size)])
    steps: list[A.BasicTransform] = [ShortestEdgeResize(short_sizes, max_size)]
    if crop_size:
        steps += [
            A.PadIfNeeded(crop_size, crop_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0,
                          fill_mask=IGNORE),
            A.RandomCrop(crop_size, crop_size),
        ]
    if flip_prob > 0:
        steps.append(A.HorizontalFlip(p=flip_prob))
    return A.Compose(steps)


def segmentation_names(config: Config, run_dir: Path | None, num_classes: int) -> list[str]:
    """The name of each class index of a segmenter: the run's categories.json, ``data.class_names`` (a
    ``mask_folder`` config), the VOC names (0: background) for ``data.class_set=voc20``, else ``class k``."""
    if run_dir is not None and (run_dir / "categories.json").is_file():
        names = [c["name"] for c in json.loads((run_dir / "categories.json").read_text())]
    elif config.data.format == "mask_folder" and config.data.class_names:
        names = list(config.data.class_names)
    elif config.data.format != "mask_folder" and config.data.class_set == "voc20":
        names = ["background"] + [COCO_CATEGORIES[c] for c in VOC20_COCO_IDS]
    else:
        names = [f"class {k}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise UserError(f"the model has {num_classes} classes (background included) but the class names "
                        f"have {len(names)}: set model.num_classes or data.class_set (data.class_names) to match")
    return names
