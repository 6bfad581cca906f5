"""Task lookup by the config's ``task`` key, and the check every tool runs on a config before it reads
data, starts processes or downloads anything."""

from __future__ import annotations

import dataclasses

import torch

from backbones.errors import UserError

from .coco_eval import BACKENDS
from .config import Config, ConfigError

TASKS = ("detection", "segmentation", "classification")


def get_task(name: str):
    """The task object for ``config.task``."""
    if name == "detection":
        from .detection.task import DetectionTask

        return DetectionTask()
    if name == "segmentation":
        from .segmentation.task import SegmentationTask

        return SegmentationTask()
    if name == "classification":
        from .classification.task import ClassificationTask

        return ClassificationTask()
    raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


_CHOICES = {
    "train.schedule": ("step", "cosine", "poly"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.warmup_method": ("linear", "constant"),
    "data.label_map": ("contiguous", "coco_id"),
    "data.class_set": ("voc20", "coco80", "all"),
    "data.augment": ("cifar", "imagenet", "none"),
    "eval.backend": BACKENDS,
}
_AT_LEAST = {"train.max_iters": 1, "train.batch_size": 1, "train.grad_accum_steps": 1, "train.log_period": 1,
             "train.keep_checkpoints": 1, "train.checkpoint_period": 0, "train.eval_period": 0,
             "train.reference_batch_size": 1, "data.num_workers": 0, "eval.batch_size": 1,
             "data.min_size_test": 1, "data.max_size_test": 1, "data.max_size_train": 1,
             "data.val_split": 0, "data.pad": 0, "data.crop_size": 0, "train.backbone_lr_mult": 0}


def _value(config: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def prepare_config(config: Config) -> Config:
    """Check the whole config, the ``model`` section included, and return it with the model's defaults
    resolved (every value the model is built with, as the run folder keeps it).

    Fast whatever the dataset's size: nothing is read but the config, the model is built on the ``meta``
    device (no memory, no weights), no process group is started and nothing is downloaded. Every problem
    is a ``UserError`` naming the key."""
    task = get_task(config.task)
    for key, choices in _CHOICES.items():
        if _value(config, key) not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {_value(config, key)!r}")
    if config.data.format not in task.data_formats:  # e.g. a classification folder given to a detector
        raise ConfigError(f"data.format must be one of {', '.join(task.data_formats)} for task {config.task}, "
                          f"got {config.data.format!r}")
    for key, least in _AT_LEAST.items():
        if _value(config, key) < least:
            raise ConfigError(f"{key} must be at least {least}, got {_value(config, key)}")
    if any(s < 1 for s in config.data.min_size_train) or not config.data.min_size_train:
        raise ConfigError(f"data.min_size_train must be a list of positive sizes, got {config.data.min_size_train}")
    model = task.resolve_model(config.model)
    try:
        with torch.device("meta"):
            task.build_model(dataclasses.replace(config, model=model), init_weights=False)
    except UserError:
        raise
    except (ValueError, TypeError) as error:  # a head or backbone refusing a value the config gave it
        raise ConfigError(f"the model section of the config cannot be built: {error}") from error
    return dataclasses.replace(config, model=model)
