"""Build any backbone from plain data (what a YAML config holds)."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Mapping

from .base import Backbone
from .errors import UserError
from .fpn import FPN
from .resnet import ResNet
from .timm_backbone import TimmBackbone
from .weights import load_pretrained

WEIGHT_KEYS = ("name", "weights", "weights_prefix")  # keys of every backbone config, not its builder's
# name -> (builder taking the remaining keys, the keys it accepts besides WEIGHT_KEYS)
_RESNET_KEYS = (
    "depth", "out_features", "stride_in_1x1", "shortcut", "shortcut_a_padding", "residual", "preact", "norm", "freeze_at",
    "zero_init_residual", "output_stride", "family", "in_channels", "fold_frozen_bn", "dilate_first_block",
    "width_per_group", "res2_out_channels",
)
_TIMM_KEYS = ("model", "out_features", "output_stride", "norm", "freeze_at", "in_channels")
_FPN_KEYS = ("bottom_up", "in_features", "out_channels", "top_block", "norm")


def _build_fpn(bottom_up: Mapping[str, Any] | None = None, *, where: str = "backbone", init_weights: bool = True,
               **kwargs: Any) -> FPN:
    if bottom_up is None:
        raise UserError(f"{where}: backbone 'fpn' needs a 'bottom_up' backbone config")
    return FPN(build_backbone(bottom_up, where=f"{where}.bottom_up", init_weights=init_weights), **kwargs)


_BUILDERS: dict[str, tuple[Callable[..., Backbone], tuple[str, ...]]] = {
    "resnet": (ResNet, _RESNET_KEYS),
    "timm": (TimmBackbone, _TIMM_KEYS),
    "fpn": (_build_fpn, _FPN_KEYS),
}


def check_keys(config: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Raise naming every key of ``config`` not in ``allowed``, with the closest valid keys."""
    for key in config:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(f'{where}.{c}') for c in close)}?" if close else ""
            raise UserError(f"unknown key {where}.{key}{hint} (valid keys: {', '.join(allowed)})")


def _builder(config: Mapping[str, Any], where: str) -> tuple[str, Callable[..., Backbone], tuple[str, ...]]:
    """The backbone's name, builder and accepted keys; unknown names and keys are errors naming them."""
    name = config.get("name")
    if name not in _BUILDERS:
        raise UserError(f"{where}.name must be one of {', '.join(_BUILDERS)}, got {name!r}")
    builder, allowed = _BUILDERS[name]
    check_keys({k: v for k, v in config.items() if k not in WEIGHT_KEYS}, allowed, where)
    return name, builder, allowed


def resolve_backbone_config(config: Mapping[str, Any], where: str = "backbone",
                            decided: tuple[str, ...] = ()) -> dict[str, Any]:
    """``config`` with every key its builder accepts filled in with the builder's default, so that a run
    folder's config holds every value the backbone was built with (and rebuilds the same network when
    defaults change). Keys in ``decided`` (set by the head layout, e.g. ``out_features``) are left out;
    ``weights`` is kept as given (``None`` when absent). Unknown keys are an error naming them."""
    name, builder, allowed = _builder(config, where)
    signature = inspect.signature(FPN.__init__ if name == "fpn" else builder.__init__)
    defaults = {p.name: p.default for p in signature.parameters.values() if p.default is not inspect.Parameter.empty}
    resolved: dict[str, Any] = {"name": name}
    for key in allowed:
        if key in decided or (key not in config and key not in defaults):
            continue
        value = config.get(key, defaults.get(key))
        if key == "bottom_up" and value is not None:
            value = resolve_backbone_config(value, f"{where}.bottom_up")
        resolved[key] = list(value) if isinstance(value, tuple) else value
    resolved["weights"] = config.get("weights")
    if config.get("weights_prefix"):
        resolved["weights_prefix"] = config["weights_prefix"]
    return resolved


def build_backbone(config: Mapping[str, Any], where: str = "backbone", init_weights: bool = True) -> Backbone:
    """Build a backbone from a dict such as
    ``{"name": "resnet", "depth": 50, "stride_in_1x1": False, "out_features": ["res2", "res3", "res4", "res5"]}``.

    ``name`` is ``resnet`` (keys: the arguments of ``ResNet``), ``timm`` (``model`` and the arguments of
    ``TimmBackbone``) or ``fpn`` (``bottom_up``: another backbone config, plus the arguments of ``FPN``).
    ``weights`` (any backbone) is a file or a ``torchvision:``/``timm:`` name given to ``load_pretrained``;
    ``weights: torchvision`` means torchvision's ImageNet weights of the configured ResNet depth (its
    Wide ResNet-50-2/101-2 for ``width_per_group: 128``). A self-supervised method's checkpoint (MoCo v1/v2/v3,
    DINO, SwAV) gives its backbone by itself; ``weights_prefix`` names where the backbone's tensors are in any
    other file (e.g. ``online_network.encoder.``).
    ``init_weights=False`` builds the same network without reading or fetching its ``weights`` (for a
    caller that loads a full checkpoint next). An unknown key or value is a ``UserError`` naming it.
    """
    name, builder, _ = _builder(config, where)
    kwargs = {k: v for k, v in config.items() if k not in WEIGHT_KEYS}
    if name == "fpn":
        kwargs.update(where=where, init_weights=init_weights)
    try:
        backbone = builder(**kwargs)
    except UserError:
        raise
    except (ValueError, TypeError) as error:
        raise UserError(f"{where} ({name}): {error}") from error
    weights = config.get("weights")
    if weights == "torchvision":  # ImageNet weights matching the configured depth: depth stays one key
        if name != "resnet":
            raise UserError(f"{where}.weights: 'torchvision' names ImageNet weights of a resnet backbone; "
                            "use timm:<model>.<tag> or a file for timm backbones")
        depth, width = config.get("depth", 50), config.get("width_per_group", 64)
        arch = f"wide_resnet{depth}_2" if width == 128 else f"resnet{depth}"
        weights = f"torchvision:{arch}.IMAGENET1K_V1"
    if config.get("weights_prefix") and not weights:
        raise UserError(f"{where}.weights_prefix is given without {where}.weights")
    if weights and init_weights:
        load_pretrained(backbone, weights, prefix=config.get("weights_prefix"))
    return backbone
