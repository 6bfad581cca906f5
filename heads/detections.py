"""A batch's detections at a fixed size, read per image only where the host needs them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Mapping

import torch
import torch.nn.functional as F


def _traced() -> bool:
    """Inside an ONNX trace or a ``torch.export``: the counts are symbolic, the cut is a boolean mask."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


class Detections(Sequence):
    """Detections of ``N`` images: each field ``(N, D, ...)`` (``boxes`` ``(N, D, 4)``, ``scores``,
    ``labels`` ``(N, D)``), ``valid`` ``(N, D)`` true on a prefix of each row, best first.

    A sequence of per-image dicts of the valid entries, as torchvision's detectors return them. The sizes are
    fixed, so making them makes the host wait on nothing; the per-image counts are read back once, on the first
    per-image access. ``cpu()`` moves the whole batch to the host in one copy, after which the cut costs the
    device nothing: what an evaluation loop wants."""

    def __init__(self, fields: Mapping[str, torch.Tensor], valid: torch.Tensor):
        self.fields, self.valid = dict(fields), valid
        self._images: list[dict[str, torch.Tensor]] | None = None

    @classmethod
    def from_images(cls, images: Sequence[Mapping[str, torch.Tensor]]) -> "Detections":
        """Per-image dicts of the same fields (their first dimension the detections) padded into one batch."""
        counts = [len(next(iter(image.values()))) for image in images]
        size = max(counts, default=0)
        fields = {name: torch.stack([F.pad(image[name], [0, 0] * (image[name].ndim - 1) + [0, size - count])
                                     for image, count in zip(images, counts)]) for name in (images[0] if images else {})}
        return cls(fields, torch.arange(size)[None] < torch.tensor(counts, dtype=torch.int64).view(-1, 1))

    def __len__(self) -> int:
        return self.valid.shape[0]

    def __getitem__(self, index):
        if self._images is None:
            self._images = self._cut()
        return self._images[index]

    def _cut(self) -> list[dict[str, torch.Tensor]]:
        if _traced():
            return [{name: field[i][self.valid[i]] for name, field in self.fields.items()} for i in range(len(self))]
        counts = self.valid.sum(1).tolist()  # the one host read (none once on the host)
        return [{name: field[i, :count] for name, field in self.fields.items()} for i, count in enumerate(counts)]

    def replace(self, **fields: torch.Tensor) -> "Detections":
        """The same detections with the given fields replaced or added (same leading ``(N, D)``)."""
        return Detections({**self.fields, **fields}, self.valid)

    def cpu(self) -> "Detections":
        """On the host, in one device-to-host copy for all fields (packed as float64, exact for every float32
        and every integer below 2**53; each field gets its dtype back)."""
        if self.valid.device.type == "cpu":
            return self
        num, size = self.valid.shape
        parts = [*self.fields.values(), self.valid]
        widths = [part.shape[2:].numel() for part in parts]
        packed = torch.cat([part.reshape(num, size, -1).double() for part in parts], dim=2).cpu()
        moved = [chunk.reshape(part.shape).to(part.dtype) for chunk, part in zip(packed.split(widths, dim=2), parts)]
        return Detections(dict(zip(self.fields, moved[:-1])), moved[-1])

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}={tuple(field.shape)}" for name, field in self.fields.items())
        return f"Detections({shapes}, valid={tuple(self.valid.shape)})"
