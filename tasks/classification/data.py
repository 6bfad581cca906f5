"""Classification data: image folders (``ROOT/train/<class>/*``, ``ROOT/val/<class>/*``) and CIFAR-10/100 in
their published Python pickle format, with albumentations pipelines (the paper's CIFAR augmentation, or
ImageNet-style random resized crops)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.datasets.utils import download_and_extract_archive

from backbones.errors import UserError, UserFileNotFoundError
from backbones.weights import read_pickled_arrays
from tasks.data.images import IMAGE_SUFFIXES, read_image

logger = logging.getLogger(__name__)

CIFAR_FORMATS = ("cifar10", "cifar100")


def scan_image_folder(folder: str | Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """The classes (sub-folder names, sorted) and the ``(file, label)`` samples of ``folder``, files sorted
    within each class (torchvision's ``ImageFolder`` order). ``classes`` (the training split's) fixes the
    labels for another split: a sub-folder it does not know is an error. A class folder without images is
    an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserFileNotFoundError(f"image folder {folder} not found: put one sub-folder per class in it "
                                    f"({folder}/<class>/<image>.jpg); check data.root")
    found = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not found:
        raise UserError(f"{folder} has no class sub-folders: put each class's images in {folder}/<class>/")
    if classes is None:
        classes = found
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise UserError(f"{folder} has class folders the training split lacks: {', '.join(unknown)} (training "
                        f"classes: {', '.join(classes)})")
    samples: list[tuple[Path, int]] = []
    for name in found:
        files = sorted(p for p in (folder / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"class folder {folder / name} has no images ({', '.join(IMAGE_SUFFIXES)}); add some or "
                            "remove the folder")
        samples.extend((path, classes.index(name)) for path in files)
    return list(classes), samples


class ClassificationDataset(Dataset):
    """Images with one label each. Items are ``(image (3, H, W) uint8, {"label", "image_id"})``, the image
    transformed by ``transform`` (an albumentations pipeline, seeded per item by the training stream).

    Subclasses give ``class_names`` and ``__len__`` and implement ``load(index) -> (H, W, 3) uint8 array``
    and ``label(index)``."""

    class_names: list[str]
    transform: A.Compose | None = None
    image_size: int | None = None  # the size every image must have (the CIFAR pipeline), if any

    def load(self, index: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def label(self, index: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"image {index}"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = self.load(index)
        if self.image_size and image.shape[:2] != (self.image_size, self.image_size):
            raise UserError(f"{self.describe(index)} is {image.shape[1]}x{image.shape[0]} pixels; data.augment: cifar "
                            f"takes images of data.crop_size ({self.image_size}x{self.image_size}): resize the data "
                            "or use data.augment: imagenet")
        if self.transform is not None:
            if seed is not None:
                self.transform.set_random_seed(seed)
            image = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), {"label": self.label(index), "image_id": index}


class ImageFolderDataset(ClassificationDataset):
    """``folder/<class>/<image>`` (the ImageFolder layout); see ``scan_image_folder``."""

    def __init__(self, folder: str | Path, classes: Sequence[str] | None = None, transform: A.Compose | None = None,
                 image_size: int | None = None):
        self.folder = Path(folder)
        self.class_names, self.samples = scan_image_folder(folder, classes)
        self.transform, self.image_size = transform, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> np.ndarray:
        return read_image(self.samples[index][0])

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def describe(self, index: int) -> str:
        return f"image {self.samples[index][0]}"


# The published archives (as torchvision's CIFAR datasets name them): folder, training files, test file,
# metadata file, label key, class-name key
_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}


def _text_keys(value: Any) -> Any:
    """A pickled dict with ``bytes`` keys (Python 3 pickles read as bytes) as one with ``str`` keys."""
    if isinstance(value, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in value.items()}
    return value


def _download_cifar(name: str, root: Path) -> None:
    """Fetch and unpack the CIFAR archive into ``root`` with torchvision's downloader (checksum checked).
    Offline, a one-line error says where to put the files."""
    dataset = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    folder = root / _CIFAR_LAYOUT[name][0]
    try:
        download_and_extract_archive(dataset.url, str(root), filename=dataset.filename, md5=dataset.tgz_md5)
    except Exception as error:  # no network, a proxy, a broken download
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"could not download {name} ({type(error).__name__}: {reason}); without network access, "
                        f"download {dataset.url} elsewhere and unpack it into {root} (giving {folder}/), then run "
                        "with data.download=false") from error


def read_cifar(root: str | Path, name: str, split: str, download: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images ``(N, 32, 32, 3)`` uint8, labels ``(N,)`` int64 and class names of the ``train`` or ``test``
    split of CIFAR-10/100 in the published Python format under ``root`` (``root/cifar-10-batches-py/`` or
    ``root/cifar-100-python/``), downloaded there first when ``download`` and missing. The pickles are read
    without running code (numpy arrays, lists, numbers and strings only)."""
    root = Path(root)
    folder_name, train_files, test_file, meta_file, label_key, names_key = _CIFAR_LAYOUT[name]
    folder = root / folder_name
    files = [folder / f for f in (train_files if split == "train" else [test_file])] + [folder / meta_file]
    if download and not all(f.is_file() for f in files):
        _download_cifar(name, root)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserFileNotFoundError(
            f"{name} file {missing[0]} not found: put the unpacked {name} python archive ({folder_name}/ with "
            f"{', '.join([*train_files, test_file, meta_file])}) under data.root={root}, or set data.download=true "
            "on a machine with network access")
    images, labels = [], []
    for path in files[:-1]:
        try:
            batch = _text_keys(read_pickled_arrays(path))
            data, batch_labels = np.asarray(batch["data"], dtype=np.uint8), np.asarray(batch[label_key], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path} is not a {name} batch file (a pickled dict with 'data' and '{label_key}'): "
                            f"{type(error).__name__}: {error}") from error
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise UserError(f"{path}: 'data' must be (N, 3072) with N labels, got {data.shape} and {len(batch_labels)} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    try:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _text_keys(read_pickled_arrays(files[-1]))[names_key]]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as error:
        raise UserError(f"{files[-1]} is not a {name} metadata file (a pickled dict with '{names_key}'): {error}") from error
    labels_all = np.concatenate(labels)
    if len(labels_all) and (labels_all.min() < 0 or labels_all.max() >= len(names)):
        raise UserError(f"{folder}: labels must lie in 0..{len(names) - 1} (the classes of {files[-1].name}), got "
                        f"{labels_all.min()}..{labels_all.max()}")
    return np.ascontiguousarray(np.concatenate(images)), labels_all, names


def write_cifar(root: str | Path, name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                class_names: Sequence[str]) -> Path:
    """Write ``(images (N, 32, 32, 3) uint8, labels)`` pairs in the published CIFAR-10/100 Python format
    (CIFAR-10's training set as 5 batches), e.g. a synthetic set that exercises the CIFAR pipeline."""
    folder_name, train_files, test_file, meta_file, label_key, names_key = _CIFAR_LAYOUT[name]
    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)

    def dump(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
        data = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1), dtype=np.uint8)
        with open(path, "wb") as f:
            pickle.dump({"data": data, label_key: [int(x) for x in labels]}, f, protocol=2)

    for path, images, labels in zip(train_files, np.array_split(train[0], len(train_files)),
                                    np.array_split(train[1], len(train_files))):
        dump(folder / path, images, labels)
    dump(folder / test_file, *test)
    with open(folder / meta_file, "wb") as f:
        pickle.dump({names_key: list(class_names)}, f, protocol=2)
    return folder


class CifarDataset(ClassificationDataset):
    """CIFAR-10/100 (``read_cifar``), all of a split or the ``indices`` given (a train/val split)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: list[str], indices: Sequence[int] | None = None,
                 transform: A.Compose | None = None, source: str = "CIFAR"):
        self.images, self.labels, self.class_names = images, labels, class_names
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices)
        self.transform, self.source = transform, source

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> np.ndarray:
        return self.images[self.indices[index]]

    def label(self, index: int) -> int:
        return int(self.labels[self.indices[index]])

    def describe(self, index: int) -> str:
        return f"{self.source} image {int(self.indices[index])}"

    def mean_image(self) -> torch.Tensor:
        """The per-pixel mean ``(3, 32, 32)`` of these images, in 0..1."""
        total = np.zeros(self.images.shape[1:], np.float64)
        for start in range(0, len(self.indices), 10000):  # in chunks: no float copy of the whole set
            total += self.images[self.indices[start:start + 10000]].sum(0, dtype=np.float64)
        return torch.from_numpy(total / max(len(self.indices), 1) / 255).permute(2, 0, 1).float()


def classification_transform(train: bool, augment: str, crop_size: int, resize_test: int, pad: int = 4,
                             flip_prob: float = 0.5) -> A.Compose | None:
    """The albumentations pipeline.

    ``cifar`` (the paper's Section 4.2): training pads ``pad`` zero pixels on each side, takes a random
    ``crop_size`` square and flips horizontally; evaluation uses the image as it is (images must be
    ``crop_size`` squares). ``imagenet``: training takes a random resized crop (8-100% of the area, aspect
    3/4-4/3) of ``crop_size`` and flips; evaluation resizes the shorter side to ``resize_test`` and takes the
    central ``crop_size`` square. ``none``: no augmentation (images must share one size). ``prepare_config``
    checks ``augment`` (``data.augment``) against these three."""
    flip = [A.HorizontalFlip(p=flip_prob)] if flip_prob > 0 else []
    if augment == "none":
        return None
    if augment == "cifar":
        if not train:
            return None
        side = crop_size + 2 * pad
        return A.Compose([A.PadIfNeeded(side, side, border_mode=cv2.BORDER_CONSTANT, fill=0),
                          A.RandomCrop(crop_size, crop_size), *flip])
    if train:
        return A.Compose([A.RandomResizedCrop(size=(crop_size, crop_size), scale=(0.08, 1.0)), *flip])
    return A.Compose([A.SmallestMaxSize(max_size=resize_test), A.CenterCrop(crop_size, crop_size)])


def collate(batch: list) -> tuple[torch.Tensor, list]:
    """Images stacked into one ``(N, 3, H, W)`` tensor, targets as a list. Images of different sizes are an
    error (padding them would change their average-pooled features)."""
    images, targets = zip(*batch)
    sizes = sorted({tuple(image.shape[-2:]) for image in images})
    if len(sizes) > 1:
        raise UserError(f"images of different sizes {sizes} in one batch: use data.augment cifar or imagenet, "
                        "which give every image data.crop_size")
    return torch.stack(images), list(targets)
