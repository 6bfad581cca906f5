"""The tasks by name: what the config's ``task`` key selects, and the config check every tool runs before it
reads data, starts processes or downloads anything."""

from __future__ import annotations

from tasks.classification.task import ClassificationTask
from tasks.config import Config, ConfigError, check_config
from tasks.detection.task import DetectionTask
from tasks.engine import Task
from tasks.segmentation.task import SegmentationTask

TASKS: dict[str, type] = {
    "detection": DetectionTask,
    "segmentation": SegmentationTask,
    "classification": ClassificationTask,
}


def get_task(name: str) -> Task:
    """The task object for ``config.task``."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]()


def prepare_config(config: Config) -> Config:
    """``check_config`` for the config's own task: the whole config checked, the model's defaults resolved."""
    return check_config(config, get_task(config.task))
