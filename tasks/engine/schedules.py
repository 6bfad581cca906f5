"""The optimizer's side of a run: the learning-rate schedule and the parameter groups (learning rate and
weight decay per parameter)."""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from tasks.config import TrainConfig


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the learning rate at optimizer step ``i``: linear warmup from ``warmup_factor`` (or,
    ``warmup_method: constant``, ``warmup_factor`` for the ``warmup_iters`` steps, as the paper's ResNet-110), then
    a step decay (``gamma`` at each of ``steps``), a cosine decay to 0 at ``max_iters`` or the poly decay
    ``(1 - i / max_iters) ** 0.9`` of DeepLab and torchvision's segmentation recipes."""

    def factor(i: int) -> float:
        warmup = 1.0
        if i < train.warmup_iters:
            alpha = 0.0 if train.warmup_method == "constant" else i / train.warmup_iters
            warmup = train.warmup_factor * (1 - alpha) + alpha
        if train.schedule == "cosine":
            return warmup * 0.5 * (1 + math.cos(math.pi * min(i, train.max_iters) / train.max_iters))
        if train.schedule == "poly":
            return warmup * (1 - min(i, train.max_iters) / train.max_iters) ** 0.9
        return warmup * train.gamma ** sum(1 for s in train.steps if i >= s)  # "step" (prepare_config checks the name)

    return factor


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool, lr: float,
                 backbone_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """Trainable parameters with their learning rate and weight decay: weight decay 0 on norm parameters
    and biases if asked, ``lr * backbone_lr_mult`` for the parameters of the model's ``backbone`` (the
    fine-tuning of a pretrained one), ``lr`` for the rest."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    for module_name, module in model.named_modules():
        in_backbone = backbone_lr_mult != 1.0 and (module_name == "backbone" or module_name.startswith("backbone."))
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            decays = not (no_decay_norm_bias and (isinstance(module, norm_types) or name == "bias"))
            groups.setdefault((in_backbone, decays), []).append(param)
    return [{"params": params, "lr": lr * (backbone_lr_mult if in_backbone else 1.0),
             "weight_decay": weight_decay if decays else 0.0}
            for (in_backbone, decays), params in sorted(groups.items(), key=lambda item: (item[0][0], not item[0][1]))]
