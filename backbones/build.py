"""Build any backbone from plain data (what a YAML config holds)."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Mapping

from .base import Backbone
from .fpn import FPN
from .resnet import ResNet
from .timm_backbone import TimmBackbone
from .weights import load_pretrained

# name -> (builder taking the remaining keys, the keys it accepts besides `name` and `weights`)
_RESNET_KEYS = (
    "depth", "out_features", "stride_in_1x1", "shortcut", "residual", "preact", "norm", "freeze_at",
    "zero_init_residual", "output_stride", "family", "in_channels", "fold_frozen_bn",
)
_TIMM_KEYS = ("model", "out_features", "output_stride", "norm", "freeze_at", "in_channels")
_FPN_KEYS = ("bottom_up", "in_features", "out_channels", "top_block")


def _build_fpn(bottom_up: Mapping[str, Any] | None = None, **kwargs: Any) -> FPN:
    if bottom_up is None:
        raise ValueError("backbone 'fpn' needs a 'bottom_up' backbone config")
    return FPN(build_backbone(bottom_up, where="bottom_up"), **kwargs)


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
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise KeyError(f"unknown key {where}.{key}{hint} (valid keys: {', '.join(allowed)})")


def build_backbone(config: Mapping[str, Any], where: str = "backbone") -> Backbone:
    """Build a backbone from a dict such as
    ``{"name": "resnet", "depth": 50, "stride_in_1x1": False, "out_features": ["res2", "res3", "res4", "res5"]}``.

    ``name`` is ``resnet`` (keys: the arguments of ``ResNet``), ``timm`` (``model`` and the arguments of
    ``TimmBackbone``) or ``fpn`` (``bottom_up``: another backbone config, plus the arguments of ``FPN``).
    ``weights`` (any backbone) is a file or a ``torchvision:``/``timm:`` name given to ``load_pretrained``;
    ``weights: torchvision`` means torchvision's ImageNet weights of the configured ResNet depth.
    An unknown key or value is an error that names it.
    """
    config = dict(config)
    name = config.pop("name", None)
    if name not in _BUILDERS:
        raise ValueError(f"{where}.name must be one of {', '.join(_BUILDERS)}, got {name!r}")
    weights = config.pop("weights", None)
    builder, allowed = _BUILDERS[name]
    check_keys(config, allowed + ("name", "weights"), where)
    try:
        backbone = builder(**config)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where} ({name}): {error}") from error
    if weights == "torchvision":  # ImageNet weights matching the configured depth: depth stays one key
        if name != "resnet":
            raise ValueError(f"{where}.weights: 'torchvision' names ImageNet weights of a resnet backbone; "
                             "use timm:<model>.<tag> or a file for timm backbones")
        weights = f"torchvision:resnet{config.get('depth', 50)}.IMAGENET1K_V1"
    if weights:
        load_pretrained(backbone, weights)
    return backbone
