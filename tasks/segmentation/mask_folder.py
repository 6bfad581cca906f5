"""Semantic segmentation from image and label-PNG folders (``data.format: mask_folder``): PASCAL VOC's
``JPEGImages`` + ``SegmentationClass(Aug)``, Cityscapes' ``leftImg8bit`` + ``gtFine``, ADE20K's ``images`` +
``annotations``, or any folder pair of that shape.

A split (``data.train`` / ``data.val``) is an ``images`` folder, searched recursively for files ending in
``data.image_suffix``; the label of ``images/<rel>/<stem><image_suffix>`` is
``labels/<rel>/<stem><label_suffix>`` (``labels`` empty: beside the image). A ``split_file`` lists the items,
one ``<rel>/<stem>`` a line (VOC's ``ImageSets/Segmentation/*.txt``: bare stems; further whitespace-separated
columns are ignored); without one every image found is an item and must have its label.

A label PNG is read as one channel of integers, 8- or 16-bit (a palette PNG gives its indices, not its
colours), and mapped to the training ids 0..K-1 (K: ``model.num_classes``) or ``IGNORE`` (255) by one
lookup table (``LabelMapping``):

1. a file value listed in ``data.ignore_values`` is ignored (the file's own value, whatever follows);
2. ``data.reduce_zero_label``: the file value 0 is ignored and every other value v becomes v - 1 (ADE20K:
   1..150 -> 0..149);
3. ``data.value_map`` maps that value to its training id (a target of 255 ignores it); an empty map keeps
   the value as the id.

Any value that is neither ignored, mapped, nor (empty map) an id 0..K-1 is a ``UserError`` naming the label
file, the values and the keys to change: no class is invented or dropped silently.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import albumentations as A
import numpy as np
from PIL import Image, UnidentifiedImageError

from backbones.errors import UserError, UserFileNotFoundError
from tasks.config import Config, ConfigError, resolve_path
from tasks.data.images import read_image
from tasks.evaluation.miou import IGNORE_INDEX

from .data import SemanticSegmentationSplit
from .model import DEFAULTS

LABEL_VALUES = 1 << 16  # a label PNG holds 8- or 16-bit values
NOT_A_CLASS = -1  # in the lookup table: a file value the config does not account for
_INTEGER_MODES = {"1": np.uint8, "L": np.uint8, "P": np.uint8, "I;16": np.uint16, "I;16L": np.uint16,
                  "I;16B": np.uint16, "I;16N": np.uint16, "I": np.int32}


def check_mask_folder_config(config: Config) -> None:
    """The ``mask_folder`` keys against ``model.num_classes``: one class name per training id, the value map's
    keys file values and its targets training ids (or 255), the suffixes usable. Every problem is a
    ``ConfigError`` naming the keys."""
    data, num_classes = config.data, int(config.model.get("num_classes", DEFAULTS["num_classes"]))
    if data.class_names and len(data.class_names) != num_classes:
        raise ConfigError(f"data.class_names has {len(data.class_names)} names but model.num_classes is {num_classes}: "
                          f"give one name per training id 0..{num_classes - 1} (or set model.num_classes="
                          f"{len(data.class_names)})")
    if not 1 <= num_classes <= IGNORE_INDEX:
        raise ConfigError(f"data.format mask_folder takes 1..{IGNORE_INDEX} classes ({IGNORE_INDEX} is the ignore "
                          f"id), model.num_classes is {num_classes}")
    bad_keys = sorted(k for k in data.value_map if not 0 <= k < LABEL_VALUES)
    bad_targets = sorted((k, v) for k, v in data.value_map.items() if not (0 <= v < num_classes or v == IGNORE_INDEX))
    if bad_keys:
        raise ConfigError(f"data.value_map: keys are label-file values 0..{LABEL_VALUES - 1}, got {bad_keys}")
    if bad_targets:
        pairs = ", ".join(f"{k}: {v}" for k, v in bad_targets)
        raise ConfigError(f"data.value_map maps to training ids 0..{num_classes - 1} (model.num_classes={num_classes}) "
                          f"or {IGNORE_INDEX} (ignored); got {pairs}")
    bad_ignored = sorted(v for v in data.ignore_values if not 0 <= v < LABEL_VALUES)
    if bad_ignored:
        raise ConfigError(f"data.ignore_values are label-file values 0..{LABEL_VALUES - 1}, got {bad_ignored}")
    if not data.image_suffix or not data.label_suffix:
        raise ConfigError(f"data.image_suffix and data.label_suffix must end the file names, got "
                          f"{data.image_suffix!r} and {data.label_suffix!r}")
    for split in ("train", "val"):
        paths = getattr(config.data, split)
        if not paths.images:
            raise ConfigError(f"data.{split}.images must name the image folder for data.format mask_folder")
        if not paths.labels and data.image_suffix == data.label_suffix:
            raise ConfigError(f"data.{split}.labels is empty (labels beside the images) and data.label_suffix equals "
                              f"data.image_suffix ({data.image_suffix!r}): every image would be its own label")


class LabelMapping:
    """Label-file values to training ids 0..``num_classes - 1`` or ``IGNORE_INDEX`` by the module docstring's
    rules, with one lookup table over every 8- and 16-bit value (``lut``: ``int16``, ``NOT_A_CLASS`` where the
    rules give no id). Calling it on a label array maps it, or raises the ``UserError`` that names the file, the
    values without an id and the keys that would account for them."""

    def __init__(self, num_classes: int, value_map: dict[int, int] | None = None,
                 ignore_values: Sequence[int] = (IGNORE_INDEX,), reduce_zero_label: bool = False):
        self.num_classes, self.mapped, self.reduce_zero_label = num_classes, bool(value_map), reduce_zero_label
        values = np.arange(LABEL_VALUES, dtype=np.int64)
        reduced = values - 1 if reduce_zero_label else values
        lut = np.full(LABEL_VALUES, NOT_A_CLASS, np.int16)
        if value_map:
            for value, train_id in value_map.items():  # keys: the value after reduce_zero_label
                source = value + 1 if reduce_zero_label else value
                if 0 <= source < LABEL_VALUES:
                    lut[source] = train_id
        else:
            ids = (reduced >= 0) & (reduced < num_classes)
            lut[ids] = reduced[ids]
        if reduce_zero_label:
            lut[0] = IGNORE_INDEX
        lut[np.asarray([v for v in ignore_values if 0 <= v < LABEL_VALUES], np.int64)] = IGNORE_INDEX
        self.lut = lut

    def __call__(self, label: np.ndarray, path: str | Path) -> np.ndarray:
        """``label`` (file values, as ``read_label`` gives them) as a (H, W) uint8 mask of training ids and
        ``IGNORE_INDEX``; ``path`` is the file an error names."""
        if label.dtype not in (np.uint8, np.uint16):  # 32-bit PNG values ("I" mode): the table covers 0..65535
            outside = (label < 0) | (label >= LABEL_VALUES)
            if outside.any():
                self._unmapped(path, np.unique(label[outside]))
            label = label.astype(np.uint16)
        ids = np.take(self.lut, label)
        if ids.min(initial=0) < 0:
            self._unmapped(path, np.unique(label[ids < 0]))
        return ids.astype(np.uint8)

    def _unmapped(self, path: str | Path, values: np.ndarray) -> None:
        shown = ", ".join(str(int(v)) for v in values[:10]) + (f" and {len(values) - 10} more" if len(values) > 10 else "")
        k = self.num_classes
        if self.mapped:
            rule = "not in data.value_map"
        elif self.reduce_zero_label:
            rule = f"outside 1..{k} (data.reduce_zero_label: value v is training id v - 1, model.num_classes={k})"
        else:
            rule = f"not training ids 0..{k - 1} (model.num_classes={k}, data.value_map empty)"
        raise UserError(f"label file {path} has value(s) {shown}, {rule} and not in data.ignore_values: map them "
                        "with data.value_map or ignore them with data.ignore_values, or check that these are the label "
                        "files meant (data.label_suffix)")


def read_label(path: str | Path) -> np.ndarray:
    """The (H, W) integer values of a label PNG, as stored: a palette PNG's indices (not its colours), an 8- or
    16-bit grayscale PNG's values. A missing file, an undecodable one or a colour image is a ``UserError``
    naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"label file not found: {path}")
    try:
        with Image.open(path) as image:
            mode, bands = image.mode, len(image.getbands())
            label = np.asarray(image) if mode in _INTEGER_MODES else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise UserError(f"cannot decode label file {path}: {reason}; replace the file or leave its image out of "
                        "the split") from error
    if label is None:
        raise UserError(f"label file {path} has mode {mode} ({bands} channels): label PNGs must hold one class "
                        "value a pixel (8/16-bit grayscale or a palette PNG such as VOC's SegmentationClass), not a "
                        "colour rendering such as Cityscapes' *_color.png")
    return label.astype(_INTEGER_MODES[mode], copy=False)


def list_items(images: Path, labels: Path, image_suffix: str, label_suffix: str, split_file: Path | None,
               where: str) -> list[str]:
    """The items of a split as ``<rel>/<stem>`` paths (the image is ``images/<item><image_suffix>``, its label
    ``labels/<item><label_suffix>``): the split file's entries in order, or every image under ``images`` sorted.
    A listed image or label that does not exist, or an image without label, is an error naming the file; ``where``
    names the split's config keys (``data.train``)."""
    for folder, key in ((images, "images"), (labels, "labels")):
        if not folder.is_dir():
            raise UserFileNotFoundError(f"{key} folder not found: {folder} ({where}.{key}, relative to data.root)")
    if split_file is not None:
        items, lines = _read_split_file(split_file, where)
        _check_listed(items, lines, images, image_suffix, "image", split_file)
        _check_listed(items, lines, labels, label_suffix, "label", split_file)
        return items
    items = _find_images(images, image_suffix, label_suffix if labels == images else None)
    if not items:
        raise UserFileNotFoundError(f"no images ending in {image_suffix!r} under {images} ({where}.images, "
                                    "data.image_suffix)")
    missing = [item for item in items if not (labels / f"{item}{label_suffix}").is_file()]
    if missing:
        raise UserFileNotFoundError(
            f"image {images / (missing[0] + image_suffix)} has no label file {labels / (missing[0] + label_suffix)} "
            f"({len(missing)} of the {len(items)} images under {images} have none; {where}.labels, data.label_suffix; "
            f"or list the labelled ones in {where}.split_file)")
    return items


def _read_split_file(split_file: Path, where: str) -> tuple[list[str], list[int]]:
    """The split file's entries (first column of each non-empty line) and their line numbers."""
    if not split_file.is_file():
        raise UserFileNotFoundError(f"split file not found: {split_file} ({where}.split_file, relative to data.root)")
    items, lines = [], []
    for number, line in enumerate(split_file.read_text().splitlines(), start=1):
        fields = line.split()
        if fields:
            items.append(fields[0].lstrip("/"))
            lines.append(number)
    if not items:
        raise UserError(f"split file {split_file} lists no images ({where}.split_file)")
    return items, lines


def _check_listed(items: list[str], lines: list[int], folder: Path, suffix: str, kind: str, split_file: Path) -> None:
    missing = [k for k, item in enumerate(items) if not (folder / f"{item}{suffix}").is_file()]
    if missing:
        first = missing[0]
        hint = " (entries are paths without the suffix)" if items[first].endswith(suffix) else ""
        raise UserFileNotFoundError(
            f"{kind} file not found: {folder / (items[first] + suffix)}, listed at line {lines[first]} of {split_file}"
            f"{hint}; {len(missing)} of its {len(items)} entries have no {kind} in {folder}")


def _find_images(images: Path, image_suffix: str, label_suffix: str | None) -> list[str]:
    """Every file under ``images`` (symbolic links followed) ending in ``image_suffix`` (and, labels beside the
    images, not in ``label_suffix``), as sorted ``<rel>/<stem>`` paths."""
    found = []
    for folder, _, files in os.walk(images, followlinks=True):
        rel = Path(folder).relative_to(images)
        for name in files:
            if name.endswith(image_suffix) and not (label_suffix and name.endswith(label_suffix)):
                found.append((rel / name[: len(name) - len(image_suffix)]).as_posix())
    return sorted(found)


class MaskFolderSegmentation(SemanticSegmentationSplit):
    """A split of image files and their label PNGs (the module docstring: layout and value rules).

    Items as ``SemanticSegmentationSplit``'s: the RGB image, the training-id mask at the original resolution,
    ``image_id`` the item's index. ``items`` are the ``<rel>/<stem>`` paths, ``class_names`` one a training id.
    An image and label of different sizes, or a label value the rules leave without an id, is a ``UserError``
    naming the file when the item is read."""

    def __init__(self, images: str | Path, labels: str | Path | None, class_names: Sequence[str],
                 image_suffix: str = ".jpg", label_suffix: str = ".png", split_file: str | Path | None = None,
                 value_map: dict[int, int] | None = None, ignore_values: Sequence[int] = (IGNORE_INDEX,),
                 reduce_zero_label: bool = False, transform: A.Compose | None = None, train: bool = False,
                 where: str = "data.train"):
        self.image_dir = Path(images)
        self.label_dir = Path(labels) if labels else self.image_dir
        self.image_suffix, self.label_suffix = image_suffix, label_suffix
        self.split_file = Path(split_file) if split_file else None
        self.class_names = list(class_names)
        self.transform, self.train = transform, train
        self.mapping = LabelMapping(len(self.class_names), value_map, ignore_values, reduce_zero_label)
        self.items = list_items(self.image_dir, self.label_dir, image_suffix, label_suffix, self.split_file, where)

    @classmethod
    def from_config(cls, config: Config, split: str, transform: A.Compose | None = None,
                    train: bool = False) -> MaskFolderSegmentation:
        """``data.<split>`` of a ``mask_folder`` config (checked with ``check_mask_folder_config``); without
        ``data.class_names`` the classes are named ``class k``."""
        check_mask_folder_config(config)
        data, paths = config.data, getattr(config.data, split)
        num_classes = int(config.model.get("num_classes", DEFAULTS["num_classes"]))
        names = list(data.class_names) or [f"class {k}" for k in range(num_classes)]
        return cls(resolve_path(data.root, paths.images), resolve_path(data.root, paths.labels) if paths.labels else None,
                   names, data.image_suffix, data.label_suffix,
                   resolve_path(data.root, paths.split_file) if paths.split_file else None,
                   dict(data.value_map), list(data.ignore_values), data.reduce_zero_label, transform, train,
                   where=f"data.{split}")

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, index: int) -> Path:
        return self.image_dir / f"{self.items[index]}{self.image_suffix}"

    def label_path(self, index: int) -> Path:
        return self.label_dir / f"{self.items[index]}{self.label_suffix}"

    def describe(self, index: int) -> str:
        return str(self.image_path(index))

    def item_name(self, index: int) -> str:
        return self.items[index].replace("/", "__")

    def mask(self, index: int) -> np.ndarray:
        """Item ``index``'s (H, W) uint8 training-id mask (``IGNORE_INDEX`` where ignored)."""
        path = self.label_path(index)
        return self.mapping(read_label(path), path)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        where = f" (listed in {self.split_file})" if self.split_file else ""
        image = read_image(self.image_path(index), annotation_file=self.split_file)
        mask = self.mask(index)
        if image.shape[:2] != mask.shape:
            raise UserError(f"image {self.image_path(index)} is {image.shape[1]}x{image.shape[0]} but its label "
                            f"{self.label_path(index)} is {mask.shape[1]}x{mask.shape[0]}{where}")
        return image, mask, index
