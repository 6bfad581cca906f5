"""Turning a list of images into one normalized, padded batch: the first step of every task model."""

from __future__ import annotations

from typing import Sequence

import torch

INPUT_FORMATS = ("RGB", "BGR")
# torchvision's ImageNet normalization (pixels 0..1, RGB): the default of every task model
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def batch_images(images: Sequence[torch.Tensor], pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                 size_divisibility: int, channels_last: bool = False, input_format: str = "RGB",
                 input_range: float = 1.0, buckets: Sequence[tuple[int, int]] = ()
                 ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Normalize each ``(3, H, W)`` RGB image (``uint8`` 0..255 or float 0..1) and zero-pad all, bottom and
    right, into one ``(N, 3, H, W)`` batch whose sides are multiples of ``size_divisibility`` (0: no
    constraint), on the device of ``pixel_mean``; with ``buckets`` (``(H, W)`` pairs), of the smallest
    bucket (by area, rounded up to the divisibility) that holds the batch (a batch larger than every bucket:
    its own size), so that a run's batches take a few shapes. Images of one size may come stacked as one
    ``(N, 3, H, W)`` tensor. Returns the batch and each image's ``(h, w)``.

    The network's own input convention: pixels scaled to ``0..input_range`` (1: torchvision's, 255:
    detectron2's and Caffe2's), channels in ``input_format`` order (``RGB``, or ``BGR`` for networks
    trained on OpenCV-decoded images, such as MSRA's original ResNets), then ``(x - pixel_mean) /
    pixel_std`` with ``pixel_mean``/``pixel_std`` (``(3, 1, 1)``) in those units and that order."""
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    if isinstance(images, torch.Tensor) and images.dim() == 4 and size_divisibility <= 1:
        # images of one size already stacked (N, 3, H, W) (classification): one pass, nothing to pad
        batch = normalize_image(images, pixel_mean, pixel_std, input_format, input_range)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch, [tuple(batch.shape[-2:])] * len(batch)
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    divisor = max(size_divisibility, 1)
    height, width = (_round_up(max(side), divisor) for side in zip(*sizes))
    rounded = [(_round_up(h, divisor), _round_up(w, divisor)) for h, w in buckets]
    fitting = [(h, w) for h, w in rounded if h >= height and w >= width]
    height, width = min(fitting, key=lambda hw: (hw[0] * hw[1], hw), default=(height, width))
    batch = torch.zeros((len(images), 3, height, width), device=pixel_mean.device)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[-2], : img.shape[-1]] = normalize_image(img, pixel_mean, pixel_std, input_format,
                                                                        input_range)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch, sizes


def _round_up(size: int, divisor: int) -> int:
    return -(-size // divisor) * divisor


def normalize_image(image: torch.Tensor, pixel_mean: torch.Tensor, pixel_std: torch.Tensor, input_format: str = "RGB",
                    input_range: float = 1.0) -> torch.Tensor:
    """One ``(3, H, W)`` RGB image, or a stack ``(N, 3, H, W)`` of them (``uint8`` 0..255 or float 0..1),
    in the network's convention (see ``batch_images``): float, on the device of ``pixel_mean``."""
    image = image.to(pixel_mean.device, non_blocking=True)
    if image.dtype == torch.uint8:  # 0..255 kept as it is where the network wants that (no rounding on the way)
        image = image.float() if input_range == 255 else image.float() / (255 / input_range)
    else:
        image = image.float() if input_range == 1 else image.float() * input_range
    if input_format == "BGR":
        image = image.flip(-3)
    return (image - pixel_mean) / pixel_std
