"""COCO annotations held as a few numpy arrays: what training reads, at a fraction of the memory of the
parsed JSON or of pycocotools' index, and shared with DataLoader workers without copies.

A COCO-train2017-sized file (118k images, 860k annotations) parsed by ``json`` is millions of Python
objects; pycocotools' ``COCO`` keeps them and adds its own index on top. Each DataLoader worker forked
from such a process slowly copies all of them (Python's reference counts and the garbage collector write
to every object it touches: copy-on-write turns into copy). ``CocoTable`` keeps the images and the
annotations as columns (numpy arrays: one object each, whatever the dataset's size) and drops the parsed
JSON once they are built. Evaluation, which needs pycocotools, builds its own index
(``load_coco``). ``CocoSplit`` is what the detection and segmentation datasets share: the table, the
image folder and, for evaluation, pycocotools' index; ``COCO_CATEGORIES`` names COCO's 80 categories.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import io
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from backbones.errors import UserError, UserFileNotFoundError

from .images import read_image

# Annotation segmentation kinds
NO_SEGMENTATION, POLYGONS, RLE = 0, 1, 2


def read_coco_json(annotation_file: str | Path) -> dict[str, Any]:
    """The parsed ``annotation_file``, with an error naming it if it is missing, not JSON or not a COCO
    instances file (``images``, ``annotations`` and ``categories``). The garbage collector is paused while
    it parses (1.7x faster on a COCO-sized file)."""
    path = Path(annotation_file)
    if not path.is_file():
        raise UserFileNotFoundError(f"annotation file not found: {path}; check data.root and the annotation name")
    collecting = gc.isenabled()
    gc.disable()  # the parse makes millions of containers and no cycles: the collector's passes are waste
    try:
        with open(path, "rb") as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"annotation file {path} is not valid JSON: {error}") from error
    finally:
        if collecting:
            gc.enable()
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(dataset, dict) or k not in dataset]
    if missing:
        raise UserError(f"annotation file {path} is not a COCO instances file: no {', '.join(missing)}")
    return dataset


def offsets(lengths) -> np.ndarray:
    """``[0, l0, l0 + l1, ...]``: row ``i`` of a packed column spans ``offsets[i]:offsets[i + 1]``."""
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)


def release_freed_memory() -> None:
    """Hand the memory freed by a large parse back to the system (glibc keeps it in its heap otherwise,
    and the process, and every worker forked from it, would carry it)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class CocoTable:
    """The images, categories and annotations of a COCO instances file, as numpy columns.

    Images, sorted by id: ``image_ids``, ``heights``, ``widths`` and ``file_name(i)``. Annotations,
    grouped by image in the file's order (the order pycocotools' ``imgToAnns`` has): those of image ``i``
    are rows ``ann_start[i]:ann_start[i + 1]`` of ``ann_ids``, ``category_ids``, ``bboxes`` (``x, y, w, h``
    as in the file, float64), ``iscrowd`` and ``areas``. Annotations of images the file does not list are
    left out. ``categories``: the file's category dicts, sorted by id.

    With ``segmentation=True`` the polygons (float64 coordinates, packed) and crowd RLEs (compressed) are
    kept too, and ``mask(row)`` draws an annotation as pycocotools' ``annToMask`` does.

    Malformed entries (an image without a valid size or file name, an annotation without an image id, a
    ``bbox`` that is not four numbers, an unknown category) are ``UserError`` naming the entry and file.
    """

    def __init__(self, annotation_file: str | Path, segmentation: bool = False):
        self.annotation_file = Path(annotation_file)
        dataset = read_coco_json(annotation_file)
        try:
            self._build(dataset, segmentation)
        finally:
            del dataset
            release_freed_memory()

    # ----------------------------------------------------------------------------------------- building
    def _build(self, dataset: dict, segmentation: bool) -> None:
        """The columns, from the parsed file (which ``__init__`` then drops)."""
        category_ids = self._build_categories(dataset["categories"])
        self._build_images(dataset["images"])
        annotations = dataset["annotations"]
        order = self._build_annotations(annotations, category_ids)
        self.has_segmentation = segmentation
        if segmentation:
            self._build_segmentation(annotations, order)

    def _build_categories(self, categories: list) -> set[int]:
        """``categories``, sorted by id; the set of their ids."""
        where = self.annotation_file
        if not all(isinstance(c, dict) and isinstance(c.get("id"), int) for c in categories):
            raise UserError(f"annotation file {where} has a category without an integer 'id'")
        self.categories = sorted(({"id": c["id"], "name": str(c.get("name", c["id"]))} for c in categories),
                                 key=lambda c: c["id"])
        return {c["id"] for c in self.categories}

    def _build_images(self, images: list) -> None:
        """The image columns, sorted by id."""
        where = self.annotation_file
        images = sorted(images, key=lambda info: info.get("id", 0) if isinstance(info, dict) else 0)
        ids, heights, widths, names = [], [], [], []
        for info in images:
            try:
                ids.append(int(info["id"]))
                heights.append(int(info["height"]))
                widths.append(int(info["width"]))
                names.append(str(info["file_name"]).encode())
            except (KeyError, TypeError, ValueError):
                raise UserError(f"image {info.get('id') if isinstance(info, dict) else info!r} in {where} lacks a "
                                f"valid id, height, width or file_name: {info!r}") from None
        self.image_ids = np.asarray(ids, dtype=np.int64)
        if len(np.unique(self.image_ids)) != len(self.image_ids):
            raise UserError(f"annotation file {where} lists an image id twice (tools/check_data.py names them)")
        self.heights = np.asarray(heights, dtype=np.int64)
        self.widths = np.asarray(widths, dtype=np.int64)
        self._names = np.frombuffer(b"".join(names), dtype=np.uint8).copy()
        self._name_start = offsets([len(n) for n in names])

    def _build_annotations(self, annotations: list, category_ids: set[int]) -> np.ndarray:
        """The annotation columns, grouped by image; the index in ``annotations`` of each row."""
        where = self.annotation_file
        try:
            image_of = np.fromiter((a["image_id"] for a in annotations), dtype=np.int64, count=len(annotations))
        except (KeyError, TypeError, ValueError):
            bad = next((i for i, a in enumerate(annotations)
                        if not isinstance(a, dict) or not isinstance(a.get("image_id"), (int, np.integer))), 0)
            raise UserError(f"annotation {bad} (id {annotations[bad].get('id') if isinstance(annotations[bad], dict) else None}) "
                            f"in {where} has no valid 'image_id'") from None
        row_of_image = np.searchsorted(self.image_ids, image_of)
        listed = (row_of_image < len(self.image_ids)) & (
            self.image_ids[np.minimum(row_of_image, len(self.image_ids) - 1)] == image_of
        ) if len(self.image_ids) else np.zeros(len(image_of), bool)
        order = np.flatnonzero(listed)
        order = order[np.argsort(row_of_image[order], kind="stable")]  # by image, file order within an image
        self.ann_start = offsets(np.bincount(row_of_image[order], minlength=len(self.image_ids)))

        ann_ids, category, bboxes, crowd, areas = [], [], [], [], []
        for index in order.tolist():
            ann = annotations[index]
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise UserError(f"{self._where(ann)} has no valid 'bbox' [x, y, w, h]: {bbox!r}")
            if ann.get("category_id") not in category_ids:
                raise UserError(f"{self._where(ann)} has category_id {ann.get('category_id')!r}, not among the "
                                "categories")
            try:
                bboxes.append([float(v) for v in bbox])
            except (TypeError, ValueError):
                raise UserError(f"{self._where(ann)} has a 'bbox' that is not four numbers: {bbox!r}") from None
            ann_ids.append(ann.get("id", -1))
            category.append(ann["category_id"])
            crowd.append(bool(ann.get("iscrowd", 0)))
            areas.append(ann.get("area", 0))
        self.ann_ids = np.asarray(ann_ids, dtype=np.int64)
        self.category_ids = np.asarray(category, dtype=np.int64)
        self.bboxes = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
        self.iscrowd = np.asarray(crowd, dtype=bool)
        self.areas = np.asarray(areas, dtype=np.float64)
        return order

    def _build_segmentation(self, annotations: list, order: np.ndarray) -> None:
        image_row = self.image_of_rows()
        kinds, polygon_counts, polygons, rles = [], [], [], []
        for row, index in enumerate(order.tolist()):
            segm = annotations[index].get("segmentation")
            if isinstance(segm, list) and segm and all(isinstance(p, list) for p in segm):
                kinds.append(POLYGONS)
                polygon_counts.append(len(segm))
                polygons.extend(segm)
            elif isinstance(segm, dict) and "counts" in segm:
                kinds.append(RLE)
                polygon_counts.append(0)
                height, width = int(self.heights[image_row[row]]), int(self.widths[image_row[row]])
                try:
                    rle = mask_utils.frPyObjects(segm, height, width) if isinstance(segm["counts"], list) else segm
                    counts = rle["counts"]
                    rles.append((row, counts.encode() if isinstance(counts, str) else bytes(counts),
                                 tuple(int(s) for s in rle["size"])))
                except Exception as error:  # malformed RLE
                    raise UserError(f"{self._where(annotations[index])} has an unreadable segmentation: "
                                    f"{error!r}") from error
            else:  # missing or malformed: an error if the annotation is ever drawn
                kinds.append(NO_SEGMENTATION)
                polygon_counts.append(0)
        self.segmentation_kinds = np.asarray(kinds, dtype=np.int8)
        self._polygon_start = offsets(polygon_counts)  # annotation row -> its polygons
        self._coordinate_start = offsets([len(p) for p in polygons])  # polygon -> its coordinates
        try:  # straight from the parsed lists into one array, no intermediate list
            self._coordinates = np.fromiter(itertools.chain.from_iterable(polygons), dtype=np.float64,
                                            count=int(self._coordinate_start[-1]))
        except (TypeError, ValueError):
            raise UserError(f"annotation file {self.annotation_file} has a polygon coordinate that is not a "
                            "number") from None
        del polygons
        self._rle_rows = np.asarray([r[0] for r in rles], dtype=np.int64)
        self._rle_sizes = np.asarray([r[2] for r in rles], dtype=np.int64).reshape(-1, 2)
        self._rle_bytes = np.frombuffer(b"".join(r[1] for r in rles), dtype=np.uint8).copy()
        self._rle_start = offsets([len(r[1]) for r in rles])

    def _where(self, ann: Any) -> str:
        if not isinstance(ann, dict):
            return f"annotation {ann!r} in {self.annotation_file}"
        return f"annotation {ann.get('id')} of image {ann.get('image_id')} in {self.annotation_file}"

    # ------------------------------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.image_ids)

    def file_name(self, i: int) -> str:
        return self._names[self._name_start[i]: self._name_start[i + 1]].tobytes().decode()

    def rows(self, i: int) -> slice:
        """The annotation rows of image ``i``."""
        return slice(int(self.ann_start[i]), int(self.ann_start[i + 1]))

    def image_of_rows(self) -> np.ndarray:
        """The image index of every annotation row."""
        return np.repeat(np.arange(len(self.image_ids)), np.diff(self.ann_start))

    def mask(self, row: int, height: int, width: int) -> np.ndarray:
        """The (height, width) uint8 mask of annotation ``row``, drawn as pycocotools' ``annToMask`` draws
        it (polygons rasterized and merged; RLE decoded)."""
        if not self.has_segmentation:
            raise ValueError("CocoTable built without segmentation=True")
        kind = self.segmentation_kinds[row]
        try:
            if kind == POLYGONS:
                polygons = [self._coordinates[self._coordinate_start[p]: self._coordinate_start[p + 1]]
                            for p in range(self._polygon_start[row], self._polygon_start[row + 1])]
                rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
            elif kind == RLE:
                k = int(np.searchsorted(self._rle_rows, row))
                rle = {"size": self._rle_sizes[k].tolist(),
                       "counts": self._rle_bytes[self._rle_start[k]: self._rle_start[k + 1]].tobytes()}
            else:
                raise ValueError("no polygon list or RLE in 'segmentation'")
            return mask_utils.decode(rle)
        except Exception as error:  # malformed polygon / RLE
            raise UserError(f"annotation {self.ann_ids[row]} of image {self.image_ids[self._image_of_row(row)]} in "
                            f"{self.annotation_file} has an unreadable segmentation: {error!r}") from error

    def _image_of_row(self, row: int) -> int:
        return int(np.searchsorted(self.ann_start, row, side="right") - 1)

    def nbytes(self) -> int:
        """Bytes held by the table's arrays."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))


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
