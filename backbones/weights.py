"""Pretrained weights: load torchvision, timm or this project's checkpoints into a backbone, strictly.

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
from typing import Callable

import numpy as np
import torch
from torch import nn

from .errors import UserError, UserFileNotFoundError
from .fpn import FPN
from .resnet import ResNet
from .timm_backbone import TimmBackbone

logger = logging.getLogger(__name__)

_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.fc.", "head.")
_OPTIONAL_SUFFIX = "num_batches_tracked"  # present in some BatchNorm checkpoints, not in others


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: the detected format, how many tensors it loaded, what it set aside."""

    source: str
    format: str
    loaded: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> reason

    def __str__(self) -> str:
        reasons: dict[str, int] = {}
        for reason in self.skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        extra = "; ".join(f"{n} {reason}" for reason, n in reasons.items())
        return f"loaded {self.loaded} tensors from {self.source} ({self.format} format)" + (
            f"; set aside: {extra}" if extra else ""
        )


def map_torchvision_resnet_key(key: str) -> str | None:
    """torchvision/timm ResNet key -> this project's ResNet key (None: not a ResNet backbone key)."""
    if m := re.match(r"^conv1\.(.*)$", key):
        return f"stem.conv.{m[1]}"
    if m := re.match(r"^bn1\.(.*)$", key):
        return f"stem.norm.{m[1]}"
    if m := re.match(r"^layer(\d)\.(\d+)\.conv(\d)\.(.*)$", key):
        return f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.{m[4]}"
    if m := re.match(r"^layer(\d)\.(\d+)\.bn(\d)\.(.*)$", key):
        return f"res{int(m[1]) + 1}.{m[2]}.norm{m[3]}.{m[4]}"
    if m := re.match(r"^layer(\d)\.(\d+)\.downsample\.([01])\.(.*)$", key):
        return f"res{int(m[1]) + 1}.{m[2]}.shortcut.{'conv' if m[3] == '0' else 'norm'}.{m[4]}"
    return None


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


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt``/``.bin`` (loaded with ``weights_only=True``), ``.safetensors`` or
    ``.pkl`` file (numpy arrays, read by ``read_pickled_arrays``). None of them can run code.

    Unwraps the usual containers (``state_dict``, ``model``, ``blobs``) and a ``module.`` prefix left by
    DistributedDataParallel.
    """
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix == ".pkl":
            state = read_pickled_arrays(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickled code, ...
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"cannot read weights file {path} ({type(error).__name__}: {reason}); it is not a "
                        "checkpoint this project reads safely (.pth/.pt/.bin state dicts, .safetensors, "
                        ".pkl of numpy arrays)") from error
    for container in ("state_dict", "model", "model_state", "blobs"):
        if isinstance(state, dict) and isinstance(state.get(container), dict):
            state = state[container]
    if path.suffix == ".pkl" and isinstance(state, dict):
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items() if isinstance(v, np.ndarray)}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def fetch_named_weights(source: str) -> dict[str, torch.Tensor]:
    """``torchvision:<arch>.<WEIGHTS>`` or ``timm:<model>.<tag>`` through those libraries' own download
    and cache. Offline, a missing file is an error that says which file to put where."""
    library, _, name = source.partition(":")
    if library == "torchvision":
        import torchvision

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
        import timm

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
        f"unknown weights source {source!r}: give a file path, 'torchvision:<arch>.<WEIGHTS>' or "
        "'timm:<model>.<tag>'"
    )


def detect_format(state: dict[str, torch.Tensor], model: nn.Module) -> str:
    """``native`` (this project's names), ``torchvision-resnet`` (torchvision's and timm's ResNet names)
    or ``timm`` (a timm model's own names, for a TimmBackbone)."""
    own = set(model.state_dict())
    keys = set(state)
    if len(keys & own) >= 0.5 * len(keys):
        return "native"
    if isinstance(model, TimmBackbone):
        return "timm"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision-resnet"
    if any(k.startswith("conv1.0.") for k in keys):
        raise UserError("these weights have a deep 3-conv stem (timm's resnet*d/resnet*c): build the backbone "
                         "with name: timm and the matching model name instead of name: resnet")
    raise UserError(f"unrecognized checkpoint format (first keys: {sorted(keys)[:5]})")


def _check_resnet_layout(model: ResNet, source: str) -> None:
    """torchvision and timm ResNets: ImageNet family, post-activation, BatchNorm statistics, stride in
    the 3x3 conv. Refuse a config that disagrees."""
    problems = []
    if model.block == "bottleneck" and model.stride_in_1x1:
        problems.append("they put a bottleneck's stride in the 3x3 conv: set stride_in_1x1: false")
    if model.norm == "GN":
        problems.append("they come from a BatchNorm network: use norm BN, FrozenBN or SyncBN, not GN")
    if model.preact:
        problems.append("they are post-activation: set preact: false")
    if model.family != "imagenet":
        problems.append("they are an ImageNet network: set family: imagenet")
    if problems:
        raise UserError(f"weights {source} do not fit ResNet-{model.depth} as configured: " + "; ".join(problems))


def load_pretrained(model: nn.Module, source: str | Path) -> LoadReport:
    """Load weights into a ResNet, FPN or TimmBackbone.

    ``source`` is a checkpoint file (torchvision or timm ResNet, timm model for a TimmBackbone, or this
    project's own, ``.pth`` or ``.safetensors``) or a name ``torchvision:resnet101.IMAGENET1K_V2`` /
    ``timm:resnet50.a1_in1k``. A torchvision/timm checkpoint given to an FPN loads into its bottom-up
    backbone. Raises listing every missing, unexpected or mis-shaped tensor.
    """
    source = str(source)
    is_named = re.match(r"^[A-Za-z]\w+:", source) is not None and not Path(source).exists()
    state = fetch_named_weights(source) if is_named else read_checkpoint(source)
    fmt = detect_format(state, model)
    if isinstance(model, FPN) and fmt != "native":
        return load_pretrained_state(model.bottom_up, state, source, fmt)
    return load_pretrained_state(model, state, source, fmt)


def load_pretrained_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, fmt: str) -> LoadReport:
    """Map ``state`` (in format ``fmt``) onto ``model`` and load it strictly; see ``load_pretrained``."""
    report = LoadReport(source, fmt)
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        if fmt != "native" and key.startswith(_CLASSIFIER_PREFIXES):
            report.skipped[key] = "classifier tensors (not part of a backbone)"
            continue
        if fmt == "native":
            new_key, module = key, key.split(".")[0]
        elif fmt == "timm":
            new_key, module = _map_timm_key(key, model)
        elif fmt == "torchvision-resnet" and isinstance(model, ResNet):
            new_key = map_torchvision_resnet_key(key)
            module = new_key.split(".")[0] if new_key else None
        else:
            raise UserError(f"{fmt} weights from {source} cannot be loaded into a {type(model).__name__}")
        if new_key in own:
            mapped[new_key] = tensor
        elif module is not None and module in getattr(model, "unbuilt_modules", ()):
            report.skipped[key] = "tensors of stages not built (out_features)"
        elif not key.endswith(_OPTIONAL_SUFFIX):
            unexpected.append(key)

    if isinstance(model, ResNet) and fmt == "torchvision-resnet":
        _check_resnet_layout(model, source)
    report.loaded = strict_load(model, mapped, source, fmt, unexpected)
    logger.info("%s", report)
    return report


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
