"""Configs: YAML files with ``_base_`` inheritance and ``key=value`` overrides, validated against the
typed schema below (OmegaConf).

Merging (``_base_`` files under the file, then the overrides over it) is key by key, except that a section
whose ``name`` differs from its base's replaces it whole: ``model: {backbone: {name: timm, model:
resnet18}}`` over a ResNet base does not inherit the ResNet's ``depth``.

An unknown or misspelled key, or a value of the wrong type, is an error that names the key and the
closest valid keys. The ``model`` section is free-form here and validated by the task's model builder,
which knows the keys of each backbone and head: ``check_config`` runs both (``tasks.registry.prepare_config``
finds the task by the config's ``task`` key).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from accelerate.utils import LoggerType
from accelerate.utils import imports as accelerate_imports
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from backbones.errors import UserError, UserFileNotFoundError
from backbones.weights import is_weights_name
from tasks.evaluation.coco import BACKENDS


@dataclass
class SplitConfig:
    """One split of the dataset, paths relative to ``data.root`` (or absolute). Which keys are read depends on
    ``data.format``:

    - ``coco``: ``annotations`` (an ``instances_*.json``) and ``images`` (their folder);
    - ``voc``: ``sets``, the VOCdevkit year folders with their ``ImageSets/Main`` split, joined in order, e.g.
      ``[[VOC2007, trainval], [VOC2012, trainval]]`` (the literature's "07+12");
    - ``mask_folder``: ``images`` (a folder, searched recursively for ``data.image_suffix``), ``labels`` (the
      label PNGs' folder, the same relative paths with ``data.label_suffix``; empty: beside the images) and
      ``split_file`` (one image path per line, relative to ``images`` and without the suffix; empty: every
      image of the folder).
    """

    annotations: str = "annotations/instances_train2017.json"
    images: str = "train2017"
    sets: list[list[str]] = field(default_factory=list)
    labels: str = ""
    split_file: str = ""


@dataclass
class SyntheticConfig:
    """Generate the synthetic shapes dataset under ``data.root`` when it is missing (see tasks/data/synthetic)."""

    num_train: int = 400
    num_val: int = 100
    size: int = 128
    seed: int = 0


@dataclass
class DataConfig:
    root: str = "datasets/coco"
    synthetic: Optional[SyntheticConfig] = None
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(
        default_factory=lambda: SplitConfig("annotations/instances_val2017.json", "val2017")
    )
    label_map: str = "contiguous"  # "contiguous": categories sorted by id -> 1..K; "coco_id": label = id
    min_size_train: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    flip_prob: float = 0.5
    num_workers: int = 4
    # num_workers > 0: a training batch not delivered within this many seconds (a read that never returns: a
    # network file system that does not answer) stops the run naming the batch's images; 0: wait for ever
    timeout_s: float = 300.0
    # detection: [[H, W], ...], each batch padded to the smallest that holds it (rounded up to the backbone's
    # size divisibility; a larger batch keeps its own size), so that a compiled model (train.compile) makes one
    # graph a bucket, not one a batch shape; []: each batch padded to its own largest image
    size_buckets: list[list[int]] = field(default_factory=list)
    # segmentation
    class_set: str = "coco80"  # "voc20", "coco80" or "all" (every category of the annotation file)
    min_pixels: int = 1000  # training skips images whose selected classes cover less (by COCO area)
    crop_size: int = 0  # training crop side after the random resize (0: no crop); classification: the input side
    # segmentation, data.format mask_folder: label PNGs whose pixel values are mapped to training ids
    image_suffix: str = ".jpg"  # what ends an image file's name (Cityscapes: _leftImg8bit.png)
    label_suffix: str = ".png"  # what replaces it in the label file's name (Cityscapes: _gtFine_labelIds.png)
    class_names: list[str] = field(default_factory=list)  # the training ids' names, 0..K-1 (K: model.num_classes)
    # value -> training id ({}: the value is the id; 255: ignored); with reduce_zero_label the value after it
    value_map: dict[int, int] = field(default_factory=dict)
    ignore_values: list[int] = field(default_factory=lambda: [255])  # file values ignored in loss and metric
    reduce_zero_label: bool = False  # file value 0 ignored and v -> v - 1 before value_map (ADE20K)
    # any other file value is an error naming the file and the value
    format: str = "coco"  # detection: "coco", "voc"; segmentation: "coco", "mask_folder";
    # classification: "folder" (root/{train,val}/<class>/*), "cifar10", "cifar100"
    download: bool = False  # cifar10/cifar100: fetch the published archive into data.root when missing
    val_split: int = 0  # > 0: hold out the last N training images as the validation split (CIFAR: 5000 for 45k/5k)
    augment: str = "imagenet"  # "cifar" (pad + random crop + flip), "imagenet" (random resized crop + flip), "none"
    pad: int = 4  # augment cifar: zero pixels added on each side before the random crop


@dataclass
class TrainConfig:
    max_iters: int = 90000
    batch_size: int = 2  # images per process and step
    base_lr: float = 0.02  # for reference_batch_size images; scaled linearly to the real total batch
    reference_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = False  # True: no weight decay on norm parameters and biases
    backbone_lr_mult: float = 1.0  # the backbone's learning rate is this times the rest's (fine-tuning: < 1)
    schedule: str = "step"  # "step" (gamma at each of steps), "cosine" or "poly" ((1 - t)^0.9)
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    warmup_method: str = "linear"  # "linear" (warmup_factor rising to 1) or "constant" (warmup_factor throughout)
    grad_accum_steps: int = 1
    clip_grad_norm: float = 0.0  # 0: no clipping
    mixed_precision: str = "no"  # "no", "bf16", "fp16" (the --mixed_precision of accelerate launch wins)
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm when several processes train
    eval_period: int = 0  # evaluate every N iterations (0: only at the end)
    checkpoint_period: int = 5000
    keep_checkpoints: int = 2
    log_period: int = 20
    # the finite-loss and stop check reads the device every N iterations, and at every log, checkpoint and
    # evaluation iteration and the last (1: every micro-batch, before its backward). N > 1: the host waits for
    # the GPU once in N iterations; a non-finite loss is found up to N - 1 iterations late (always before a
    # checkpoint) and a stop signal honoured at the next check
    check_period: int = 1
    # torch.compile the model for training (tasks/modeling/compiling.py: the dynamo settings under which a
    # detector is one graph); the first iterations compile, the weights and checkpoints stay the model's own
    compile: bool = False
    # the backbone (and FPN) captured as CUDA graphs (tasks/modeling/compiling.py capture_cuda_graphs): one
    # recorded graph per batch shape (data.size_buckets keeps them few) replayed with one launch; CUDA only,
    # and not with train.compile (which compiles the backbone into its own graph)
    cuda_graphs: bool = False
    # several processes: a process that stops answering or making progress ends the job within this many
    # seconds, with a line naming its rank (tasks/engine/watchdog.py); also the process group's collective
    # timeout. Longer than the longest legitimate wait (the main process's checkpoint write, its drawings);
    # 0: accelerate's default (30 min) and no watchdog
    collective_timeout_s: float = 600.0
    # the experiment trackers, through accelerate's tracker API (accelerate.utils.LoggerType: tensorboard,
    # wandb, mlflow, comet_ml, aim, clearml, dvclive, ...): each gets the config as hyper-parameters, the logged
    # scalars, the validation metrics and the final drawings; metrics.jsonl is written whatever this says
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class EvalConfig:
    batch_size: int = 1  # images per process
    backend: str = "pycocotools"  # COCO metrics: "pycocotools" (the reference) or "faster_coco_eval" (same numbers, faster)
    num_visualize: int = 4  # validation images drawn into <output_dir>/visualizations
    visualize_score_thresh: float = 0.5


@dataclass
class Config:
    task: str = "detection"
    output_dir: str = "runs/default"
    resume: Optional[str] = None  # "auto": continue from the run's latest checkpoint if any; or a path; None/false: start anew
    seed: int = 42
    model: dict[str, Any] = field(default_factory=dict)  # validated by the task's model builder
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(UserError):
    """A config that cannot be loaded: names the file or key and, for keys, the closest valid ones."""


def _check_tracker(name: str) -> None:
    """``train.log_with`` entries: accelerate's tracker names, their packages installed."""
    known = [t.value for t in LoggerType if t.value != "all"]
    if name not in known:
        raise ConfigError(f"train.log_with: unknown tracker {name!r}; accelerate's trackers are {', '.join(known)}")
    package = {"comet_ml": "comet-ml", "mlflow": "mlflow-skinny"}.get(name, name)
    if name in LOGGER_TYPE_TO_CLASS and not _tracker_available(name):
        raise ConfigError(f"train.log_with: {name} is not installed (pip install {package}), or remove it from "
                          "train.log_with")


def _tracker_available(name: str) -> bool:
    check = getattr(accelerate_imports, f"is_{name}_available", None)
    return bool(check()) if check is not None else True


def merge_sections(base: Any, override: Any) -> Any:
    """``override`` over ``base``, key by key for mappings, whole for everything else. A mapping whose
    ``name`` differs from the base's (another backbone family, say) replaces the base's mapping whole,
    so none of the other family's keys are inherited."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return copy.deepcopy(override)
    if "name" in override and "name" in base and override["name"] != base["name"]:
        return copy.deepcopy(override)
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge_sections(base[key], value) if key in base else copy.deepcopy(value)
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``path`` with its ``_base_`` files (relative to it, a string or a list) merged underneath."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"config {path} inherits from itself through _base_: {' -> '.join(map(str, chain))}")
    if not path.is_file():
        where = f" (named by _base_ in {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge_sections(merged, _read_yaml(path.parent / base, chain + (path,)))
    return merge_sections(merged, data)


def _valid_keys(dotted_parent: str) -> list[str]:
    """The schema's keys under ``dotted_parent`` ('' for the top level)."""
    cls: Any = Config
    for part in filter(None, dotted_parent.split(".")):
        hints = typing.get_type_hints(cls)
        hint = hints.get(part)
        hint = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)  # Optional[...]
        if not dataclasses.is_dataclass(hint):
            return []
        cls = hint
    return [f.name for f in dataclasses.fields(cls)]


def _key_error(full_key: str, problem: str) -> ConfigError:
    parent, _, key = full_key.rpartition(".")
    valid = _valid_keys(parent)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr('.'.join(filter(None, [parent, c]))) for c in close)}?" if close else ""
    listing = f" (valid keys{' under ' + parent if parent else ''}: {', '.join(valid)})" if valid else ""
    return ConfigError(f"{problem} {full_key!r}{hint}{listing}")


NO_RESUME = ("false", "no", "none", "null", "")  # resume values that mean "start anew", as None does


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (with its ``_base_`` chain), apply ``key=value`` overrides, validate, and return the
    typed config."""
    raw = _read_yaml(Path(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    schema = OmegaConf.structured(Config)
    try:
        raw = merge_sections(raw, OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides))))
        config = OmegaConf.to_object(OmegaConf.merge(schema, raw))
    except (ConfigKeyError, ConfigAttributeError) as error:
        raise _key_error(str(error.full_key or error.key), f"unknown config key in {path}:") from None
    except ValidationError as error:
        raise ConfigError(f"config {path}: wrong value for {error.full_key!r}: {error.msg}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"config {path}: {error}") from None
    if str(config.resume).lower() in NO_RESUME:  # resume=false (YAML's false arrives as the string "False")
        config.resume = None
    return config


def to_yaml(config: Config) -> str:
    """The resolved config as YAML (what a run folder keeps)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def resolve_path(root: str | Path, path: str | Path) -> Path:
    """``path`` under ``root`` unless it is absolute."""
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path


def load_run(source: str | Path, weights: str | Path | None, overrides: Sequence[str] = ()) -> tuple[Config, Path | None, Path]:
    """A run folder (its ``config.yaml`` and ``model.safetensors``) or a config file with ``weights``:
    returns the config, the run folder (or None) and the weights file (checked to exist) or name (such as
    ``detectron2:COCO-Detection/faster_rcnn_R_101_C4_3x``)."""
    source = Path(source)
    run_dir = source if source.is_dir() else None
    if run_dir is not None and not (run_dir / "config.yaml").is_file():
        raise UserFileNotFoundError(f"{run_dir} is a folder without config.yaml: give a run folder or a config file")
    config = load_config(run_dir / "config.yaml" if run_dir else source, overrides)
    if weights:
        if is_weights_name(weights):  # e.g. detectron2:COCO-Detection/faster_rcnn_R_101_C4_3x, fetched by the loader
            return config, run_dir, str(weights)
        weights = Path(weights)
        if not weights.is_file():
            raise UserFileNotFoundError(f"weights file not found: {weights}")
        return config, run_dir, weights
    if run_dir is None:
        raise ConfigError(f"{source} is a config file: give the weights to use (--weights FILE)")
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise UserFileNotFoundError(f"{weights} not found: the run in {run_dir} has not finished; evaluate one of "
                                    f"its checkpoints with --weights or finish it (resume=auto)")
    return config, run_dir, weights


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
             "train.check_period": 1, "train.keep_checkpoints": 1, "train.checkpoint_period": 0, "train.eval_period": 0,
             "train.reference_batch_size": 1, "data.num_workers": 0, "eval.batch_size": 1,
             "data.min_size_test": 1, "data.max_size_test": 1, "data.max_size_train": 1,
             "data.val_split": 0, "data.pad": 0, "data.crop_size": 0, "train.backbone_lr_mult": 0}


def _value(config: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def check_config(config: Config, task: Any) -> Config:
    """Check the whole config for ``task`` (a ``tasks.engine.Task``: its ``data_formats``, ``resolve_model``
    and ``build_model`` check what only the task knows), the ``model`` section included, and return it with
    the model's defaults resolved (every value the model is built with, as the run folder keeps it).

    Fast whatever the dataset's size: nothing is read but the config, the model is built on the ``meta``
    device (no memory, no weights), no process group is started and nothing is downloaded. Every problem
    is a ``UserError`` naming the key."""
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
    for tracker in config.train.log_with:
        _check_tracker(tracker)
    if config.train.cuda_graphs and config.train.compile:
        raise ConfigError("train.cuda_graphs and train.compile: choose one (train.compile compiles the backbone "
                          "into its own graph; train.cuda_graphs captures the backbone alone and runs the heads eagerly)")
    if any(len(bucket) != 2 or min(bucket) < 1 for bucket in config.data.size_buckets):
        raise ConfigError(f"data.size_buckets must be a list of [height, width] pairs of positive sizes, got "
                          f"{config.data.size_buckets}")
    model = task.resolve_model(config.model)
    try:
        with torch.device("meta"):
            task.build_model(dataclasses.replace(config, model=model), init_weights=False)
    except UserError:
        raise
    except (ValueError, TypeError) as error:  # a head or backbone refusing a value the config gave it
        raise ConfigError(f"the model section of the config cannot be built: {error}") from error
    return dataclasses.replace(config, model=model)
