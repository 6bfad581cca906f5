"""Parameter and multiply-add counts of backbones, and the table of standard variants in the README."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .base import Backbone
from .build import build_backbone


@dataclass
class BackboneSummary:
    name: str
    params: int  # backbone only
    params_with_fc: int  # plus a global-pool + fc classifier on the last map (how the paper counts)
    gmacs_with_fc: float  # multiply-adds (the paper's "FLOPs") for one image of input_size, with the fc
    input_size: int
    outputs: dict[str, tuple[int, int, tuple[int, int]]]  # name -> (channels, stride, (H, W) at input_size)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summarize(
    config: Mapping[str, Any], name: str = "", input_size: int = 224, num_classes: int = 1000
) -> BackboneSummary:
    """Build ``config`` on the meta device (no memory, no compute) and count parameters and multiply-adds
    of one forward pass, adding the classifier the paper counts (global average pool + fc)."""
    with torch.device("meta"):
        backbone: Backbone = build_backbone(config)
        last = list(backbone.output_shape().values())[-1]
        fc = nn.Linear(last.channels, num_classes)
        images = torch.empty(1, 3, input_size, input_size)
        with FlopCounterMode(display=False) as counter:
            features = backbone(images)
            fc(list(features.values())[-1].mean((2, 3)))
    shapes = backbone.output_shape()
    return BackboneSummary(
        name=name or str(dict(config)),
        params=count_params(backbone),
        params_with_fc=count_params(backbone) + count_params(fc),
        gmacs_with_fc=counter.get_total_flops() / 2e9,  # the counter counts a multiply-add as 2 FLOPs
        input_size=input_size,
        outputs={k: (shapes[k].channels, shapes[k].stride, tuple(v.shape[-2:])) for k, v in features.items()},
    )


# The variants the README's table shows: (label, config, input size, classifier classes).
STANDARD_VARIANTS: list[tuple[str, dict[str, Any], int, int]] = [
    *[(f"ResNet-{d}", {"name": "resnet", "depth": d}, 224, 1000) for d in (18, 34, 50, 101, 152)],
    *[
        (f"ResNet-{d} stride in 3x3 (torchvision)", {"name": "resnet", "depth": d, "stride_in_1x1": False}, 224, 1000)
        for d in (50, 101, 152)
    ],
    ("ResNet-34 plain (no shortcuts)", {"name": "resnet", "depth": 34, "residual": False}, 224, 1000),
    ("ResNet-50 pre-activation", {"name": "resnet", "depth": 50, "preact": True}, 224, 1000),
    ("ResNet-50 output stride 16 (DC5)", {"name": "resnet", "depth": 50, "output_stride": 16}, 224, 1000),
    ("ResNet-50 output stride 8 (FCN)", {"name": "resnet", "depth": 50, "output_stride": 8}, 224, 1000),
    (
        "ResNet-50-FPN",
        {"name": "fpn", "bottom_up": {"name": "resnet", "depth": 50}, "in_features": ["res2", "res3", "res4", "res5"]},
        224,
        1000,
    ),
    *[
        (f"CIFAR ResNet-{d} (shortcut A)", {"name": "resnet", "depth": d, "family": "cifar", "shortcut": "A"}, 32, 10)
        for d in (20, 32, 44, 56, 110, 1202)
    ],
    ("timm resnet50d", {"name": "timm", "model": "resnet50d"}, 224, 1000),
    ("timm resnext50_32x4d", {"name": "timm", "model": "resnext50_32x4d"}, 224, 1000),
]


def markdown_table(rows: list[BackboneSummary]) -> str:
    lines = [
        "| backbone | input | params (M) | params + fc (M) | GMACs + fc | outputs: name channels/stride |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        outputs = " ".join(f"{k} {c}/{s}" for k, (c, s, _) in row.outputs.items())
        lines.append(
            f"| {row.name} | {row.input_size}² | {row.params / 1e6:.2f} | {row.params_with_fc / 1e6:.2f} "
            f"| {row.gmacs_with_fc:.2f} | {outputs} |"
        )
    return "\n".join(lines)
