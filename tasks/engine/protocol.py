"""The task interface: what a task (detection, segmentation, classification) gives the engine and the
tools. Every task of ``tasks.registry`` implements all of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from accelerate import Accelerator
from torch import nn
from torch.utils.data import Dataset

from tasks.config import Config


class Task(Protocol):
    """A task. The engine trains and evaluates through it; ``tasks.config.check_config`` checks a config
    with it; the tools build, load, evaluate and predict through it."""

    data_formats: tuple[str, ...]  # the data.format values it reads

    def resolve_model(self, model: dict[str, Any]) -> dict[str, Any]:
        """The ``model`` section with every default filled in (what the run folder's config.yaml keeps)."""
    def build_model(self, config: Config, init_weights: bool = True) -> nn.Module:
        """The model; ``init_weights`` starts it from the config's initial weights (``model.weights``, a whole
        trained model, where the task has that key; else the backbone's), ``False`` leaves it for a
        checkpoint loaded next with ``load_weights``."""
    def load_weights(self, model: nn.Module, path: str | Path) -> str:
        """Load a whole-model checkpoint strictly (this project's or a foreign layout); returns its format."""
    def train_dataset(self, config: Config) -> Dataset: ...
    def val_dataset(self, config: Config) -> Dataset: ...
    def collate(self, batch: list) -> tuple[list, list]: ...
    def loss_inputs(self, batch: tuple[list, list]) -> tuple[list, list]:
        """The ``(images, targets)`` the model's training forward takes, from a collated batch."""
    def evaluate(self, model: nn.Module, dataset: Dataset, accelerator: Accelerator, output_dir: Path,
                 config: Config) -> dict[str, float]:
        """Metrics over ``dataset``, every process evaluating its shard; the same dict on every process."""
    def visualize(self, model: nn.Module, dataset: Dataset, output_dir: Path, config: Config) -> None: ...
    def metadata(self, dataset: Dataset) -> dict[str, Any]:
        """``{"categories": [{"id", "name"}, ...]}``, written to the run folder's categories.json."""
