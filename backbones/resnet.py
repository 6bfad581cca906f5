"""ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016): one class, every variant
of the paper an argument.

Stage names follow the paper's ``conv2_x .. conv5_x``: ``stem, res2, res3, res4, res5``, strides 4, 8, 16,
32 for the ImageNet family. The CIFAR family (Section 4.2 of the paper) has a 3x3 stem and three stages
``res2, res3, res4`` of 16/32/64 channels at strides 1, 2, 4.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, ShapeSpec
from .norm import NORMS, conv_norm, freeze, make_norm


class DepthSpec(NamedTuple):
    block: str  # "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1)
    blocks_per_stage: tuple[int, ...]


# The one depth table: the ImageNet networks of Table 1 of the paper.
IMAGENET_DEPTHS: dict[int, DepthSpec] = {
    18: DepthSpec("basic", (2, 2, 2, 2)),
    34: DepthSpec("basic", (3, 4, 6, 3)),
    50: DepthSpec("bottleneck", (3, 4, 6, 3)),
    101: DepthSpec("bottleneck", (3, 4, 23, 3)),
    152: DepthSpec("bottleneck", (3, 8, 36, 3)),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)  # 3x3-conv width of res2..res5; a bottleneck's output is 4x that
BOTTLENECK_EXPANSION = 4
CIFAR_WIDTHS = (16, 32, 64)
FAMILIES = ("imagenet", "cifar")
SHORTCUTS = ("A", "B", "C")
SHORTCUT_A_PADDINGS = ("end", "both")


def depth_spec(depth: int, family: str = "imagenet") -> DepthSpec:
    """Block type and blocks per stage for ``depth``. CIFAR depths are 6n+2 with n basic blocks a stage."""
    if family == "imagenet":
        if depth not in IMAGENET_DEPTHS:
            hint = " (a CIFAR depth 6n+2: set family: cifar)" if depth > 2 and (depth - 2) % 6 == 0 else ""
            raise ValueError(
                f"ImageNet ResNet depth must be one of {sorted(IMAGENET_DEPTHS)}, got {depth}{hint}"
            )
        return IMAGENET_DEPTHS[depth]
    if family == "cifar":
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, 1202, ...), got {depth}")
        n = (depth - 2) // 6
        return DepthSpec("basic", (n, n, n))
    raise ValueError(f"unknown ResNet family {family!r}; choose one of {', '.join(FAMILIES)}")


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation, bias=False
    )


class Stem(nn.Module):
    """ImageNet: 7x7/2 conv, norm, ReLU, 3x3/2 max-pool (stride 4). CIFAR: 3x3 conv, norm, ReLU (stride 1)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, family: str):
        super().__init__()
        kernel, stride = (7, 2) if family == "imagenet" else (3, 1)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False)
        self.norm = make_norm(norm, out_channels)
        self.pool = nn.MaxPool2d(3, 2, 1) if family == "imagenet" else nn.Identity()
        self.stride = stride * (2 if family == "imagenet" else 1)
        self.out_channels = out_channels
        self.fold_frozen_bn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(conv_norm(self.conv, self.norm, x, self.fold_frozen_bn), inplace=True))


class ZeroPadShortcut(nn.Module):
    """Option A of the paper: identity, subsampled in space and zero-padded in channels. No parameters.

    ``padding`` says where the zero channels go: ``end`` after the input's channels, ``both`` split
    equally before and after them (half rounded down before), as several public CIFAR implementations do.
    The two networks compute the same functions up to an order of channels, but a checkpoint only gives
    its logits with the padding it was trained with."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, padding: str = "end"):
        super().__init__()
        if padding not in SHORTCUT_A_PADDINGS:
            raise ValueError(f"shortcut_a_padding must be one of {', '.join(SHORTCUT_A_PADDINGS)}, got {padding!r}")
        self.extra_channels = out_channels - in_channels
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            before = self.extra_channels // 2 if self.padding == "both" else 0
            x = F.pad(x, (0, 0, 0, 0, before, self.extra_channels - before))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}, padding={self.padding}"


class Projection(nn.Module):
    """Options B/C: 1x1 conv with the block's stride, then norm (no norm in a pre-activation network)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str | None):
        super().__init__()
        self.conv = _conv(in_channels, out_channels, 1, stride)
        self.norm = make_norm(norm, out_channels) if norm else nn.Identity()
        self.fold_frozen_bn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_norm(self.conv, self.norm, x, self.fold_frozen_bn)


class ResidualBlock(nn.Module):
    """A basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) block, post- or pre-activation, with or without
    its shortcut. A bottleneck's inner ``width`` defaults to a quarter of ``out_channels``.

    Post-activation (the CVPR paper): ``relu(branch(x) + shortcut(x))`` with ``branch`` = conv-norm-ReLU
    ... conv-norm. Pre-activation (He et al., ECCV 2016): ``branch(x) + shortcut(x)`` with ``branch`` =
    norm-ReLU-conv ...; a projection shortcut takes the pre-activated input. ``preactivate_input=False``
    skips the first norm-ReLU where the input is already activated (the first block after the stem).
    """

    def __init__(
        self,
        block: str,
        in_channels: int,
        out_channels: int,
        stride: int,
        dilation: int,
        *,
        norm: str,
        stride_in_1x1: bool,
        shortcut: str,
        residual: bool,
        preact: bool,
        preactivate_input: bool = True,
        width: int | None = None,
        shortcut_a_padding: str = "end",
    ):
        super().__init__()
        self.preact = preact
        self.preactivate_input = preactivate_input
        self.fold_frozen_bn = False
        if block == "basic":
            convs = [(in_channels, out_channels, 3, stride, dilation), (out_channels, out_channels, 3, 1, dilation)]
        else:
            width = width or out_channels // BOTTLENECK_EXPANSION
            stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
            convs = [
                (in_channels, width, 1, stride_1x1, 1),
                (width, width, 3, stride_3x3, dilation),
                (width, out_channels, 1, 1, 1),
            ]
        self.num_convs = len(convs)
        for i, (cin, cout, kernel, s, d) in enumerate(convs, start=1):
            setattr(self, f"conv{i}", _conv(cin, cout, kernel, s, d))
            # Post-activation: norm after each conv. Pre-activation: norm before each conv.
            norm_channels = cin if preact else cout
            if preact and i == 1 and not preactivate_input:
                continue
            setattr(self, f"norm{i}", make_norm(norm, norm_channels))

        shape_changes = stride != 1 or in_channels != out_channels
        if not residual:
            self.shortcut = None
        elif shortcut == "C" or (shortcut == "B" and shape_changes):
            self.shortcut = Projection(in_channels, out_channels, stride, None if preact else norm)
        elif shortcut == "A" and shape_changes:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride, shortcut_a_padding)
        else:
            self.shortcut = nn.Identity()

    def last_branch_layer(self) -> nn.Module:
        """The layer whose zero-init makes the block start as its shortcut (last norm, or last conv)."""
        return getattr(self, f"conv{self.num_convs}") if self.preact else getattr(self, f"norm{self.num_convs}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            act = F.relu(self.norm1(x)) if self.preactivate_input else x
            identity = self.shortcut(act if isinstance(self.shortcut, Projection) else x) if self.shortcut else None
            out = self.conv1(act)
            for i in range(2, self.num_convs + 1):
                out = getattr(self, f"conv{i}")(F.relu(getattr(self, f"norm{i}")(out)))
            return out + identity if identity is not None else out

        out = x
        for i in range(1, self.num_convs + 1):
            out = conv_norm(getattr(self, f"conv{i}"), getattr(self, f"norm{i}"), out, self.fold_frozen_bn)
            if i < self.num_convs:
                out = F.relu(out, inplace=True)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out, inplace=True)


def _check_options(shortcut: str, shortcut_a_padding: str, norm: str) -> None:
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut option {shortcut!r}; choose one of {', '.join(SHORTCUTS)}")
    if shortcut_a_padding not in SHORTCUT_A_PADDINGS:
        raise ValueError(f"shortcut_a_padding must be one of {', '.join(SHORTCUT_A_PADDINGS)}, "
                         f"got {shortcut_a_padding!r}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


def _check_out_features(out_features: Sequence[str] | None, stage_names: list[str], depth: int,
                        freeze_at: int) -> tuple[list[str], int]:
    """The requested feature names (default: every stage) and how many stages after the stem to build for
    them; checks ``freeze_at`` against the built stages."""
    all_names = ["stem", *stage_names]
    out_features = list(out_features) if out_features is not None else stage_names
    unknown = [name for name in out_features if name not in all_names]
    if unknown or not out_features:
        raise ValueError(f"out_features {out_features} of ResNet-{depth} must be among {all_names}")
    num_built = max(all_names.index(name) for name in out_features)  # stages to build after the stem
    if not 0 <= freeze_at <= num_built + 1:
        raise ValueError(f"freeze_at must be in 0..{num_built + 1} (stem + built stages), got {freeze_at}")
    return out_features, num_built


def _num_dilated_stages(family: str, stem_stride: int, num_stages: int, output_stride: int | None) -> int:
    """How many of the last stages are dilated instead of strided to reach ``output_stride``."""
    natural_stride = stem_stride * 2 ** (num_stages - 1)
    output_stride = output_stride or natural_stride
    dilated = {natural_stride: 0, natural_stride // 2: 1, natural_stride // 4: 2}.get(output_stride)
    if dilated is None:
        raise ValueError(
            f"output_stride of a {family} ResNet must be {natural_stride}, {natural_stride // 2} or "
            f"{natural_stride // 4}, got {output_stride}"
        )
    return dilated


class ResNet(Backbone):
    """ResNet backbone returning the feature maps named in ``out_features``.

    Args:
        depth: 18, 34, 50, 101, 152 (``family="imagenet"``) or 6n+2 such as 20, 32, 44, 56, 110, 1202
            (``family="cifar"``).
        out_features: any of ``stem, res2 .. res5`` (``res2 .. res4`` for CIFAR); stages after the last one
            asked for are not built. Default: every stage.
        stride_in_1x1: in a downsampling bottleneck, put the stride in the first 1x1 conv (True: the paper's
            original / MSRA layout) or in the 3x3 conv (False: torchvision's "v1.5", also timm's).
        shortcut: the paper's options: "A" identity with zero-padded channels and subsampled space where
            shapes change, "B" projection only where shapes change, "C" projection everywhere.
        residual: False builds the paper's plain network (same layers, no shortcuts).
        preact: pre-activation blocks (He et al., "Identity Mappings in Deep Residual Networks"); the last
            stage's output then passes a final norm and ReLU.
        norm: "BN", "FrozenBN", "SyncBN" or "GN".
        freeze_at: freeze the stem (1) and the first ``freeze_at - 1`` stages: no gradients, batch
            statistics fixed. 0 freezes nothing.
        zero_init_residual: start every block as its shortcut by zero-initializing the last norm of its
            residual branch (the last conv in a pre-activation block).
        output_stride: 32 (16: dilate res5, 8: dilate res4 and res5) for ImageNet; 4 (2, 1) for CIFAR.
        dilate_first_block: in a dilated stage, dilate the first block's 3x3 conv too (detectron2's
            ``RES5_DILATION``); False keeps the previous stage's dilation there (torchvision's
            ``replace_stride_with_dilation``). Same parameters either way.
        width_per_group: the 3x3-conv width of res2, doubling each stage (ImageNet family): 64 for the
            paper's networks, 128 for torchvision's Wide ResNet-50-2/101-2 (detectron2's
            ``WIDTH_PER_GROUP``).
        res2_out_channels: output channels of res2, doubling each stage (detectron2's ``RES2_OUT_CHANNELS``);
            default 256 for bottlenecks (whatever their width), ``width_per_group`` for basic blocks (which
            must keep that).
        family: "imagenet" or "cifar".
        in_channels: channels of the input images.
        fold_frozen_bn: compute each conv followed by a FrozenBN (``norm: FrozenBN``, or the frozen stages
            of any norm) as one convolution with the norm folded into its weights and bias: a speed option
            (fewer passes over the activations), equal to float rounding (see ``conv_norm``).
    """

    def __init__(
        self,
        depth: int = 50,
        out_features: Sequence[str] | None = None,
        *,
        stride_in_1x1: bool = True,
        shortcut: str = "B",
        shortcut_a_padding: str = "end",
        residual: bool = True,
        preact: bool = False,
        norm: str = "BN",
        freeze_at: int = 0,
        zero_init_residual: bool = False,
        output_stride: int | None = None,
        family: str = "imagenet",
        in_channels: int = 3,
        fold_frozen_bn: bool = False,
        dilate_first_block: bool = False,
        width_per_group: int = 64,
        res2_out_channels: int | None = None,
    ):
        super().__init__()
        spec = depth_spec(depth, family)
        _check_options(shortcut, shortcut_a_padding, norm)
        self.depth, self.family, self.block = depth, family, spec.block
        self.stride_in_1x1, self.shortcut_option, self.residual = stride_in_1x1, shortcut, residual
        self.preact, self.norm = preact, norm

        stage_names = [f"res{i + 2}" for i in range(len(spec.blocks_per_stage))]
        out_features, num_built = _check_out_features(out_features, stage_names, depth, freeze_at)
        self.stem = Stem(in_channels, 64 if family == "imagenet" else CIFAR_WIDTHS[0], norm, family)
        dilated = _num_dilated_stages(family, self.stem.stride, len(stage_names), output_stride)
        shapes = self._build_stages(spec, stage_names[:num_built], dilated, dilate_first_block,
                                    width_per_group, res2_out_channels, shortcut_a_padding)

        # Pre-activation networks end with norm + ReLU after the last stage of the full network.
        full = num_built == len(stage_names)
        self.final_norm = make_norm(norm, shapes[stage_names[-1]].channels) if preact and full else None
        self._out_shapes = {name: shape for name, shape in shapes.items() if name in out_features}
        self.unbuilt_modules = tuple(stage_names[num_built:]) + (("final_norm",) if preact and not full else ())
        self._init_weights(zero_init_residual)
        self._freeze_and_fold(freeze_at, fold_frozen_bn)

    def _build_stages(self, spec: DepthSpec, names: list[str], dilated: int, dilate_first_block: bool,
                      width_per_group: int, res2_out_channels: int | None,
                      shortcut_a_padding: str) -> dict[str, ShapeSpec]:
        """Build and register the stages ``names`` after the stem (``self.stage_names``), the last ``dilated``
        stages of the full network dilated instead of strided. Returns the shapes of the stem and stages."""
        shapes = {"stem": ShapeSpec(self.stem.out_channels, self.stem.stride)}
        widths, out_widths = self._stage_widths(spec.block, self.family, width_per_group, res2_out_channels)
        num_stages = len(spec.blocks_per_stage)
        channels, stride, dilation = self.stem.out_channels, self.stem.stride, 1
        self.stage_names: list[str] = []
        for index, name in enumerate(names):
            stage_stride = 1 if index == 0 else 2
            first_dilation = dilation
            if index >= num_stages - dilated:
                dilation *= stage_stride
                stage_stride = 1
                first_dilation = dilation if dilate_first_block else first_dilation
            stride *= stage_stride
            stage = self._make_stage(spec, index, channels, out_widths[index], widths[index], stage_stride,
                                     first_dilation, dilation, shortcut_a_padding)
            self.add_module(name, stage)
            self.stage_names.append(name)
            shapes[name] = ShapeSpec(out_widths[index], stride)
            channels = out_widths[index]
        return shapes

    def _make_stage(self, spec: DepthSpec, index: int, in_channels: int, out_channels: int, width: int,
                    stride: int, first_dilation: int, dilation: int, shortcut_a_padding: str) -> nn.Sequential:
        """Stage ``index``: its blocks, the first one taking the stride and ``first_dilation``."""
        blocks = []
        for b in range(spec.blocks_per_stage[index]):
            blocks.append(
                ResidualBlock(
                    spec.block,
                    in_channels if b == 0 else out_channels,
                    out_channels,
                    stride if b == 0 else 1,
                    first_dilation if b == 0 else dilation,
                    norm=self.norm,
                    stride_in_1x1=self.stride_in_1x1,
                    shortcut=self.shortcut_option,
                    residual=self.residual,
                    preact=self.preact,
                    preactivate_input=not (index == 0 and b == 0),
                    width=width if spec.block == "bottleneck" else None,
                    shortcut_a_padding=shortcut_a_padding,
                )
            )
        return nn.Sequential(*blocks)

    def _freeze_and_fold(self, freeze_at: int, fold_frozen_bn: bool) -> None:
        """Freeze the stem and stages ``freeze_at`` names; set ``fold_frozen_bn`` on every conv-norm layer."""
        self.freeze_at = freeze_at
        for module in self.frozen_modules():
            freeze(module)
        self.fold_frozen_bn = fold_frozen_bn
        for module in self.modules():
            if isinstance(module, (Stem, Projection, ResidualBlock)):
                module.fold_frozen_bn = fold_frozen_bn

    @staticmethod
    def _stage_widths(block: str, family: str, width_per_group: int,
                      res2_out_channels: int | None) -> tuple[list[int], list[int]]:
        """Per stage: the 3x3-conv width and the output channels."""
        if family == "cifar":
            if width_per_group != 64 or res2_out_channels is not None:
                raise ValueError("width_per_group and res2_out_channels apply to the ImageNet family only")
            return list(CIFAR_WIDTHS), list(CIFAR_WIDTHS)
        if width_per_group < 1:
            raise ValueError(f"width_per_group must be positive, got {width_per_group}")
        res2_out = res2_out_channels or (IMAGENET_WIDTHS[0] * BOTTLENECK_EXPANSION if block == "bottleneck" else width_per_group)
        if block == "basic" and res2_out != width_per_group:
            raise ValueError(f"a basic-block ResNet's res2_out_channels equals its width_per_group "
                             f"({width_per_group}), got {res2_out}")
        return ([width_per_group * 2**i for i in range(len(IMAGENET_WIDTHS))],
                [res2_out * 2**i for i in range(len(IMAGENET_WIDTHS))])

    def pop_stage(self, name: str) -> nn.Module:
        """Remove the last built stage from this backbone and return it; the C4 detector runs ``res5`` on
        pooled regions instead of on the whole image. Weights already loaded go with the stage."""
        if not self.stage_names or name != self.stage_names[-1]:
            raise ValueError(f"only the last built stage ({self.stage_names[-1:]}) can be taken, not {name!r}")
        if self.final_norm is not None:
            raise ValueError("a pre-activation network's last stage cannot be taken out of it")
        stage = getattr(self, name)
        delattr(self, name)
        self.stage_names.pop()
        self._out_shapes.pop(name, None)
        self.unbuilt_modules = (name, *self.unbuilt_modules)
        return stage

    def frozen_modules(self) -> list[nn.Module]:
        """The stem and stages that ``freeze_at`` freezes."""
        return [getattr(self, name) for name in ["stem", *self.stage_names][: self.freeze_at]]

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, ResidualBlock):
                    layer = module.last_branch_layer()
                    if isinstance(layer, nn.Conv2d):
                        nn.init.zeros_(layer.weight)
                    else:
                        layer.weight.data.zero_()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = {}
        x = self.stem(images)
        if "stem" in self._out_shapes:
            outputs["stem"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if self.final_norm is not None and name == self.stage_names[-1]:
                x = F.relu(self.final_norm(x))
            if name in self._out_shapes:
                outputs[name] = x
        return outputs

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, family={self.family}, block={self.block}, stride_in_1x1={self.stride_in_1x1}, "
            f"shortcut={self.shortcut_option}, residual={self.residual}, preact={self.preact}, norm={self.norm}"
        )
