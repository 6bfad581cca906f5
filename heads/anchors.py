"""Anchor boxes over the feature maps of a backbone."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class AnchorGenerator(nn.Module):
    """Anchors of ``sizes[l]`` x ``aspect_ratios[l]`` (height / width) centred on every cell of level ``l``.

    A level's anchors are ordered cell by cell (row-major), and within a cell ratio-major then size, so
    they line up with RPN outputs reshaped as ``(N, H, W, A)``. ``round_base=True`` rounds the base
    anchors to whole pixels (torchvision); detectron2 keeps them exact.

    ``grid_stride``: "declared" uses each level's stride from the backbone's ``output_shape()``;
    "padded_image" divides the padded image size by the feature size (integer division), as torchvision
    does; the two differ only on levels whose size was rounded up (e.g. ``p6`` of an 800-pixel side).
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int],
        grid_stride: str = "declared",
        round_base: bool = True,
    ):
        super().__init__()
        if not (len(sizes) == len(aspect_ratios) == len(strides)):
            raise ValueError(
                f"anchor sizes ({len(sizes)} levels), aspect_ratios ({len(aspect_ratios)}) and feature levels "
                f"({len(strides)}) must have the same length"
            )
        if grid_stride not in ("declared", "padded_image"):
            raise ValueError(f"grid_stride must be 'declared' or 'padded_image', got {grid_stride!r}")
        self.strides = list(strides)
        self.grid_stride = grid_stride
        self.sizes, self.aspect_ratios = [list(s) for s in sizes], [list(r) for r in aspect_ratios]
        for level, (level_sizes, ratios) in enumerate(zip(sizes, aspect_ratios)):
            self.register_buffer(f"base{level}", self.base_anchors(level_sizes, ratios, round_base), persistent=False)
        self.num_anchors = [len(s) * len(r) for s, r in zip(sizes, aspect_ratios)]
        self._cache: dict[tuple, list[torch.Tensor]] = {}

    @staticmethod
    def base_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], round_base: bool = True) -> torch.Tensor:
        """(len(ratios) * len(sizes), 4) anchors centred on (0, 0)."""
        scales = torch.as_tensor(sizes, dtype=torch.float32)
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return base.round() if round_base else base

    def forward(self, feature_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int]) -> list[torch.Tensor]:
        """One ``(H_l * W_l * A_l, 4)`` tensor per level for feature maps of ``feature_sizes`` computed from
        a padded batch of ``image_size``. Kept per sizes, except under ``torch.compile``/``torch.export``:
        there the sizes may be symbols (no dictionary key), and the graph computes the anchors itself."""
        if torch.compiler.is_compiling():
            return self._grid(feature_sizes, image_size)
        key = (tuple(feature_sizes), tuple(image_size), self.base0.device, self.base0.dtype)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = self._grid(feature_sizes, image_size)
        return self._cache[key]

    def _grid(self, feature_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int]) -> list[torch.Tensor]:
        anchors = []
        for level, (h, w) in enumerate(feature_sizes):
            if self.grid_stride == "declared":
                stride_y = stride_x = self.strides[level]
            else:
                stride_y, stride_x = image_size[0] // h, image_size[1] // w
            base = getattr(self, f"base{level}")
            ys = torch.arange(h, dtype=torch.int32, device=base.device) * stride_y
            xs = torch.arange(w, dtype=torch.int32, device=base.device) * stride_x
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=-1).reshape(-1, 1, 4)
            anchors.append((shifts + base.view(1, -1, 4)).reshape(-1, 4))  # (H*W*A, 4)
        return anchors
