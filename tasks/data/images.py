"""Data glue shared by the tasks: image decoding and the shortest-edge resize."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterator, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.io import ImageReadMode, decode_image
from tqdm import tqdm

from backbones.errors import UserError, UserFileNotFoundError

# the image files the tools and datasets list: torchvision's decoders read the first five, OpenCV the rest
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_OPENCV_SUFFIXES = (".bmp", ".tif", ".tiff")


def read_image(path: str | Path, image_id: int | str | None = None, annotation_file: str | Path | None = None) -> np.ndarray:
    """RGB ``uint8`` array ``(H, W, 3)`` decoded by torchvision's libjpeg-turbo / libpng decoders (BMP and
    TIFF, which they do not read, by OpenCV's).

    Grayscale, palette and CMYK images come out as RGB. A missing, truncated or undecodable file is a
    ``UserError`` naming the file, the image id and the annotation file that lists it. (torchvision 0.29
    marks these decoders deprecated in favour of TorchCodec; they remain the fastest JPEG path installed
    here.)
    """
    path = Path(path)
    details = ([f"image id {image_id}"] if image_id is not None else []) + (
        [f"listed in {annotation_file}"] if annotation_file else [])
    where = f"{path}" + (f" ({', '.join(details)})" if details else "")
    if not path.exists() or path.is_dir():  # (a FIFO or a device is read as it is)
        raise UserFileNotFoundError(f"image file not found: {where}; check data.root and the image folder")
    try:
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        if data.numel() == 0:
            raise ValueError("the file is empty")
        if path.suffix.lower() in _OPENCV_SUFFIXES:
            image = cv2.imdecode(data.numpy(), cv2.IMREAD_COLOR)  # 8-bit BGR whatever the stored depth and colours
            if image is None:
                raise ValueError("OpenCV cannot decode it")
            return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        image = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError, cv2.error) as error:
        reason = " ".join(str(error).split())
        raise UserError(f"cannot decode image {where}: {reason}; replace the file or remove the image from the "
                        "annotations (tools/check_data.py --decode finds every such file)") from error
    return image.permute(1, 2, 0).numpy()


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """Output size when the shorter side becomes ``short`` unless the longer would pass ``max_size``."""
    scale = min(short / min(height, width), max_size / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


class ShortestEdgeResize(A.DualTransform):
    """Resize so that the shorter side is one of ``short_sizes`` (drawn at random) and the longer side is
    at most ``max_size``, keeping the aspect ratio. Masks use nearest-neighbour interpolation; boxes
    (kept normalized by albumentations) follow the image."""

    def __init__(self, short_sizes: Sequence[int], max_size: int, p: float = 1.0):
        super().__init__(p=p)
        self.short_sizes = list(short_sizes)
        self.max_size = max_size

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        short = self.py_random.choice(self.short_sizes)
        return {"size": shortest_edge_size(height, width, short, self.max_size)}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params) -> np.ndarray:
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params) -> np.ndarray:
        return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params) -> np.ndarray:
        return bboxes  # normalized coordinates do not change under a resize

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("short_sizes", "max_size")


WORKER_GRACE_SECONDS = 10


def worker_leaves_stops_to_its_process(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT (a Ctrl-C reaches the whole process group; the training process
    stops itself). On SIGTERM they keep serving for ``WORKER_GRACE_SECONDS`` and then exit quietly, with
    status 0: a job-wide SIGTERM (as SLURM and the distributed launcher send to the whole process group)
    reaches the workers together with the training process, which still needs the batches of the
    iteration it finishes before its checkpoint; exiting at once made it fail with "DataLoader worker
    exited unexpectedly". The DataLoader's own shutdown (a stop message, then a join) ends them sooner,
    and a terminate at interpreter exit still ends them within the grace period."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def exit_after_grace(signum, frame):
        signal.signal(signal.SIGALRM, lambda *args: os._exit(0))
        signal.alarm(WORKER_GRACE_SECONDS)

    signal.signal(signal.SIGTERM, exit_after_grace)


class ImageFiles(Dataset):
    """Image files to run a model on: item ``i`` is ``(i, image, resized)``, the file decoded (RGB ``uint8``
    tensor ``(H, W, 3)``, for drawing) and resized to the test scale (shorter side ``min_size``, longer at
    most ``max_size``; ``uint8`` ``(3, h, w)``, the model's input)."""

    def __init__(self, files: Sequence[Path], min_size: int, max_size: int):
        self.files = list(files)
        self.resize = ShortestEdgeResize([min_size], max_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        image = read_image(self.files[index])
        resized = np.ascontiguousarray(self.resize(image=image)["image"])
        return index, torch.from_numpy(image), torch.from_numpy(resized).permute(2, 0, 1)


def inference_batches(dataset: Dataset, indices: Sequence[int], batch_size: int, num_workers: int,
                      progress: bool = False, desc: str = "eval") -> Iterator[list]:
    """The items ``indices`` of ``dataset``, in order, as lists of ``batch_size``: read, decoded and resized
    by ``num_workers`` DataLoader workers (0: in this process) while the model runs, with a progress bar
    when ``progress``."""
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=list, worker_init_fn=worker_leaves_stops_to_its_process if num_workers else None)
    yield from tqdm(loader, desc=desc, total=len(loader), disable=not progress, dynamic_ncols=True)


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
