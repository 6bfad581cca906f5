"""Pretrained weights: load torchvision, timm, detectron2, MSRA (Caffe2) or this project's checkpoints into
a backbone, strictly.

The checkpoint's format is detected from its keys and mapped onto the backbone's names. Every tensor of
the backbone must be provided and every tensor of the checkpoint must be used; the only tensors set aside
are the ImageNet classifier and the stages the backbone was configured not to build, each reported.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from .errors import UserError, UserFileNotFoundError
from .fpn import FPN
from .resnet import ResNet
from .timm_backbone import TimmBackbone

logger = logging.getLogger(__name__)

_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.fc.", "head.", "fc1000_", "linear.")
_OPTIONAL_SUFFIX = "num_batches_tracked"  # present in some BatchNorm checkpoints, not in others


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: the detected format, how many tensors it loaded, what it set aside."""

    source: str
    format: str
    loaded: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> reason
    layout: str | None = None  # a self-supervised file's layout (SSL_LAYOUTS), or "prefix:<p>"

    def __str__(self) -> str:
        reasons: dict[str, int] = {}
        for reason in self.skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        extra = "; ".join(f"{n} {reason}" for reason, n in reasons.items())
        layout = f"{self.layout} layout, " if self.layout else ""
        return f"loaded {self.loaded} tensors from {self.source} ({layout}{self.format} format)" + (
            f"; set aside: {extra}" if extra else ""
        )


def map_by_rules(key: str, rules: list[tuple[str, str | Callable[[re.Match], str]]]) -> str | None:
    """``key`` renamed by the first rule whose pattern matches it (``re.sub`` with the rule's replacement,
    a template or a function of the match); None when no rule matches."""
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _stage(m: re.Match) -> str:
    """torchvision's ``layer<k>`` is this project's ``res<k+1>``."""
    return f"res{int(m[1]) + 1}.{m[2]}"


_TORCHVISION_RESNET_RULES = [
    (r"^conv1\.(.*)$", r"stem.conv.\1"),
    (r"^bn1\.(.*)$", r"stem.norm.\1"),
    (r"^layer(\d)\.(\d+)\.conv(\d)\.(.*)$", lambda m: f"{_stage(m)}.conv{m[3]}.{m[4]}"),
    (r"^layer(\d)\.(\d+)\.bn(\d)\.(.*)$", lambda m: f"{_stage(m)}.norm{m[3]}.{m[4]}"),
    (r"^layer(\d)\.(\d+)\.downsample\.0\.(.*)$", lambda m: f"{_stage(m)}.shortcut.conv.{m[3]}"),
    (r"^layer(\d)\.(\d+)\.downsample\.1\.(.*)$", lambda m: f"{_stage(m)}.shortcut.norm.{m[3]}"),
]
_DETECTRON2_RESNET_RULES = [
    (r"^stem\.conv1\.(weight|bias)$", r"stem.conv.\1"),
    (r"^stem\.conv1\.norm\.(.*)$", r"stem.norm.\1"),
    (r"^(res[2-5]\.\d+)\.conv(\d)\.(weight|bias)$", r"\1.conv\2.\3"),
    (r"^(res[2-5]\.\d+)\.conv(\d)\.norm\.(.*)$", r"\1.norm\2.\3"),
    (r"^(res[2-5]\.\d+)\.shortcut\.(weight|bias)$", r"\1.shortcut.conv.\2"),
    (r"^(res[2-5]\.\d+)\.shortcut\.norm\.(.*)$", r"\1.shortcut.norm.\2"),
]


def map_torchvision_resnet_key(key: str) -> str | None:
    """torchvision/timm ResNet key -> this project's ResNet key (None: not a ResNet backbone key)."""
    return map_by_rules(key, _TORCHVISION_RESNET_RULES)


def map_detectron2_resnet_key(key: str) -> str | None:
    """detectron2 ResNet key (``stem.conv1.weight``, ``res2.0.conv1.norm.weight``, ``res2.0.shortcut.weight``)
    -> this project's ResNet key (None: not a ResNet backbone key)."""
    return map_by_rules(key, _DETECTRON2_RESNET_RULES)


# Caffe2 blob suffixes of MSRA's ResNets: a conv's weight, and the affine (scale, bias) each BatchNorm was
# folded into (no running statistics are stored).
_CAFFE2_SUFFIXES = {"_w": "weight", "_b": "bias", "_bn_s": "norm.weight", "_bn_b": "norm.bias"}


def map_caffe2_resnet_key(key: str) -> str | None:
    """MSRA Caffe2 blob name (``conv1_w``, ``res_conv1_bn_s``, ``res2_0_branch2a_w``, ``res2_0_branch1_bn_b``)
    -> this project's ResNet key (None: not a ResNet backbone blob, e.g. ``fc1000_w``)."""
    for suffix in ("_bn_s", "_bn_b", "_w", "_b"):
        if key.endswith(suffix):
            stem, what = key[: -len(suffix)], _CAFFE2_SUFFIXES[suffix]
            break
    else:
        return None
    conv_or_norm = "conv" if what in ("weight", "bias") else "norm"
    param = what.rsplit(".", 1)[-1]
    if stem in ("conv1", "res_conv1"):
        return f"stem.{conv_or_norm}.{param}"
    if m := re.match(r"^res([2-5])_(\d+)_branch(1|2a|2b|2c)$", stem):
        if m[3] == "1":
            return f"res{m[1]}.{m[2]}.shortcut.{conv_or_norm}.{param}"
        index = {"2a": 1, "2b": 2, "2c": 3}[m[3]]
        return f"res{m[1]}.{m[2]}.{conv_or_norm}{index}.{param}"
    return None


_RESNET_KEY_MAPS: dict[str, Callable[[str], str | None]] = {
    "torchvision-resnet": map_torchvision_resnet_key,
    "detectron2-resnet": map_detectron2_resnet_key,
    "caffe2-resnet": map_caffe2_resnet_key,
}


def _map_timm_key(key: str, model: TimmBackbone) -> tuple[str | None, str | None]:
    """timm model key -> (TimmBackbone key, the feature net's module holding it). timm's feature nets
    flatten nested module names (``stages.0`` -> ``stages_0``)."""
    for flat in [*model.body._modules, *model.unbuilt_modules]:
        for prefix in (flat, flat.replace("_", ".")):
            if key.startswith(prefix + "."):
                return f"body.{flat}{key[len(prefix):]}", flat
    return None, None


# What a pickled weights file (detectron2's model zoo, MSRA's Caffe2 ResNets) may refer to: numpy arrays,
# their dtypes and scalars, and the byte-string helper of protocol-2 pickles. Dicts, lists, numbers and
# strings need no global. Anything else (a function, a class to call) is refused.
_SAFE_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dicts, lists, numbers and strings, and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a weights file has no reason to "
                                         "(only numpy arrays, dicts, lists, numbers and strings are read)")
        if module.startswith("numpy.core") and hasattr(np, "_core"):  # numpy >= 2 moved numpy.core
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def read_pickled_arrays(path: str | Path) -> object:
    """Unpickle ``path`` without executing code: only numpy arrays, dicts, lists, numbers and strings are
    built (Python 2 pickles, such as MSRA's Caffe2 ResNets, are read as latin-1)."""
    with open(path, "rb") as f:
        return _ArrayUnpickler(f, encoding="latin1").load()


def _read_file(path: str | Path) -> object:
    """What a checkpoint file holds, read without running code (see ``read_checkpoint``)."""
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if path.suffix == ".pkl":
            return read_pickled_arrays(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickled code, ...
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"cannot read weights file {path} ({type(error).__name__}: {reason}); it is not a "
                        "checkpoint this project reads safely (.pth/.pt/.bin state dicts, .safetensors, "
                        ".pkl of numpy arrays)") from error


def _state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint's object: the usual containers (``state_dict``, ``model``, ``blobs``)
    unwrapped, numpy arrays of a ``.pkl`` as tensors, a ``module.`` prefix left by DistributedDataParallel
    removed."""
    state = obj
    for container in ("state_dict", "model", "model_state", "blobs"):
        if isinstance(state, dict) and isinstance(state.get(container), dict):
            state = state[container]
    if path.suffix == ".pkl" and isinstance(state, dict):
        # (ascontiguousarray makes a 0-d array 1-d: the reshape keeps a BatchNorm's num_batches_tracked a scalar)
        state = {k: torch.from_numpy(np.ascontiguousarray(v).reshape(v.shape)) for k, v in state.items()
                 if isinstance(v, np.ndarray)}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt``/``.bin`` (loaded with ``weights_only=True``), ``.safetensors`` or
    ``.pkl`` file (numpy arrays, read by ``read_pickled_arrays``). None of them can run code.

    Unwraps the usual containers (``state_dict``, ``model``, ``blobs``) and a ``module.`` prefix left by
    DistributedDataParallel.
    """
    return _state_dict(_read_file(path), Path(path))


# Self-supervised checkpoints as the methods' official code saves them: the prefix of the backbone's tensors
# (after the containers and DDP's "module." are removed; a file of several models, as DINO's, names each one
# first: "teacher.", "student.") and what else they hold, set aside with these reasons
SSL_LAYOUTS: dict[str, tuple[str, dict[str, str]]] = {
    "moco": ("encoder_q.", {"encoder_q.fc.": "the projection head", "encoder_k.": "the momentum (key) encoder",
                            "queue": "the queue of keys"}),  # MoCo v1/v2 (facebookresearch/moco)
    "mocov3": ("base_encoder.", {"base_encoder.fc.": "the projection head", "base_encoder.head.": "the projection head",
                                 "momentum_encoder.": "the momentum encoder", "predictor.": "the predictor"}),
    "dino": ("teacher.backbone.", {"teacher.head.": "the teacher's projection head", "student.": "the student",
                                   "dino_loss.": "the loss's centre"}),  # DINO: the teacher, as its evaluations use
    "swav": ("", {"projection_head.": "the projection head", "prototypes.": "the prototypes"}),
}


def _flatten_models(obj: object) -> object:
    """A file of several models (``{"teacher": {...}, "student": {...}, "epoch": ..., ...}``) as one state dict
    whose keys name the model first (``teacher.backbone.conv1.weight``), each model's ``module.`` removed;
    anything else unchanged."""
    if not (isinstance(obj, dict) and "teacher" in obj and "student" in obj):
        return obj
    flat: dict[str, torch.Tensor] = {}
    for name, part in obj.items():
        if isinstance(part, dict) and part and all(isinstance(v, torch.Tensor) for v in part.values()):
            strip = "module." if all(k.startswith("module.") for k in part) else ""
            flat.update({f"{name}.{k[len(strip):]}": v for k, v in part.items()})
    return flat


def detect_ssl_layout(state: dict[str, torch.Tensor]) -> str | None:
    """The self-supervised layout of ``state`` (a key of ``SSL_LAYOUTS``), or None (a plain backbone)."""
    keys = list(state)
    if any(k.startswith("teacher.backbone.") for k in keys):
        return "dino"
    if any(k.startswith("encoder_q.") for k in keys):
        return "moco"
    if any(k.startswith("base_encoder.") for k in keys):
        return "mocov3"
    if any(k.startswith(("prototypes.", "projection_head.")) for k in keys):
        return "swav"
    return None


def read_backbone_checkpoint(path: str | Path, prefix: str | None = None
                             ) -> tuple[dict[str, torch.Tensor], str | None, dict[str, str]]:
    """A checkpoint's backbone tensors, from a plain backbone file or a self-supervised one (``SSL_LAYOUTS``,
    detected from the keys, or the tensors under ``prefix`` when given); returns them (prefix removed), the
    layout (``prefix:<p>`` for a given prefix, None for a plain file) and what was set aside (key → reason)."""
    path = Path(path)
    state = _state_dict(_flatten_models(_read_file(path)), path)
    layout = f"prefix:{prefix}" if prefix else detect_ssl_layout(state)
    if layout is None:
        return state, None, {}
    keep, reasons = (prefix, {}) if prefix else SSL_LAYOUTS[layout]
    kept, aside = {}, {}
    for key, tensor in state.items():
        reason = next((why for start, why in reasons.items() if key.startswith(start)), None)
        if reason is None and key.startswith(keep):
            kept[key[len(keep):]] = tensor
        else:
            aside[key] = reason or f"not under the backbone's prefix {keep!r}"
    if not kept:
        raise UserError(f"weights file {path}: no tensor under the prefix {keep!r} ({layout} layout; first keys: "
                        f"{sorted(state)[:5]}): set model.backbone.weights_prefix to where the backbone's tensors are")
    return kept, layout, aside


DETECTRON2_URL = "https://dl.fbaipublicfiles.com/detectron2/"
# detectron2's model zoo (its MODEL_ZOO.md): name -> path under DETECTRON2_URL
DETECTRON2_ZOO = {
    "COCO-Detection/faster_rcnn_R_50_C4_1x": "137257644/model_final_721ade.pkl",
    "COCO-Detection/faster_rcnn_R_50_DC5_1x": "137847829/model_final_51d356.pkl",
    "COCO-Detection/faster_rcnn_R_50_FPN_1x": "137257794/model_final_b275ba.pkl",
    "COCO-Detection/faster_rcnn_R_50_C4_3x": "137849393/model_final_f97cb7.pkl",
    "COCO-Detection/faster_rcnn_R_50_DC5_3x": "137849425/model_final_68d202.pkl",
    "COCO-Detection/faster_rcnn_R_50_FPN_3x": "137849458/model_final_280758.pkl",
    "COCO-Detection/faster_rcnn_R_101_C4_3x": "138204752/model_final_298dad.pkl",
    "COCO-Detection/faster_rcnn_R_101_DC5_3x": "138204841/model_final_3e0943.pkl",
    "COCO-Detection/faster_rcnn_R_101_FPN_3x": "137851257/model_final_f6e8b1.pkl",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x": "137259246/model_final_9243eb.pkl",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_DC5_1x": "137260150/model_final_4f86c3.pkl",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x": "137260431/model_final_a54504.pkl",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x": "137849525/model_final_4ce675.pkl",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_DC5_3x": "137849551/model_final_84107b.pkl",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x": "137849600/model_final_f10217.pkl",
    "COCO-InstanceSegmentation/mask_rcnn_R_101_C4_3x": "138363239/model_final_a2914c.pkl",
    "COCO-InstanceSegmentation/mask_rcnn_R_101_DC5_3x": "138363294/model_final_0464b7.pkl",
    "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x": "138205316/model_final_a3ec72.pkl",
}
# MSRA's original ImageNet ResNets (the paper's networks, Caffe2 blob names), as detectron2 hosts them
DETECTRON2_IMAGENET = ("ImageNetPretrained/MSRA/R-50.pkl", "ImageNetPretrained/MSRA/R-101.pkl")


def detectron2_url(name: str) -> str:
    """The download address of ``detectron2:<name>``: a model-zoo entry or an ImageNet backbone."""
    if name in DETECTRON2_ZOO:
        return f"{DETECTRON2_URL}{name}/{DETECTRON2_ZOO[name]}"
    if name in DETECTRON2_IMAGENET:
        return f"{DETECTRON2_URL}{name}"
    known = ", ".join([*DETECTRON2_ZOO, *DETECTRON2_IMAGENET])
    raise UserError(f"unknown detectron2 weights {name!r}; known: {known}")


def detectron2_cache_path(name: str) -> Path:
    """Where ``detectron2:<name>`` is kept once downloaded: beside torchvision's weights (``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / "detectron2" / detectron2_url(name)[len(DETECTRON2_URL):]


def fetch_detectron2_file(name: str) -> Path:
    """The cached file of ``detectron2:<name>``, downloaded first if absent. Offline, the error names the
    address and the cache path to put the file at."""
    url, path = detectron2_url(name), detectron2_cache_path(name)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            torch.hub.download_url_to_file(url, str(partial), progress=False)
        except Exception as error:
            partial.unlink(missing_ok=True)
            raise UserError(
                f"could not fetch detectron2:{name} ({type(error).__name__}: {error}). Without network access, "
                f"download {url} elsewhere and put it at {path}, or give the file's path as the weights"
            ) from error
        partial.replace(path)
    return path


def fetch_named_weights(source: str) -> dict[str, torch.Tensor]:
    """``torchvision:<arch>.<WEIGHTS>`` or ``timm:<model>.<tag>`` through those libraries' own download
    and cache; ``detectron2:<zoo name>`` (e.g. ``detectron2:COCO-Detection/faster_rcnn_R_101_C4_3x`` or
    ``detectron2:ImageNetPretrained/MSRA/R-50.pkl``) from detectron2's model zoo into torch's cache.
    Offline, a missing file is an error that says which file to put where."""
    library, _, name = source.partition(":")
    if library == "detectron2":
        return read_checkpoint(fetch_detectron2_file(name))
    if library == "torchvision":
        arch, _, tag = name.partition(".")
        try:
            weights = torchvision.models.get_model_weights(arch)[tag or "DEFAULT"]
        except (ValueError, KeyError) as error:
            raise UserError(f"unknown torchvision weights {source!r}: {error}") from error
        filename = weights.url.rsplit("/", 1)[-1]
        try:
            return weights.get_state_dict(progress=False)
        except Exception as error:
            cache = Path(torch.hub.get_dir()) / "checkpoints"
            raise UserError(
                f"could not fetch {source} ({error}). Without network access, download {weights.url} "
                f"elsewhere and put it at {cache / filename}, or give the file's path as the weights"
            ) from error
    if library == "timm":
        import timm  # noqa: PLC0415  slow to import, and only timm weights need it

        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except Exception:
            cfg = None
        if cfg is None:
            raise UserError(f"timm has no pretrained weights named {name!r}")
        try:
            return timm.create_model(name, pretrained=True).state_dict()
        except Exception as error:
            where = f"the Hugging Face Hub repository {cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
            raise UserError(
                f"could not fetch {source} ({type(error).__name__}: {error}). Without network access, "
                f"download model.safetensors from {where} elsewhere and give that file's path as the weights "
                "(HF_HUB_OFFLINE=1 skips the download retries)"
            ) from error
    raise UserError(
        f"unknown weights source {source!r}: give a file path, 'torchvision:<arch>.<WEIGHTS>', "
        "'timm:<model>.<tag>' or 'detectron2:<model zoo name>'"
    )


def is_weights_name(source: str | Path) -> bool:
    """Whether ``source`` names weights (``library:name``) rather than a file."""
    source = str(source)
    return re.match(r"^[A-Za-z]\w+:", source) is not None and not Path(source).exists()


def detect_format(state: dict[str, torch.Tensor], model: nn.Module) -> str:
    """``native`` (this project's names), ``classifier`` (a classification run of this project: its
    ``backbone.*`` tensors are the backbone's), ``torchvision-resnet`` (torchvision's and timm's ResNet names),
    ``detectron2-resnet`` (detectron2's ResNet names), ``caffe2-resnet`` (MSRA's original Caffe2 blob
    names) or ``timm`` (a timm model's own names, for a TimmBackbone)."""
    own = set(model.state_dict())
    keys = set(state)
    if len(keys & own) >= 0.5 * len(keys):
        return "native"
    if "fc.weight" in keys and any(k.startswith("backbone.") for k in keys):
        return "classifier"  # this project's classification checkpoint: backbone.* + the fc head
    if isinstance(model, TimmBackbone):
        return "timm"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision-resnet"
    if "stem.conv1.weight" in keys and any(k.startswith("res2.") for k in keys):
        return "detectron2-resnet"
    if "conv1_w" in keys and any(k.startswith("res2_0_") for k in keys):
        return "caffe2-resnet"
    if any(k.startswith("conv1.0.") for k in keys):
        raise UserError("these weights have a deep 3-conv stem (timm's resnet*d/resnet*c): build the backbone "
                         "with name: timm and the matching model name instead of name: resnet")
    raise UserError(f"unrecognized checkpoint format (first keys: {sorted(keys)[:5]})")


def _check_resnet_layout(model: ResNet, source: str, stride_in_1x1: bool) -> None:
    """torchvision's, timm's and MSRA's ResNets: ImageNet family, post-activation, BatchNorm, a
    bottleneck's stride in the 3x3 conv (torchvision, timm) or in the first 1x1 conv (MSRA). Refuse a
    config that disagrees."""
    problems = []
    if model.block == "bottleneck" and model.stride_in_1x1 != stride_in_1x1:
        where = "first 1x1" if stride_in_1x1 else "3x3"
        problems.append(f"they put a bottleneck's stride in the {where} conv: set stride_in_1x1: "
                        f"{str(stride_in_1x1).lower()}")
    if model.norm == "GN":
        problems.append("they come from a BatchNorm network: use norm BN, FrozenBN or SyncBN, not GN")
    if model.preact:
        problems.append("they are post-activation: set preact: false")
    if model.family != "imagenet":
        problems.append("they are an ImageNet network: set family: imagenet")
    if problems:
        raise UserError(f"weights {source} do not fit ResNet-{model.depth} as configured: " + "; ".join(problems))


def load_pretrained(model: nn.Module, source: str | Path, prefix: str | None = None) -> LoadReport:
    """Load weights into a ResNet, FPN or TimmBackbone.

    ``source`` is a checkpoint file (a torchvision, timm, detectron2 or MSRA Caffe2 ResNet, a timm model
    for a TimmBackbone, or this project's own; ``.pth``, ``.safetensors`` or ``.pkl``) or a name
    ``torchvision:resnet101.IMAGENET1K_V2`` / ``timm:resnet50.a1_in1k`` /
    ``detectron2:ImageNetPretrained/MSRA/R-50.pkl``, or a classification run's ``model.safetensors`` (its
    backbone part). A file saved by a self-supervised method's own code (MoCo v1/v2/v3, DINO, SwAV:
    ``SSL_LAYOUTS``) gives its backbone, detected from its keys; ``prefix`` (``model.backbone.weights_prefix``)
    takes the tensors under it instead. A foreign ResNet checkpoint (or a classifier) given to an FPN loads
    into its bottom-up backbone. What is set aside (projection heads, momentum encoders, queues, ``fc``) is
    in the report and the log; anything missing, unexpected or mis-shaped is an error listing it.
    """
    source = str(source)
    if is_weights_name(source):
        state, layout, aside = fetch_named_weights(source), None, {}
    else:
        state, layout, aside = read_backbone_checkpoint(source, prefix)
    fmt = detect_format(state, model)
    target = model.bottom_up if isinstance(model, FPN) and fmt != "native" else model
    return load_pretrained_state(target, state, source, fmt, set_aside=aside, layout=layout)


def load_pretrained_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, fmt: str,
                          set_aside: dict[str, str] | None = None, layout: str | None = None) -> LoadReport:
    """Map ``state`` (in format ``fmt``) onto ``model`` and load it strictly; see ``load_pretrained``.
    ``set_aside``: tensors of the file already left out, with the reason (reported with the others);
    ``layout``: the self-supervised layout they came from (in the report)."""
    report = LoadReport(source, fmt, layout=layout, skipped=dict(set_aside or {}))
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        if fmt != "native" and key.startswith(_CLASSIFIER_PREFIXES):
            report.skipped[key] = "classifier tensors (not part of a backbone)"
            continue
        if fmt == "native":
            new_key, module = key, key.split(".")[0]
        elif fmt == "classifier":
            if not key.startswith("backbone."):
                report.skipped[key] = "classifier tensors (not part of a backbone)"
                continue
            new_key = key[len("backbone."):]
            module = new_key.split(".")[0]
        elif fmt == "timm":
            new_key, module = _map_timm_key(key, model)
        elif fmt in _RESNET_KEY_MAPS and isinstance(model, ResNet):
            new_key = _RESNET_KEY_MAPS[fmt](key)
            module = new_key.split(".")[0] if new_key else None
        else:
            raise UserError(f"{fmt} weights from {source} cannot be loaded into a {type(model).__name__}")
        if new_key in own:
            mapped[new_key] = tensor
        elif module is not None and module in getattr(model, "unbuilt_modules", ()):
            report.skipped[key] = "tensors of stages not built (out_features)"
        elif not key.endswith(_OPTIONAL_SUFFIX):
            unexpected.append(key)

    if isinstance(model, ResNet) and fmt in ("torchvision-resnet", "caffe2-resnet"):
        _check_resnet_layout(model, source, stride_in_1x1=fmt == "caffe2-resnet")
    if fmt == "caffe2-resnet":
        unexpected = [k for k in unexpected if not k.endswith("_momentum")]  # optimizer state of Caffe2 runs
        mapped = with_identity_statistics(model, mapped)
    report.loaded = strict_load(model, mapped, source, fmt, unexpected)
    logger.info("%s", report)
    return report


def with_identity_statistics(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """``state`` plus, for every BatchNorm of ``model`` (under ``prefix``) whose scale and bias it holds but
    not its statistics, a running mean of 0 and a running variance of ``1 - eps``: the norm is then exactly
    the affine ``x * scale + bias`` that Caffe2 networks store in place of a BatchNorm."""
    state = dict(state)
    for name, module in model.named_modules():
        key = f"{prefix}{name}."
        if hasattr(module, "running_var") and hasattr(module, "eps") and f"{key}weight" in state:
            state.setdefault(f"{key}running_mean", torch.zeros_like(state[f"{key}weight"]))
            state.setdefault(f"{key}running_var", torch.full_like(state[f"{key}weight"], 1 - module.eps))
    return state


def remap_keys(state: dict[str, torch.Tensor], mapping: Callable[[str], str | None]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` under the names ``mapping`` gives, and the keys it could not place (BatchNorm's optional
    ``num_batches_tracked`` aside)."""
    mapped, unplaced = {}, []
    for key, tensor in state.items():
        new_key = mapping(key)
        if new_key is not None:
            mapped[new_key] = tensor
        elif not key.endswith(_OPTIONAL_SUFFIX):
            unplaced.append(key)
    return mapped, unplaced


def keep_new_heads(model: nn.Module, state: dict[str, torch.Tensor], keys: Sequence[str]) -> None:
    """Fine-tuning on another class count: each of ``keys`` (a head's tensors) whose shape in ``state``
    differs from the model's is replaced in ``state`` by the model's own, initialised tensor, and logged;
    everything else is left to load strictly."""
    own = model.state_dict()
    for key in keys:
        if key in state and state[key].shape != own[key].shape:
            logger.info("left initialised: %s (checkpoint %s, model %s)", key, tuple(state[key].shape), tuple(own[key].shape))
            state[key] = own[key]


def strict_load(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, fmt: str, unexpected: list[str] = (), hint: str = ""
) -> int:
    """Load ``state`` (already in ``model``'s names) into ``model`` if it provides every tensor with the
    right shape and ``unexpected`` (checkpoint keys that could not be placed) is empty; otherwise raise
    listing what is missing, unexpected and mis-shaped. BatchNorm's ``num_batches_tracked`` is optional
    on both sides. Returns the number of tensors loaded."""
    own = model.state_dict()
    unexpected = list(unexpected) + [k for k in state if k not in own and not k.endswith(_OPTIONAL_SUFFIX)]
    missing = [k for k in own if k not in state and not k.endswith(_OPTIONAL_SUFFIX)]
    mis_shaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mis_shaped:
        def listing(title: str, items: list[str]) -> list[str]:
            shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
            return [f"{title} ({len(items)}): {shown}"] if items else []

        parts = (listing("missing from the checkpoint", missing) + listing("unexpected in the checkpoint", unexpected)
                 + listing("shape mismatch", mis_shaped) + ([hint] if hint and mis_shaped else []))
        raise UserError(f"weights {source} ({fmt} format) do not match {type(model).__name__}: " + "; ".join(parts))
    loadable = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(loadable, strict=False)
    return len(loadable)
