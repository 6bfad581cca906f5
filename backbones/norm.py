"""Normalization layers by name, and freezing of parameters and batch statistics."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

NORMS = ("BN", "FrozenBN", "SyncBN", "GN")
GN_GROUPS = 32


def make_norm(norm: str, channels: int) -> nn.Module:
    """A 2-D normalization layer over ``channels``.

    ``BN``: batch norm; ``FrozenBN``: statistics and affine fixed (torchvision's FrozenBatchNorm2d);
    ``SyncBN``: batch statistics reduced over all processes; ``GN``: group norm with 32 groups (or the
    largest divisor of ``channels`` that divides 32, e.g. 16 groups for the 16-channel CIFAR stage).
    """
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "GN":
        return nn.GroupNorm(math.gcd(GN_GROUPS, channels), channels)
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm / SyncBatchNorm in ``module`` by a FrozenBatchNorm2d with the same statistics
    and affine parameters (``model.train()`` can no longer change them). Other parameters stay trainable.
    Returns the module, or its replacement when ``module`` itself is a batch norm."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new_child = freeze_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def freeze(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place: no parameter gets a gradient, no batch statistic is updated."""
    module = freeze_batchnorm(module)
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor, fold: bool = False) -> torch.Tensor:
    """``norm(conv(x))``. With ``fold`` and a FrozenBatchNorm2d, the norm's fixed affine is folded into the
    convolution instead: ``conv(x, w * scale) + (bias - mean * scale)`` with ``scale = gamma / sqrt(var +
    eps)``, one pass over the activations fewer in the forward and in the backward pass. Mathematically the
    same; the results differ by float rounding. Gradients still reach ``conv.weight``."""
    if not (fold and isinstance(norm, FrozenBatchNorm2d)):
        return norm(conv(x))
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1), bias)
