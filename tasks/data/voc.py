"""PASCAL VOC detection data: the VOCdevkit layout (``<root>/Annotations/<id>.xml``, ``<root>/JPEGImages/``,
``<root>/ImageSets/Main/<split>.txt``), read into detectron2's coordinates (0-based pixels: the XML's
1-based ``(xmin, ymin, xmax, ymax)`` as ``(xmin - 1, ymin - 1, xmax, ymax)``), the 20 classes in VOC order,
``difficult`` objects kept with their flag (ignore regions for the metric). Several years and splits join,
e.g. VOC2007 ``trainval`` + VOC2012 ``trainval`` (the "07+12" of the literature)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from backbones.errors import UserError, UserFileNotFoundError
from tasks.evaluation.voc import VocTruth

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


@dataclass
class VocImage:
    """One image of a VOC split: its id (the file stem), image file, size, objects (``VocTruth``) and the
    annotation file they were read from."""

    image_id: str
    file: Path
    width: int
    height: int
    truth: VocTruth
    annotation: Path


def read_voc_annotation(path: Path, classes: Sequence[str] = VOC_CLASSES) -> VocImage:
    """One ``Annotations/<id>.xml``. A missing ``difficult`` or ``truncated`` is 0, an image may have no
    object; a file that is not VOC XML, or an object of an unknown class, is a ``UserError`` naming the file."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as error:
        raise UserError(f"{path}: not a VOC annotation file ({error})") from error
    size = root.find("size")
    if root.tag != "annotation" or size is None:
        raise UserError(f"{path}: not a VOC annotation file (it needs an <annotation> root with a <size>)")
    boxes, labels, difficult = [], [], []
    try:
        width, height = int(float(size.findtext("width"))), int(float(size.findtext("height")))
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in classes:
                raise UserError(f"{path}: object of unknown class {name!r} (the classes are {', '.join(classes)})")
            box = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append((xmin - 1.0, ymin - 1.0, xmax, ymax))
            labels.append(classes.index(name))
            difficult.append(int(obj.findtext("difficult") or 0) == 1)
    except UserError:
        raise
    except (TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{path}: not a VOC annotation file (a <size> or <bndbox> without numbers: {error})") from error
    file = path.parent.parent / "JPEGImages" / (root.findtext("filename") or f"{path.stem}.jpg")
    truth = VocTruth(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
                     np.asarray(difficult, dtype=bool))
    return VocImage(path.stem, file, width, height, truth, path)


def read_voc_split(root: str | Path, split: str, classes: Sequence[str] = VOC_CLASSES) -> list[VocImage]:
    """The images of ``<root>/ImageSets/Main/<split>.txt``, in the file's order."""
    root = Path(root)
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise UserFileNotFoundError(f"VOC split file not found: {listing} (a VOCdevkit year folder, e.g. "
                                    f"VOCdevkit/VOC2007, holds ImageSets/Main/{split}.txt)")
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    images = []
    for image_id in ids:
        xml = root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            raise UserFileNotFoundError(f"{listing} lists {image_id}, but {xml} does not exist")
        images.append(read_voc_annotation(xml, classes))
    return images


def read_voc_sets(sets: Sequence[tuple[str | Path, str]], classes: Sequence[str] = VOC_CLASSES) -> list[VocImage]:
    """Several ``(year folder, split)`` joined, e.g. ``[(VOC2007, "trainval"), (VOC2012, "trainval")]``; an
    image id in two of them is an error (the results file names images by id)."""
    images, seen = [], {}
    for root, split in sets:
        for image in read_voc_split(root, split, classes):
            if image.image_id in seen:
                raise UserError(f"image {image.image_id} is in both {seen[image.image_id]} and {root} {split}")
            seen[image.image_id] = f"{root} {split}"
            images.append(image)
    return images


def default_rule(year_folder: str | Path) -> str:
    """The AP rule of a VOC year: the 11-point rule for VOC2007 (a folder named ``*2007``), the area rule from
    VOC2010 on, as the devkit of each year (and detectron2's evaluator) has it."""
    return "11point" if "2007" in Path(year_folder).resolve().name else "area"
