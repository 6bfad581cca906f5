"""Deployment: a trained detector or segmenter as one ONNX file that runs on ONNX Runtime without the
training code, and as ``torch.export`` programs (``.pt2``).

The ONNX graph takes one RGB ``uint8`` image ``(3, H, W)`` of any height and width and holds everything
the PyTorch model does after the test-time resize: normalization, padding to the backbone's size
divisibility, the backbone, and for a detector the RPN (anchors, top-k, NMS), the RoI heads (RoIAlign,
box head) and the post-processing (score threshold, small-box removal, per-class NMS, top detections).
Outputs: ``boxes`` ``(D, 4)`` x1y1x2y2 in the input's pixels, ``scores`` ``(D,)``, ``labels`` ``(D,)``
(1..K); a segmenter gives ``classes`` ``(H, W)`` (and ``logits`` ``(K, H, W)`` on request). The test
resize, the classes and the task are recorded in the file's ``metadata_props`` (``METADATA_KEYS``).

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. It traces the model's own
modules as they run (no second implementation to keep equal; where the heads compute a size from the
input, the RPN's per-level top-k count, box clipping and the per-image split, they keep it traced so
that it is not frozen at the example's size) and maps torchvision's ``nms`` and ``roi_align`` to ONNX's
``NonMaxSuppression`` and ``RoiAlign``. torch 2.9+ marks it deprecated; its ``DeprecationWarning`` is
silenced here. The ``torch.export``-based exporter (``exporter="dynamo"``, ``tools/export.py --exporter
dynamo``) takes the whole detector too (the heads' selections have fixed sizes; NMS's output and the kept
count are size symbols; NMS in float32 there, ONNX's only type) with ONNX Runtime's outputs equal to
PyTorch's (tested), but takes several times as long to export; ``export_program`` writes the same
``torch.export`` program as a ``.pt2`` file, for the detector and the segmenter whole.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from backbones.errors import UserError
from heads import Detections, paste_masks, torchvision_roi_align
from tasks.detection.model import rescale_boxes
from tasks.modeling.batching import normalize_image
from tasks.modeling.compiling import compile_settings

INSTALL_HINT = 'install the export extra: pip install -e ".[export]"'
DEFAULT_OPSET = 17
# an example image of this size is traced; the graph takes any size (tests check others)
EXAMPLE_SIZE = (480, 640)
METADATA_KEYS = ("resdet.task", "resdet.classes", "resdet.categories", "resdet.min_size_test",
                 "resdet.max_size_test", "resdet.outputs")


def _import(name: str):
    try:
        return __import__(name)
    except ImportError as error:
        raise UserError(f"{name} is not installed: {INSTALL_HINT}") from error


def pad_to_divisibility(image: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad ``(C, H, W)`` bottom and right to multiples of ``divisor``, from the image's own (possibly
    traced) size, as ``batch_images`` pads a batch of one."""
    if divisor <= 1:
        return image
    height, width = image.shape[-2:]
    return F.pad(image, (0, (divisor - width % divisor) % divisor, 0, (divisor - height % divisor) % divisor))


class DetectorGraph(nn.Module):
    """What is exported of a ``FasterRCNN``: one ``uint8`` image ``(3, H, W)`` -> ``boxes`` ``(D, 4)`` in
    its pixels, ``scores`` ``(D,)``, ``labels`` ``(D,)`` and, for a Mask R-CNN, ``mask_probs`` ``(D, M, M)``
    (each detection's mask in its box, before the paste). The model's own modules, called as its
    ``forward`` calls them on a batch of one."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        normalized = normalize_image(image, model.pixel_mean, model.pixel_std, model.input_format, model.input_range)
        batch = pad_to_divisibility(normalized, model.backbone.size_divisibility)[None]  # (1, 3, H', W')
        (detections,) = model.network(batch, image_size(image))
        return tuple(detections[name] for name in detector_outputs(model))


def detector_outputs(model: nn.Module) -> list[str]:
    """The exported detector's outputs, by name."""
    return ["boxes", "scores", "labels"] + (["mask_probs"] if model.has_masks else [])


def image_size(image: torch.Tensor) -> torch.Tensor:
    """``(1, 2)``: the ``(h, w)`` of a ``(3, H, W)`` image as a tensor computed from its shape, so that a
    trace or an export keeps it symbolic (a tensor made from the sizes as numbers would be a constant)."""
    return torch.stack([torch.scalar_tensor(side, dtype=torch.float32) for side in image.shape[-2:]])[None]


class SegmenterGraph(nn.Module):
    """What is exported of a ``SemanticSegmentor``: one ``uint8`` image ``(3, H, W)`` -> ``classes``
    ``(H, W)`` (argmax of the logits) and, with ``logits=True``, the logits ``(K, H, W)``."""

    def __init__(self, model: nn.Module, logits: bool = False):
        super().__init__()
        self.model, self.logits = model, logits

    def forward(self, image: torch.Tensor):
        model = self.model
        height, width = image.shape[-2:]
        normalized = normalize_image(image, model.pixel_mean, model.pixel_std)
        batch = pad_to_divisibility(normalized, model.backbone.size_divisibility)[None]
        scores = F.interpolate(model.head(model.backbone(batch)), size=batch.shape[-2:], mode="bilinear",
                               align_corners=False)[0, :, :height, :width]  # (K, H, W)
        classes = scores.argmax(0)
        return (classes, scores) if self.logits else classes


@contextlib.contextmanager
def _exportable(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with torchvision's RoIAlign (the sparse CPU one has no ONNX form) for the
    duration of an export; restored afterwards."""
    was_training = model.training
    try:
        with torchvision_roi_align(model):
            yield model.eval()
    finally:
        model.train(was_training)


EXPORTERS = ("torchscript", "dynamo")


def export_onnx(model: nn.Module, task: str, path: str | Path, metadata: Mapping[str, Any],
                opset: int = DEFAULT_OPSET, logits: bool = False, exporter: str = "torchscript") -> Path:
    """Write ``model`` (a ``FasterRCNN`` for ``task="detection"``, a ``SemanticSegmentor`` for
    ``"segmentation"``) to ``path`` as an ONNX graph with dynamic height and width, and record
    ``metadata`` (see ``export_metadata``) in its ``metadata_props``. Checked with ``onnx.checker``.
    ``exporter``: ``torchscript`` (tracing) or ``dynamo`` (``torch.export``'s program, the sizes
    ``export_program`` takes; its opset is at least 18)."""
    if exporter not in EXPORTERS:
        raise UserError(f"ONNX exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    onnx = _import("onnx")
    _import("onnxscript")  # torch.onnx needs it, even for the TorchScript-based exporter
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((3, *EXAMPLE_SIZE), dtype=torch.uint8)
    device = next(model.parameters()).device
    if task == "detection":
        graph: nn.Module = DetectorGraph(model)
        outputs = detector_outputs(model)
        if model.has_masks:
            metadata = {**metadata, "resdet.mask_rules": model.roi_heads.mask_rules}
        dynamic = {"image": {1: "height", 2: "width"}, **{name: {0: "detections"} for name in outputs}}
    elif task == "segmentation":
        graph = SegmenterGraph(model, logits)
        outputs = ["classes", "logits"] if logits else ["classes"]
        dynamic = {"image": {1: "height", 2: "width"}, "classes": {0: "height", 1: "width"},
                   "logits": {1: "height", 2: "width"}}
    else:
        raise UserError(f"cannot export a model of task {task!r}: detection or segmentation")
    if exporter == "dynamo":
        with _exportable(model), torch.no_grad(), compile_settings():
            torch.onnx.export(graph, (example.to(device),), str(path), dynamo=True, opset_version=max(opset, 18),
                              input_names=["image"], output_names=outputs, dynamic_shapes=_image_sizes(model, task),
                              verbose=False)
    else:
        with _exportable(model), torch.no_grad(), _quiet_tracing():
            torch.onnx.export(graph, (example.to(device),), str(path), dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=outputs,
                              dynamic_axes={k: v for k, v in dynamic.items() if k in ["image", *outputs]})
    proto = onnx.load(str(path))
    proto.doc_string = f"resdet {task} model: input 'image' uint8 (3, H, W) RGB, outputs {', '.join(outputs)}"
    props = {**{k: json.dumps(v) if not isinstance(v, str) else v for k, v in metadata.items()},
             "resdet.task": task, "resdet.outputs": json.dumps(outputs)}
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Tracing warns about every Python value it freezes; those the export relies on are the model's
    settings (thresholds, top-k), which are meant to be constants."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def export_metadata(min_size_test: int, max_size_test: int, classes: Mapping[int, str],
                    categories: Mapping[int, int] | None = None) -> dict[str, Any]:
    """The metadata an exported file carries: the test resize (shorter side ``min_size_test``, longer at
    most ``max_size_test``, applied before the graph), ``classes`` (label -> name) and, for a detector,
    ``categories`` (label -> COCO category id, for ``predictions.json``)."""
    metadata: dict[str, Any] = {"resdet.min_size_test": int(min_size_test), "resdet.max_size_test": int(max_size_test),
                                "resdet.classes": {str(k): v for k, v in classes.items()}}
    if categories is not None:
        metadata["resdet.categories"] = {str(k): int(v) for k, v in categories.items()}
    return metadata


class OnnxModel(nn.Module):
    """An exported file on an ONNX Runtime session, with the metadata it records. The subclasses are
    called like the PyTorch models they replace (``OnnxDetector`` like ``FasterRCNN`` in eval mode,
    ``OnnxSegmenter`` like ``SemanticSegmentor``), so the tools run either through the same code."""

    def __init__(self, path: str | Path, task: str | None = None, threads: int = 0):
        super().__init__()
        onnx = _import("onnx")
        ort = _import("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise UserError(f"ONNX model not found: {path}")
        try:
            proto = onnx.load(str(path), load_external_data=False)
            if not proto.graph.node:
                raise ValueError("the file holds no graph")
        except Exception as error:  # onnx raises DecodeError / ValueError / onnx's own errors
            raise UserError(f"{path} is not an ONNX model ({' '.join(str(error).split()) or type(error).__name__}); "
                            "give a file written by tools/export.py") from error
        self.path = path
        self.metadata = {p.key: p.value for p in proto.metadata_props}
        file_task = self.metadata.get("resdet.task")
        if file_task is None:
            raise UserError(f"{path} is an ONNX model without resdet metadata (resdet.task): export it with "
                            "tools/export.py")
        if task is not None and file_task != task:
            raise UserError(f"{path} is a {file_task} model but the config's task is {task}: give a {task} model "
                            "or the config it was exported from")
        self.task = file_task
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.classes = {int(k): v for k, v in json.loads(self.metadata.get("resdet.classes", "{}")).items()}
        self.min_size_test = int(self.metadata.get("resdet.min_size_test", 0))
        self.max_size_test = int(self.metadata.get("resdet.max_size_test", 0))

    def run(self, image: torch.Tensor, index: int = 0) -> dict[str, torch.Tensor]:
        """The graph's outputs for one ``uint8`` ``(3, H, W)`` image, by name."""
        if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[-2:]) == 0:
            raise UserError(f"image {index} of the batch has shape {tuple(image.shape)}: {self.path} takes RGB images "
                            "(3, H, W) with H, W >= 1")
        if image.dtype != torch.uint8:
            raise UserError(f"image {index} of the batch is {image.dtype}: {self.path} takes uint8 images (0..255)")
        values = self.session.run(None, {"image": image.cpu().contiguous().numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(self.outputs, values)}


class OnnxDetector(OnnxModel):
    """An exported detector, called as ``FasterRCNN`` in eval mode: ``(images, original_sizes=None)`` ->
    ``Detections``, per image ``{"boxes", "scores", "labels"}`` (a Mask R-CNN's also ``mask_probs``, pasted by
    ``paste_masks`` as the model it was exported from pastes them), boxes rescaled to ``original_sizes`` when
    given."""

    def __init__(self, path: str | Path, threads: int = 0):
        super().__init__(path, "detection", threads)
        self.has_masks = "mask_probs" in self.outputs
        self.mask_rules = self.metadata.get("resdet.mask_rules", "torchvision")
        self.categories = {int(k): int(v) for k, v in json.loads(self.metadata.get("resdet.categories", "{}")).items()}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def forward(self, images: Sequence[torch.Tensor], original_sizes: Sequence[tuple[int, int]] | None = None):
        detections = []
        for index, image in enumerate(images):
            found = self.run(image, index)
            if original_sizes is not None:
                found["boxes"] = rescale_boxes(found["boxes"], tuple(image.shape[-2:]), original_sizes[index])
            detections.append(found)
        return Detections.from_images(detections)

    def paste_masks(self, detections: Mapping[str, torch.Tensor], size: Sequence[int]) -> dict[str, torch.Tensor]:
        """As ``FasterRCNN.paste_masks``."""
        return {**detections, "masks": paste_masks(detections["mask_probs"], detections["boxes"], size, self.mask_rules)}


class OnnxSegmenter(OnnxModel):
    """An exported segmenter, called as ``SemanticSegmentor`` in eval mode: ``images`` -> per image logits
    ``(K, H, W)``. A file exported without logits gives the one-hot encoding of its class map instead
    (so that resizing and argmax downstream reproduce the class map, resized)."""

    def __init__(self, path: str | Path, threads: int = 0):
        super().__init__(path, "segmentation", threads)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def forward(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        results = []
        for index, image in enumerate(images):
            out = self.run(image, index)
            if "logits" in out:
                results.append(out["logits"])
            else:
                results.append(F.one_hot(out["classes"], self.num_classes).permute(2, 0, 1).float())
        return results


def is_onnx(weights: str | Path) -> bool:
    """Whether ``weights`` names an exported ONNX file (by its suffix), which runs on ONNX Runtime."""
    return isinstance(weights, Path | str) and str(weights).lower().endswith(".onnx")


def load_onnx(path: str | Path, task: str, threads: int = 0) -> OnnxModel:
    """``OnnxDetector`` or ``OnnxSegmenter`` for a file exported by ``export_onnx``; a ``UserError`` for a
    file that is not one or holds a model of another task."""
    return OnnxDetector(path, threads) if task == "detection" else OnnxSegmenter(path, threads)


def export_program(model: nn.Module, task: str, path: str | Path) -> Path:
    """``torch.export`` of the whole model, image to outputs, with the image's height and width symbolic,
    saved as an ``ExportedProgram`` (``torch.export.load``): the ``SegmenterGraph`` (image -> class map) or
    the ``DetectorGraph`` (image -> boxes, scores, labels). A detector's selections have sizes known before
    the data except NMS's output and the kept count, which ``torch.export`` carries as size symbols
    (``tasks/modeling/compiling.py``). Image sizes: ``_image_sizes``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if task not in ("segmentation", "detection"):
        raise UserError(f"cannot export a model of task {task!r}: detection or segmentation")
    with _exportable(model), torch.no_grad(), compile_settings():
        device = next(model.parameters()).device
        example = (torch.zeros((3, *EXAMPLE_SIZE), dtype=torch.uint8, device=device),)
        graph = SegmenterGraph(model) if task == "segmentation" else DetectorGraph(model)
        program = torch.export.export(graph, example, dynamic_shapes=_image_sizes(model, task))
    torch.export.save(program, str(path))
    return path


def _image_sizes(model: nn.Module, task: str) -> tuple[dict[int, Dim]]:
    """The image's height and width as ``torch.export`` symbols: from twice the coarsest stride up (smaller
    images would make maps of one pixel, a special case) to 4096 pixels."""
    coarsest = max(s.stride for s in model.backbone.output_shape().values())
    smallest = max(64, 2 * max(model.backbone.size_divisibility, 1), 2 * coarsest + 1)
    return ({1: Dim("height", min=smallest, max=4096), 2: Dim("width", min=smallest, max=4096)},)


def onnx_runner(model: nn.Module, config, mode: str, weights: str | Path | None = None) -> OnnxModel:
    """The ONNX Runtime side of ``tools/benchmark.py --compare onnxruntime``: ``weights`` (an exported
    file) or else ``model`` itself, exported to a temporary file (the same weights on both sides)."""
    if mode != "infer":
        raise UserError(f"--compare onnxruntime measures inference: use --mode infer, not --mode {mode}")
    if weights is not None:
        return load_onnx(weights, config.task)
    num_classes = model.num_classes
    first = 1 if config.task == "detection" else 0
    metadata = export_metadata(config.data.min_size_test, config.data.max_size_test,
                               {k: f"class {k}" for k in range(first, num_classes + first)})
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, config.task, Path(folder) / "model.onnx", metadata)
        return load_onnx(path, config.task)  # the session holds the graph; the file can go
