"""The experiment trackers of ``train.log_with``, through accelerate's tracker API: started with the config as
hyper-parameters, continued by a resumed run, given the validation drawings at the end. The scalars go through
``accelerator.log`` (the training loop)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import cv2
from accelerate import Accelerator

from tasks.config import Config

from .checkpoints import write_json

logger = logging.getLogger(__name__)

TRACKED_RUN = "trackers.json"  # the trackers' run ids, so that a resumed run logs to the same runs


def start_trackers(config: Config, accelerator: Accelerator, resumed: bool) -> None:
    """``train.log_with``'s trackers, on the main process: the project ``resdet``, the run named after the
    output folder, the config as hyper-parameters (``section.key``, lists and mappings as JSON).

    MLflow logs where ``MLFLOW_TRACKING_URI`` says, by default into ``<output_dir>/mlflow.db`` with its artifacts
    in ``<output_dir>/mlartifacts/`` (MLflow's own default, ``./mlruns`` of the working folder, would litter
    wherever the run was started); W&B into the output folder (``WANDB_MODE=offline`` for no network). A resumed run continues
    the MLflow and W&B runs it started, with the hyper-parameters they started with."""
    if not accelerator.is_main_process or not config.train.log_with:
        return
    output_dir = Path(config.output_dir)
    ids = json.loads((output_dir / TRACKED_RUN).read_text()) if resumed and (output_dir / TRACKED_RUN).is_file() else {}
    mlflow_kwargs: dict[str, Any] = {}
    if "mlflow" in config.train.log_with and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow  # noqa: PLC0415  an optional tracker (the mlflow extra)

        mlflow.set_tracking_uri(f"sqlite:///{(output_dir / 'mlflow.db').resolve()}")
        mlflow_kwargs["logging_dir"] = str((output_dir / "mlartifacts").resolve())  # the experiment's artifacts
    run_name = output_dir.resolve().name
    init_kwargs = {"mlflow": {"run_name": run_name, "run_id": ids.get("mlflow"), **mlflow_kwargs},
                   "wandb": {"name": run_name, "dir": str(output_dir), "id": ids.get("wandb"), "resume": "allow"}}
    # a run continued (MLflow, W&B) keeps the hyper-parameters it started with: MLflow's cannot change, and the
    # run folder's config.yaml has the current ones
    continued = bool(set(ids) & set(config.train.log_with))
    accelerator.init_trackers("resdet", config=None if continued else hyperparameters(config),
                              init_kwargs=init_kwargs)
    for name, attribute in (("mlflow", lambda run: run.info.run_id), ("wandb", lambda run: run.id)):
        if name in config.train.log_with:
            ids[name] = attribute(accelerator.get_tracker(name).tracker)
    if ids:
        write_json(output_dir / TRACKED_RUN, ids)


def hyperparameters(config: Config) -> dict[str, Any]:
    """The config flattened to ``section.key`` → a number, a string or a bool (lists, mappings and ``None`` as
    JSON): what every tracker takes as hyper-parameters."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    walk("", config)
    return flat


def log_drawings(accelerator: Accelerator, folder: Path, step: int) -> None:
    """The validation drawings (``visualizations/*.png``) to the trackers that take images: TensorBoard and W&B
    as images, MLflow as artifacts; any other tracker is told nothing, and this is logged."""
    files = sorted(folder.glob("*.png"))
    if not files:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            tracker.log_artifacts(str(folder), "visualizations")
        elif tracker.name in ("tensorboard", "wandb"):
            images = {f"val/{f.stem}": cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files}
            if tracker.name == "tensorboard":
                tracker.log_images({k: v[None] for k, v in images.items()}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({k: [v] for k, v in images.items()}, step=step)
        else:
            logger.info("tracker %s: the drawings of visualizations/ are not logged to it (no image API here)",
                        tracker.name)
