"""Host-blocking points of a detector's training step and inference call, counted exactly, with call sites.

On a GPU the host waits for the device wherever the size or value of a result depends on the data
(``nonzero``, boolean-mask indexing, NMS's variable output, ``unique``, ``.item()``/``float()``/``bool()``
of a tensor, ``.tolist()``/``.cpu()``/``.numpy()`` of a computed one) and at every host-to-device copy not
made ``non_blocking``: kernels can no longer be queued ahead, CUDA graphs cannot capture the step and
``torch.compile`` breaks the graph there. ``HostSyncs`` counts these on any device, so a CPU machine
gives the figures a GPU run has:

- data-dependent ops are aten ops (a ``TorchDispatchMode``): ``nonzero``, indexing or index assignment
  with a boolean mask, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``,
  ``bincount``, ``equal``, ``torchvision::nms``; and ``_local_scalar_dense`` (a tensor read as a Python
  number or truth value);
- copies are Python-level calls (a ``TorchFunctionMode``): ``Tensor.to``/``Tensor.cuda`` of a host tensor
  to the model's device without ``non_blocking=True`` (host tensors: the batch as the data pipeline gives
  it, tensors made from Python data or by a factory function without a ``device``, and what is computed
  from them), a tensor made from Python data directly on the device (``torch.tensor(..., device=...)``),
  and ``.tolist()``/``.numpy()``/``.cpu()`` of a tensor computed on the device;
- CUDA's code paths are taken on the CPU too: RoIAlign through torchvision's kernel (the sparse CPU
  kernel is a CPU choice), and ``batched_nms`` choosing between a loop over the groups and one NMS of all
  by CUDA's rule, not the CPU's: torchvision's loops above 20 000 box numbers there (4 000 on the CPU),
  ``heads.boxes``' never does on CUDA.

``count_detector_syncs`` counts one training step (forward, losses, backward; the optimizer step has none)
and one inference call of our detector and of torchvision's, each after one uncounted call, fed as their
training code feeds them (torchvision's: its reference script's blocking ``.to(device)`` of images and
targets). ``python tools/benchmark.py CONFIG --mode syncs [--compare torchvision]`` prints and writes them.
The training engine adds reads of its own: the finite-loss and stop check (once a micro-batch, or once in N
iterations with ``train.check_period: N``) and the log line.
"""

from __future__ import annotations

import contextlib
import traceback
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torchvision.ops.boxes as tv_boxes
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import heads.boxes
from heads import torchvision_roi_align

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_PROJECT_DIRS = tuple(str(PROJECT_ROOT / name) for name in ("backbones", "heads", "tasks"))
_TORCH_DIR = str(Path(torch.__file__).parent)
_THIS_FILE = str(Path(__file__).resolve())
CUDA_COORDINATE_TRICK_LIMIT = 20_000  # torchvision's batched_nms on CUDA: the coordinate trick up to this many numbers

aten = torch.ops.aten
_ALWAYS_DATA_DEPENDENT = {
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.bincount.default: "bincount",
    aten.equal.default: "equal",
    aten._local_scalar_dense.default: "scalar read",
}
_MASK_INDEXING = {aten.index.Tensor: "boolean-mask index", aten.index_put.default: "boolean-mask index_put",
                  aten.index_put_.default: "boolean-mask index_put", aten._index_put_impl_.default: "boolean-mask index_put"}
_HOST_FACTORIES = {torch.tensor, torch.as_tensor, torch.from_numpy, torch.zeros, torch.ones, torch.empty, torch.full,
                   torch.arange, torch.linspace}
_READS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "cpu"}


@dataclass
class SyncReport:
    """Host-blocking points of one counted call: their number, by kind and by call site (``file:line``)."""

    by_kind: Counter = field(default_factory=Counter)
    by_site: Counter = field(default_factory=Counter)  # (kind, site) -> count

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_kind": dict(sorted(self.by_kind.items())),
                "sites": [{"kind": kind, "site": site, "count": n}
                          for (kind, site), n in sorted(self.by_site.items(), key=lambda item: (-item[1], item[0]))]}


def _call_site() -> str:
    """The innermost frame of the project's code (else the innermost outside torch and this file); in the
    backward pass, the autograd node that runs the op."""
    node = torch._C._current_autograd_node()
    if node is not None:
        return f"backward of {node.name()}"
    frames = [f for f in traceback.extract_stack()[:-2] if f.filename != _THIS_FILE]
    for frame in reversed(frames):
        if frame.filename.startswith(_PROJECT_DIRS):
            return f"{Path(frame.filename).relative_to(PROJECT_ROOT)}:{frame.lineno} {frame.name}"
    for frame in reversed(frames):
        if not frame.filename.startswith(_TORCH_DIR):
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return "?"


def _is_bool_index(indices: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in tree_flatten(indices)[0])


class _DataDependentOps(TorchDispatchMode):
    def __init__(self, record: Callable[[str], None]):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _ALWAYS_DATA_DEPENDENT.get(func)
        if kind is None and func in _MASK_INDEXING and len(args) > 1 and _is_bool_index(args[1]):
            kind = _MASK_INDEXING[func]
        if kind is None and func is aten.repeat_interleave.Tensor and (kwargs or {}).get("output_size") is None:
            kind = "repeat_interleave"
        if kind is None and func is torch.ops.torchvision.nms.default:
            kind = "nms"
        if kind is not None:
            self.record(kind)
        return func(*args, **(kwargs or {}))


class _HostDeviceCopies(TorchFunctionMode):
    """Host-to-device copies without ``non_blocking`` and device-to-host reads, by provenance of the tensors."""

    def __init__(self, record: Callable[[str], None], host: list[torch.Tensor], device: torch.device):
        super().__init__()
        self.record, self.device = record, device
        self._host: dict[int, weakref.ref] = {}
        for tensor in host:
            self._mark_host(tensor)

    def _mark_host(self, tensor: torch.Tensor) -> None:
        self._host[id(tensor)] = weakref.ref(tensor)

    def is_host(self, tensor: Any) -> bool:
        ref = self._host.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return ref is not None and ref() is tensor

    def _target_device(self, func, args, kwargs) -> torch.device | None:
        """The device a ``Tensor.to``/``Tensor.cuda`` call moves to (None: a dtype change only)."""
        if func is torch.Tensor.cuda:
            return self.device
        for value in (*args[1:], kwargs.get("device")):
            if isinstance(value, (torch.device, str)):
                return torch.device(value)
            if isinstance(value, torch.Tensor):  # to(other): other's device
                return None if self.is_host(value) else value.device
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cuda) and self.is_host(args[0]):
            target = self._target_device(func, args, kwargs)
            if target is not None and target.type == self.device.type:
                if not kwargs.get("non_blocking", False) and not (len(args) > 2 and args[2] is True):
                    self.record("blocking host-to-device copy")
                return result  # the copy's result lives on the device
        elif func in _READS and isinstance(args[0], torch.Tensor) and not self.is_host(args[0]):
            self.record(f"device-to-host {_READS[func]}")
            return result
        elif func in _HOST_FACTORIES:
            if kwargs.get("device") is None:
                for tensor in tree_flatten(result)[0]:
                    if isinstance(tensor, torch.Tensor):
                        self._mark_host(tensor)
            elif func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], torch.Tensor):
                self.record("tensor from Python data on the device")
            return result
        if any(self.is_host(t) for t in tree_flatten((args, kwargs))[0]):  # computed from host tensors: on the host
            for tensor in tree_flatten(result)[0]:
                if isinstance(tensor, torch.Tensor):
                    self._mark_host(tensor)
        return result


def _cuda_loops_over_groups(boxes: torch.Tensor) -> bool:
    """``heads.boxes.loops_over_groups`` on CUDA: never (one NMS call for all groups)."""
    return False


def _cuda_batched_nms(boxes, scores, idxs, iou_threshold):
    """torchvision's ``batched_nms`` as it chooses on CUDA (this replaces its per-class path while counting)."""
    if boxes.numel() > CUDA_COORDINATE_TRICK_LIMIT:
        return _TORCHVISION_VANILLA(boxes, scores, idxs, iou_threshold)
    return tv_boxes._batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)


_TORCHVISION_VANILLA = tv_boxes._batched_nms_vanilla
_OUR_RULE = heads.boxes.loops_over_groups


@contextlib.contextmanager
def cuda_code_paths(model: torch.nn.Module) -> Iterator[None]:
    """While active: ``model``'s RoIAlign through torchvision's kernel (as on CUDA), and torchvision's and our
    ``batched_nms`` (``heads.boxes``) deciding by CUDA's rule; restored afterwards."""
    try:
        tv_boxes._batched_nms_vanilla = _cuda_batched_nms
        heads.boxes.loops_over_groups = _cuda_loops_over_groups
        with torchvision_roi_align(model):
            yield
    finally:
        tv_boxes._batched_nms_vanilla = _TORCHVISION_VANILLA
        heads.boxes.loops_over_groups = _OUR_RULE


class HostSyncs:
    """A context counting the host-blocking points of what runs inside it (see the module docstring).
    ``host`` are the tensors the host holds when it starts (the batch); ``device`` the model's."""

    def __init__(self, host: list[torch.Tensor], device: torch.device):
        self.report = SyncReport()
        self._modes = (_HostDeviceCopies(self._record, host, device), _DataDependentOps(self._record))
        self._stack = contextlib.ExitStack()

    def _record(self, kind: str) -> None:
        self.report.by_kind[kind] += 1
        self.report.by_site[(kind, _call_site())] += 1

    def __enter__(self) -> "HostSyncs":
        for mode in self._modes:
            self._stack.enter_context(mode)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def _tensors(images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [*images, *(v for t in targets for v in t.values() if isinstance(v, torch.Tensor))]


def _train_step(model: torch.nn.Module, feed: Callable[[], tuple[list, list]]) -> None:
    images, targets = feed()
    losses = model(images, targets)
    sum(losses.values()).backward()


def _infer(model: torch.nn.Module, feed: Callable[[], tuple[list, list]]) -> None:
    images, _ = feed()
    with torch.no_grad():
        model(images)


def count_model_syncs(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                      device: torch.device, to_device: bool = False) -> dict[str, SyncReport]:
    """``{"train": ..., "infer": ...}``: one training step (forward, losses, backward) and one inference call
    of ``model``, each after one uncounted call. ``to_device``: the caller moves images and targets to the
    device itself with a plain ``.to(device)`` first (torchvision's reference scripts), inside the count."""

    def feed() -> tuple[list, list]:
        if not to_device:
            return images, targets
        return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]

    reports = {}
    with cuda_code_paths(model):
        for name, call, training in (("train", _train_step, True), ("infer", _infer, False)):
            model.train(training)
            call(model, feed)  # uncounted: caches (anchors) filled, lazy initialisation done
            model.zero_grad(set_to_none=True)
            with HostSyncs(_tensors(images, targets), device) as counter:
                call(model, feed)
            model.zero_grad(set_to_none=True)
            reports[name] = counter.report
    return reports


def torchvision_inputs(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Images as torchvision's detectors take them: float 0..1 (made before counting: the data pipeline's part)."""
    return [image.float() / 255 for image in images]

