"""Task lookup by the config's ``task`` key."""

from __future__ import annotations


def get_task(name: str):
    """The task object for ``config.task``."""
    if name == "detection":
        from .detection.task import DetectionTask

        return DetectionTask()
    if name == "segmentation":
        from .segmentation.task import SegmentationTask

        return SegmentationTask()
    raise ValueError(f"unknown task {name!r}; choose detection or segmentation")
