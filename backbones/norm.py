"""Normalization layers by name, and freezing of parameters and batch statistics."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

NORMS = ("BN", "FrozenBN", "SyncBN", "GN")
CONV_NORMS = ("", *NORMS)  # the norm of a convolution of the FPN or a head: "" for none (a bias instead)
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


class NormedConv2d(nn.Conv2d):
    """A convolution without bias followed by a normalization layer, one module: detectron2's
    ``layers.Conv2d`` with a ``norm``, whose parameter names it has (``weight``, ``norm.weight``,
    ``norm.bias``, ``norm.running_mean``, ...; the norm's shift takes the bias's place). No activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str, stride: int = 1,
                 padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.norm = make_norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


def conv2d(in_channels: int, out_channels: int, kernel_size: int, norm: str = "", stride: int = 1,
           padding: int = 0) -> nn.Conv2d:
    """A convolution with a bias (``norm=""``: a plain ``nn.Conv2d``) or, with one of ``NORMS``, a
    ``NormedConv2d`` (no bias), as detectron2 builds its FPN and head convolutions (``bias = norm == ""``)."""
    if norm not in CONV_NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(map(repr, CONV_NORMS))} ('': none)")
    if not norm:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
    return NormedConv2d(in_channels, out_channels, kernel_size, norm, stride, padding)


def batch_norm_over(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``norm`` (a training BatchNorm2d or SyncBatchNorm) of ``x`` ``(R, C, H, W)`` with the batch statistics
    of the samples whose ``weight`` ``(R,)`` is 1 alone (0: left out), those of every process for a
    SyncBatchNorm in a process group of several; every sample is normalized with them, and the running
    statistics are updated with them as the norm itself would (unbiased variance, ``momentum``). With no
    such sample in any process, the statistics of all samples. Fixed sizes: nothing is read back (unless
    ``momentum`` is None, the cumulative average).

    What a batch of fixed size needs where some of its samples are padding: Mask R-CNN's mask head sees
    the positive regions alone in detectron2, a fixed number of slots here (the positives first)."""
    w = weight.detach().to(torch.float32).view(-1, 1, 1, 1)
    values = x.float()
    pixels = values.shape[2] * values.shape[3]
    # sums over the chosen samples and over all of them, and both counts, reduced in one collective
    stats = torch.cat([(values * w).sum((0, 2, 3)), (values * values * w).sum((0, 2, 3)), values.sum((0, 2, 3)),
                       (values * values).sum((0, 2, 3)), (w.sum() * pixels).view(1),
                       values.new_full((1,), values.shape[0] * pixels)])
    group = getattr(norm, "process_group", None) or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
    if isinstance(norm, nn.SyncBatchNorm) and group is not None and dist.get_world_size(group) > 1:
        stats = dist_nn.all_reduce(stats, group=group)  # differentiable: gradients reach every process's samples
    channels = values.shape[1]
    chosen_sum, chosen_sq, all_sum, all_sq = stats[:4 * channels].view(4, channels)
    chosen_count, all_count = stats[-2], stats[-1]
    some = chosen_count > 0
    count = torch.where(some, chosen_count, all_count)
    mean = torch.where(some, chosen_sum, all_sum) / count
    var = (torch.where(some, chosen_sq, all_sq) / count - mean * mean).clamp(min=0)
    with torch.no_grad():
        norm.num_batches_tracked.add_(1)
        momentum = norm.momentum if norm.momentum is not None else 1.0 / norm.num_batches_tracked.item()
        norm.running_mean.lerp_(mean.detach().to(norm.running_mean.dtype), momentum)
        unbiased = var.detach() * count / (count - 1).clamp(min=1)
        norm.running_var.lerp_(unbiased.to(norm.running_var.dtype), momentum)
    scale = norm.weight.float() * (var + norm.eps).rsqrt()
    shift = norm.bias.float() - mean * scale
    return (values * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)


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
