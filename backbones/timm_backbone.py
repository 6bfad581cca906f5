"""Any timm model as a backbone of the project's contract, through timm's ``features_only`` mode."""

from __future__ import annotations

import difflib
import math
from typing import Sequence

import torch
from torch import nn

from .base import Backbone, ShapeSpec
from .norm import freeze, freeze_batchnorm

TIMM_NORMS = ("native", "FrozenBN", "SyncBN")


class TimmBackbone(Backbone):
    """Wraps ``timm.create_model(model, features_only=True)``.

    Feature maps are named by the stride they have in the undilated network, as the paper's stages are:
    stride 4 -> ``res2``, 8 -> ``res3``, 16 -> ``res4``, 32 -> ``res5`` (and stride 2, timm's first map of a
    ResNet, -> ``res1``). So ``resnet50d`` or ``resnext50_32x4d`` replace the paper's ResNet-50 with no
    change downstream. ``output_stride`` 16 or 8 dilates the last stages (strides in ``output_shape()``
    follow; names do not change).

    Args:
        model: a timm model name, e.g. ``resnet50d``. Weights are not downloaded here (see
            ``load_pretrained`` and the ``weights`` config key).
        out_features: names to return; default ``res2 .. res5`` (those the model has). Stages after the
            last one asked for are not built.
        output_stride: 32, 16 or 8.
        norm: "native" keeps the model's own norm layers; "FrozenBN" freezes every batch norm's statistics
            and affine parameters; "SyncBN" converts them to SyncBatchNorm.
        freeze_at: freeze everything before ``res2`` (1) and the stages up to ``res<freeze_at>``.
        in_channels: channels of the input images.
    """

    def __init__(
        self,
        model: str,
        out_features: Sequence[str] | None = None,
        *,
        output_stride: int = 32,
        norm: str = "native",
        freeze_at: int = 0,
        in_channels: int = 3,
    ):
        import timm  # noqa: PLC0415  a second of start-up that only timm backbones need

        super().__init__()
        if norm not in TIMM_NORMS:
            raise ValueError(f"unknown timm backbone norm {norm!r}; choose one of {', '.join(TIMM_NORMS)}")
        if not timm.is_model(model.split(".")[0]):
            close = difflib.get_close_matches(model, timm.list_models(), n=5)
            raise ValueError(f"timm has no model {model!r}; closest names: {close}")
        with torch.device("meta"):  # read the natural (undilated) feature layout without allocating weights
            probe = timm.create_model(model, features_only=True, pretrained=False, in_chans=in_channels)
        natural = probe.feature_info.reduction()
        names = [self._stride_name(model, r) for r in natural]
        if len(set(names)) != len(names):
            raise ValueError(f"timm model {model!r} has several feature maps at one stride ({natural}); "
                             "TimmBackbone needs one map per stride")
        default = [n for n in names if n in ("res2", "res3", "res4", "res5")]
        out_features = list(out_features) if out_features is not None else default
        unknown = [n for n in out_features if n not in names]
        if unknown or not out_features:
            raise ValueError(f"out_features {out_features} of timm model {model!r} must be among {names}")
        out_indices = sorted(names.index(n) for n in out_features)

        self.model_name = model
        self.body = timm.create_model(
            model,
            features_only=True,
            pretrained=False,
            out_indices=out_indices,
            output_stride=output_stride,
            in_chans=in_channels,
        )
        self.unbuilt_modules = tuple(name for name in probe._modules if name not in self.body._modules)
        channels = self.body.feature_info.channels()
        strides = self.body.feature_info.reduction()
        self._out_shapes = {
            names[i]: ShapeSpec(c, s) for i, c, s in zip(out_indices, channels, strides)
        }
        self.timm_module_of = dict(zip(names, probe.feature_info.module_name()))

        if norm == "FrozenBN":
            freeze_batchnorm(self.body)
        elif norm == "SyncBN":
            self.body = nn.SyncBatchNorm.convert_sync_batchnorm(self.body)
        if freeze_at:
            self._freeze(freeze_at)

    @staticmethod
    def _stride_name(model: str, reduction: int) -> str:
        level = math.log2(reduction)
        if not level.is_integer():
            raise ValueError(f"timm model {model!r} has a feature map at stride {reduction}, not a power of 2")
        return f"res{int(level)}"

    def _freeze(self, freeze_at: int) -> None:
        """Freeze the body's modules in order, through the one producing ``res<freeze_at>`` (1: the stem,
        everything before the ``res2`` module)."""
        children = list(self.body.named_children())
        child_names = [name for name, _ in children]
        target = "res2" if freeze_at == 1 else f"res{freeze_at}"
        module = self.timm_module_of.get(target, "").replace(".", "_")
        if module not in child_names:
            raise ValueError(
                f"freeze_at {freeze_at} of timm model {self.model_name!r}: {target} is not built "
                f"(built features: {list(self._out_shapes)})"
            )
        stop = child_names.index(module) + (0 if freeze_at == 1 else 1)
        for name, child in children[:stop]:
            setattr(self.body, name, freeze(child))

    def pop_stage(self, name: str) -> nn.Module:
        """Remove the last built stage from this backbone and return it (see ``ResNet.pop_stage``)."""
        module = self.timm_module_of.get(name, "").replace(".", "_")
        if not self._out_shapes or name != list(self._out_shapes)[-1] or module != list(self.body._modules)[-1]:
            raise ValueError(f"only the last built stage ({list(self._out_shapes)[-1:]}) can be taken, not {name!r}")
        stage = self.body._modules.pop(module)
        self.body.return_layers.pop(module, None)
        self._out_shapes.pop(name)
        self.unbuilt_modules = (module, *self.unbuilt_modules)
        return stage

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self._out_shapes, self.body(images)))
