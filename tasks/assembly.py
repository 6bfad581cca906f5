"""Steps every task model builder shares: merging a config section over its defaults, and building the
backbone with the keys the head layout decides."""

from __future__ import annotations

import copy
from typing import Any, Mapping

from backbones import Backbone, build_backbone
from backbones.build import check_keys


def merged(defaults: Mapping[str, Any], given: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """``given`` over ``defaults``; a key ``defaults`` does not have is an error naming it (``where.key``)."""
    given = dict(given or {})
    check_keys(given, tuple(defaults), where)
    return {**defaults, **given}


def layout_backbone(config: Mapping[str, Any], layout: str, where: str = "model.backbone", **decided: Any) -> Backbone:
    """Build the backbone ``config`` describes, with the keys in ``decided`` (e.g. ``out_features``)
    set by the head ``layout``; a config that sets one of them itself is an error."""
    backbone_cfg = copy.deepcopy(dict(config))
    clash = [k for k in decided if k in backbone_cfg]
    if clash:
        raise ValueError(f"{where}.{clash[0]} follows from model.layout ({layout}); remove it from the config")
    return build_backbone({**backbone_cfg, **decided}, where=where)
