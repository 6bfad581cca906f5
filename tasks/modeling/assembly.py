"""Steps every task model builder shares: merging a config section over its defaults (keys and value
types checked), and resolving and building the backbone with the keys the head layout decides."""

from __future__ import annotations

import copy
from typing import Any, Mapping

from backbones import Backbone, build_backbone
from backbones.build import check_keys, resolve_backbone_config
from backbones.errors import UserError


def _type_name(default: Any) -> str | None:
    """What a value replacing ``default`` must be (None: anything)."""
    if default is None:
        return None
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, (int, float)):
        return "a number" if isinstance(default, float) else "an integer"
    if isinstance(default, str):
        return "a string"
    if isinstance(default, (list, tuple)):
        return "a list"
    if isinstance(default, Mapping):
        return "a mapping of keys"
    return None


def _fits(value: Any, default: Any) -> bool:
    if default is None or value is None and isinstance(default, Mapping):
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(default, Mapping):
        return isinstance(value, Mapping)
    return True


def merged(defaults: Mapping[str, Any], given: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """``given`` over ``defaults``. A key ``defaults`` does not have, or a value of another type than the
    default's (an integer where a number is expected is fine), is a ``UserError`` naming ``where.key``."""
    if given is not None and not isinstance(given, Mapping):
        raise UserError(f"{where} must be a mapping of keys, got {given!r}")
    given = dict(given or {})
    check_keys(given, tuple(defaults), where)
    for key, value in given.items():
        if not _fits(value, defaults[key]):
            raise UserError(f"{where}.{key} must be {_type_name(defaults[key])} (default: {defaults[key]!r}), "
                            f"got {value!r}")
    return {**copy.deepcopy(dict(defaults)), **given}


def resolve_layout_backbone(config: Mapping[str, Any], layout: str, decided: tuple[str, ...],
                            where: str = "model.backbone") -> dict[str, Any]:
    """The backbone section with every builder default filled in, less the keys in ``decided`` (set by
    the head ``layout``); a config that sets one of those itself is an error."""
    if not isinstance(config, Mapping):
        raise UserError(f"{where} must be a mapping of keys (name: resnet, depth: ...), got {config!r}")
    clash = [k for k in decided if k in config]
    if clash:
        raise UserError(f"{where}.{clash[0]} follows from model.layout ({layout}); remove it from the config")
    return resolve_backbone_config(config, where, decided)


def layout_backbone(config: Mapping[str, Any], layout: str, where: str = "model.backbone", init_weights: bool = True,
                    **decided: Any) -> Backbone:
    """Build the backbone ``config`` describes, with the keys in ``decided`` (e.g. ``out_features``)
    set by the head ``layout``; ``init_weights=False`` skips its initialisation weights."""
    backbone_cfg = resolve_layout_backbone(config, layout, tuple(decided), where)
    return build_backbone({**backbone_cfg, **decided}, where=where, init_weights=init_weights)
