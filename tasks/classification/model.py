"""Image classification: a backbone, global average pooling and one fully connected layer (the paper's
head), built from a config dict."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones import Backbone
from backbones.errors import UserError
from tasks.modeling.assembly import layout_backbone, merged, resolve_layout_backbone
from tasks.modeling.batching import IMAGENET_MEAN, IMAGENET_STD, INPUT_FORMATS, batch_images

logger = logging.getLogger(__name__)

LAYOUT = "classifier"


class ImageClassifier(nn.Module):
    """backbone -> global average pooling of its coarsest map -> ``fc`` (num_classes logits).

    ``forward(images, targets=None)``: ``images`` a list of ``(3, H, W)`` RGB tensors or one stacked
    ``(N, 3, H, W)`` tensor (``uint8`` 0..255 or float 0..1), normalized inside the model with
    ``pixel_mean``/``pixel_std`` and, when the model has one, minus its per-pixel ``mean_image`` (the
    CIFAR recipe of the paper: a persistent buffer, saved with the weights, filled from the training set
    by ``set_mean_image``). Training: ``targets`` hold a ``label``; returns ``loss_cls`` (softmax
    cross-entropy) and ``top1_error`` (the batch's top-1 error, logged beside the loss, not optimized).
    Evaluation: the ``(N, num_classes)`` logits.

    The module names ``fc.weight``/``fc.bias`` are torchvision's, so its ImageNet classifiers load whole.
    """

    def __init__(self, backbone: Backbone, num_classes: int, pixel_mean: Sequence[float] = IMAGENET_MEAN,
                 pixel_std: Sequence[float] = IMAGENET_STD, input_format: str = "RGB", input_range: float = 1.0,
                 mean_image_size: int = 0, dropout: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.backbone = backbone
        self.in_feature, shape = list(backbone.output_shape().items())[-1]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(shape.channels, num_classes)
        self.input_format, self.input_range = input_format, input_range
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        if mean_image_size:
            self.register_buffer("mean_image", torch.zeros(3, mean_image_size, mean_image_size))
        else:
            self.mean_image = None

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    @torch.no_grad()
    def set_mean_image(self, mean_image: torch.Tensor) -> None:
        """Set the per-pixel mean ``(3, S, S)``, in the units of normalized inputs (after ``pixel_mean``
        and ``pixel_std``)."""
        if self.mean_image is None or mean_image.shape != self.mean_image.shape:
            raise UserError(f"the per-pixel mean has shape {tuple(mean_image.shape)}, the model expects "
                            f"{None if self.mean_image is None else tuple(self.mean_image.shape)} "
                            "(model.mean_image_size and the image size must agree)")
        self.mean_image.copy_(mean_image)

    def preprocess(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        batch, _ = batch_images(images, self.pixel_mean, self.pixel_std, 0, input_format=self.input_format,
                                input_range=self.input_range)
        if self.mean_image is not None:
            if batch.shape[-2:] != self.mean_image.shape[-2:]:
                raise UserError(f"images of {batch.shape[-1]}x{batch.shape[-2]} pixels for a model whose per-pixel "
                                f"mean is {self.mean_image.shape[-1]}x{self.mean_image.shape[-2]}")
            batch = batch - self.mean_image
        return batch

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        features = self.backbone(batch)[self.in_feature]  # (N, C, h, w)
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)))  # (N, K)

    def forward(self, images: Sequence[torch.Tensor] | torch.Tensor, targets: list[dict[str, Any]] | None = None):
        if self.training and targets is None:
            raise ValueError("ImageClassifier in training mode needs targets with labels")
        logits = self.logits(self.preprocess(images))
        if not self.training:
            return logits
        labels = torch.as_tensor([int(t["label"]) for t in targets], device=logits.device)
        return {"loss_cls": F.cross_entropy(logits, labels),
                "top1_error": (logits.detach().argmax(1) != labels).float().mean()}


DEFAULTS: dict[str, Any] = {
    "num_classes": 0,  # 0: the number of classes of the training data (folders, or 10/100 for CIFAR)
    "weights": None,  # a whole classifier to start from (own run or torchvision's); the head stays new where shapes differ
    "input_format": "RGB",
    "input_range": 1.0,
    "pixel_mean": list(IMAGENET_MEAN),  # in input_range units and input_format order
    "pixel_std": list(IMAGENET_STD),
    "mean_image_size": 0,  # S > 0: also subtract the training set's per-pixel mean (S x S images; the paper's CIFAR input)
    "dropout": 0.0,  # before the fc layer (the paper uses none)
    "backbone": {"name": "resnet", "depth": 50, "stride_in_1x1": False},
}


def resolve_classifier_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` section with every default filled in (``DEFAULTS`` and the backbone builder's own):
    what a run folder's ``config.yaml`` keeps. Idempotent; unknown keys and values of the wrong type are
    errors naming them."""
    cfg = merged(DEFAULTS, config, "model")
    if cfg["input_format"] not in INPUT_FORMATS:
        raise UserError(f"model.input_format must be one of {', '.join(INPUT_FORMATS)}, got {cfg['input_format']!r}")
    if cfg["input_range"] not in (1, 255):
        raise UserError(f"model.input_range must be 1.0 (pixels in 0..1) or 255.0 (0..255), got {cfg['input_range']!r}")
    if cfg["num_classes"] < 0 or cfg["mean_image_size"] < 0 or not 0 <= cfg["dropout"] < 1:
        raise UserError("model.num_classes and model.mean_image_size must be >= 0 and model.dropout in [0, 1), got "
                        f"{cfg['num_classes']}, {cfg['mean_image_size']}, {cfg['dropout']}")
    cfg["backbone"] = resolve_layout_backbone(cfg["backbone"], LAYOUT, ())
    return cfg


def build_classifier(config: Mapping[str, Any], num_classes: int | None = None, init_weights: bool = True) -> ImageClassifier:
    """Build from the ``model`` section of a config (keys: ``DEFAULTS``). The head reads the last (coarsest)
    feature map the backbone returns: ``res5`` of an ImageNet ResNet, ``res4`` of a CIFAR one.

    ``num_classes`` (the data's class count) is used where ``model.num_classes`` is 0 and must equal it
    otherwise. ``init_weights`` loads the backbone's initialisation weights, unless ``model.weights`` names a
    whole trained classifier to start from: its caller loads that next (``ClassificationTask.build_model``,
    with ``load_classifier_weights``). ``init_weights=False`` skips all initialisation weights (for a full
    checkpoint loaded next)."""
    cfg = resolve_classifier_config(config)
    classes = cfg["num_classes"] or num_classes
    if not classes:
        raise UserError("model.num_classes is 0 (take it from the data) but no dataset gave a class count; "
                        "set model.num_classes")
    if cfg["num_classes"] and num_classes and cfg["num_classes"] != num_classes:
        raise UserError(f"model.num_classes is {cfg['num_classes']} but the data has {num_classes} classes; set "
                        f"model.num_classes: {num_classes} (or 0 to take it from the data)")
    backbone = layout_backbone(cfg["backbone"], LAYOUT, init_weights=init_weights and not cfg["weights"])
    model = ImageClassifier(backbone, classes, cfg["pixel_mean"], cfg["pixel_std"], cfg["input_format"],
                            float(cfg["input_range"]), cfg["mean_image_size"], cfg["dropout"])
    return model
