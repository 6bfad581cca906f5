"""The training loop shared by every task, on accelerate.

accelerate does the distribution (one process or many, CPU or GPU, one node or several), mixed
precision, gradient accumulation and the checkpoint state (model, optimizer, schedule, progress and
every process's RNG). The loop knows nothing about boxes or masks: a task gives it a model that returns
a dict of losses (the ``loss*`` entries are summed and optimized; any other entry, such as a training
error, is only averaged and logged), datasets, and an ``evaluate`` function.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from backbones.errors import UserError, UserFileNotFoundError

from .config import Config, TrainConfig, to_yaml
from .data import worker_leaves_stops_to_its_process
from .tasks import prepare_config

logger = logging.getLogger(__name__)


class Task(Protocol):
    """What a task gives the engine."""

    def resolve_model(self, model: dict[str, Any]) -> dict[str, Any]: ...
    def build_model(self, config: Config, init_weights: bool = True) -> nn.Module: ...
    def train_dataset(self, config: Config) -> Dataset: ...
    def val_dataset(self, config: Config) -> Dataset: ...
    def collate(self, batch: list) -> tuple[list, list]: ...
    def loss_inputs(self, batch: tuple[list, list]) -> tuple[list, list]: ...
    def evaluate(self, model: nn.Module, dataset: Dataset, accelerator: Accelerator, output_dir: Path,
                 config: Config) -> dict[str, float]: ...
    def visualize(self, model: nn.Module, dataset: Dataset, output_dir: Path, config: Config) -> None: ...
    def metadata(self, dataset: Dataset) -> dict[str, Any]: ...


class TrainingStream:
    """An endless, reproducible stream of training batches for one process.

    Each epoch is a permutation of the dataset drawn from ``(seed, epoch)``; process ``rank`` of
    ``world_size`` takes every ``world_size``-th element, so the processes see disjoint shards. Items
    are ``(index, sample_seed)`` pairs: the dataset seeds its augmentation from ``sample_seed``, so a
    resumed run sees the same images, augmented the same way, as an uninterrupted one. Batches group
    images by ``group_ids`` (aspect ratio) when given.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 group_ids: Sequence[int] | None = None):
        if num_items == 0:
            raise UserError("the training dataset is empty: no image has a usable annotation")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.group_ids = list(group_ids) if group_ids is not None else [0] * num_items

    def _items(self) -> Iterator[tuple[int, int]]:
        epoch = 0
        while True:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
            for position in range(self.rank, len(order), self.world_size):
                yield order[position], (self.seed * 1_000_003 + epoch * 7919 + position) % 2**31
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        buffers: dict[int, list[tuple[int, int]]] = {}
        for item in self._items():
            buffer = buffers.setdefault(self.group_ids[item[0]], [])
            buffer.append(item)
            if len(buffer) == self.batch_size:
                yield buffer[:]
                buffer.clear()


class _Progress:
    """The iteration counter, saved with the checkpoint state."""

    def __init__(self) -> None:
        self.iteration = 0

    def state_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.iteration = int(state["iteration"])


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


class CheckpointDir:
    """``<output_dir>/checkpoints/iter_NNNNNNN`` folders written by ``accelerator.save_state`` into a
    temporary folder first and renamed when complete, plus a ``latest`` file naming the newest; a crash
    while writing leaves the previous checkpoint and ``latest`` intact."""

    def __init__(self, output_dir: Path, keep: int):
        self.root = output_dir / "checkpoints"
        self.keep = max(keep, 1)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, accelerator: Accelerator, iteration: int) -> Path:
        final = self.root / f"iter_{iteration:07d}"
        partial = self.root / f".partial_iter_{iteration:07d}"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            tmp = self.root / ".latest.tmp"
            tmp.write_text(final.name)
            os.replace(tmp, self.root / "latest")
            for old in sorted(self.root.glob("iter_*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, float]
    iterations: int


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite: the run stops, naming the iteration, the terms and the last good checkpoint."""


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a temporary file renamed over the target)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def make_accelerator(**kwargs: Any) -> Accelerator:
    """An ``Accelerator``; on a machine without an accelerator device it is told so (``cpu=True``), which
    is what makes ``accelerate launch --multi_gpu --num_processes N`` run N gloo processes on the CPU
    instead of N unrelated single processes."""
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return Accelerator(cpu=not has_device, **kwargs)


def train(task: Task, config: Config, accelerator: Accelerator | None = None) -> TrainResult:
    """Train ``task`` as ``config`` says; see the module docstring. Returns the final metrics.

    SIGTERM or SIGINT (a cluster preempting the job, Ctrl-C) stops every process at the same iteration
    boundary, writes a checkpoint there and raises ``TrainingInterrupted``; ``resume=auto`` continues
    exactly where it stopped."""
    config = prepare_config(config)  # the model's defaults resolved: config.yaml rebuilds this very model
    cfg = config.train
    output_dir = Path(config.output_dir)
    checkpoints = CheckpointDir(output_dir, cfg.keep_checkpoints)
    resume_from = None
    if config.resume:
        resume_from = checkpoints.latest() if config.resume == "auto" else Path(config.resume)
        if resume_from is not None and not resume_from.is_dir():
            raise UserFileNotFoundError(f"resume={resume_from}: no such checkpoint folder (give one of "
                                        f"{checkpoints.root}/iter_*, or resume=auto)")
    accelerator = accelerator or make_accelerator(
        mixed_precision=cfg.mixed_precision if os.environ.get("ACCELERATE_MIXED_PRECISION") is None else None,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with="tensorboard",
        project_dir=config.output_dir,
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(to_yaml(config))
    set_seed(config.seed, device_specific=True)

    # a checkpoint to resume from replaces the backbone's initialisation: nothing fetched or read for it
    model = task.build_model(config, init_weights=resume_from is None)
    train_set, val_set = task.train_dataset(config), task.val_dataset(config)
    if accelerator.is_main_process:
        write_json(output_dir / "categories.json", task.metadata(train_set)["categories"])
    if cfg.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    total_batch = accelerator.num_processes * cfg.batch_size * cfg.grad_accum_steps
    lr = cfg.base_lr * total_batch / cfg.reference_batch_size
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias, lr, cfg.backbone_lr_mult),
                                lr=lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = _Progress()
    accelerator.register_for_checkpointing(scheduler, progress)
    logger.info(
        "training on %d process(es) x %d images x %d accumulation steps = %d images a step; learning rate "
        "%.5g = base_lr %.5g x %d / %d", accelerator.num_processes, cfg.batch_size, cfg.grad_accum_steps,
        total_batch, lr, cfg.base_lr, total_batch, cfg.reference_batch_size,
    )

    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        logger.info("resumed from %s at iteration %d", resume_from, progress.iteration)
    elif config.resume == "auto":
        logger.info("resume=auto: no checkpoint in %s yet, starting from scratch", checkpoints.root)

    groups = getattr(train_set, "aspect_groups", lambda: None)()
    stream = TrainingStream(len(train_set), cfg.batch_size, config.seed,
                            accelerator.process_index, accelerator.num_processes, groups)
    batches = iter(stream)
    for _ in range(progress.iteration * cfg.grad_accum_steps):  # a resumed run continues the same data order
        next(batches)
    loader = DataLoader(
        train_set,
        batch_sampler=_Resumed(batches),
        collate_fn=task.collate,
        num_workers=config.data.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=config.data.num_workers > 0,
        worker_init_fn=worker_leaves_stops_to_its_process,
        generator=torch.Generator().manual_seed(config.seed),  # leaves the global RNG to the training step
    )
    if accelerator.is_main_process:
        accelerator.init_trackers("tensorboard")
    metrics_log = output_dir / "metrics.jsonl"
    world: dict[str, Any] = {"world_size": accelerator.num_processes}
    seen_images: list[int] = []

    model.train()
    bar = tqdm(total=cfg.max_iters, initial=progress.iteration, disable=not accelerator.is_main_process,
               desc="train", dynamic_ncols=True, mininterval=1.0)
    window: dict[str, torch.Tensor] = {}
    window_start, window_iters = time.perf_counter(), 0
    metrics: dict[str, float] = {}
    data_iter = iter(loader)
    with StopSignals() as stop, bar:  # the bar is closed (its line ended) before any error is printed
        while progress.iteration < cfg.max_iters:
            iteration = progress.iteration
            stop_agreed = False  # every process stops after the same iteration
            for _ in range(cfg.grad_accum_steps):
                batch = next(data_iter)
                images, targets = task.loss_inputs(batch)
                if len(seen_images) < 64:
                    seen_images.extend(t.get("image_id", -1) for t in targets)
                with accelerator.accumulate(model):
                    losses = model(images, targets)  # "loss*" terms are optimized; other entries are only logged
                    loss = sum(v for k, v in losses.items() if k.startswith("loss"))
                    # one read-back per micro-batch: is the loss finite everywhere, and did any process get a stop signal
                    flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                                         torch.tensor(float(stop.requested), device=loss.device)])
                    if accelerator.num_processes > 1:
                        flags = accelerator.reduce(flags, reduction="sum")
                    non_finite, stop_flag = flags.tolist()
                    stop_agreed = stop_agreed or stop_flag > 0
                    if non_finite:
                        bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v.detach())}
                        latest = checkpoints.latest()
                        raise NonFiniteLossError(
                            f"non-finite loss at iteration {iteration}: {bad}; stopping. The last good checkpoint is "
                            f"{latest or 'none (no checkpoint written yet)'}; lower train.base_lr or raise "
                            f"train.warmup_iters and resume"
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.clip_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                for k, v in losses.items():  # summed on the device; read back only at the log period
                    window[k] = window.get(k, 0.0) + v.detach().float() / cfg.grad_accum_steps
            scheduler.step()
            progress.iteration += 1
            window_iters += 1
            bar.update(1)

            if progress.iteration % cfg.log_period == 0 or progress.iteration == cfg.max_iters:
                values = torch.stack([window[k] / window_iters for k in sorted(window)]).to(accelerator.device)
                values = accelerator.reduce(values, reduction="mean")
                scalars = dict(zip(sorted(window), values.tolist()))
                scalars["loss"] = sum(v for k, v in scalars.items() if k.startswith("loss"))
                elapsed = time.perf_counter() - window_start
                scalars.update(lr=scheduler.get_last_lr()[0], iters_per_second=window_iters / max(elapsed, 1e-9))
                if accelerator.is_main_process:
                    with open(metrics_log, "a") as f:
                        f.write(json.dumps({"iteration": progress.iteration, **scalars}) + "\n")
                    accelerator.log(scalars, step=progress.iteration)
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}", lr=f"{scalars['lr']:.2g}")
                window, window_start, window_iters = {}, time.perf_counter(), 0
            if stop_agreed and progress.iteration < cfg.max_iters:
                bar.close()
                _interrupt(accelerator, checkpoints, progress.iteration, stop, config)
            if cfg.checkpoint_period and progress.iteration % cfg.checkpoint_period == 0 and progress.iteration < cfg.max_iters:
                checkpoints.save(accelerator, progress.iteration)
            if cfg.eval_period and progress.iteration % cfg.eval_period == 0 and progress.iteration < cfg.max_iters:
                metrics = _evaluate(task, model, val_set, accelerator, output_dir, progress.iteration, config)
        bar.close()
        checkpoints.save(accelerator, progress.iteration)
    # from here on a signal stops the process as usual: the final checkpoint is written, and a run resumed from
    # it only evaluates

    world["images_per_rank"] = gather_object([seen_images[:64]])
    if accelerator.is_main_process:
        write_json(output_dir / "world.json", world)
        save_file({k: v.contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()},
                  str(output_dir / "model.safetensors"))
    metrics = _evaluate(task, model, val_set, accelerator, output_dir, progress.iteration, config)
    if accelerator.is_main_process:
        write_json(output_dir / "metrics.json", {"iteration": progress.iteration, **metrics})
        task.visualize(accelerator.unwrap_model(model), val_set, output_dir / "visualizations", config)
    accelerator.wait_for_everyone()  # no process tears the process group down while another still uses it
    accelerator.end_training()
    return TrainResult(output_dir, metrics, progress.iteration)


class TrainingInterrupted(Exception):
    """Training stopped by SIGTERM or SIGINT after a checkpoint was written at ``iteration`` on every
    process. The tools print the message and exit with ``128 + signum`` (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, iteration: int, signum: int):
        super().__init__(message)
        self.iteration, self.signum = iteration, signum


class StopSignals:
    """While active, SIGTERM and SIGINT only set ``requested`` (the signal number): the training loop
    finishes its iteration, checkpoints and stops. A second SIGINT (Ctrl-C twice) stops at once. Outside
    the main thread (where Python cannot install handlers) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        logger.warning("%s received: stopping after this iteration, with a checkpoint", signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _interrupt(accelerator: Accelerator, checkpoints: CheckpointDir, iteration: int, stop: StopSignals,
               config: Config) -> None:
    """Write the checkpoint of ``iteration`` on every process, close the logs and raise ``TrainingInterrupted``."""
    path = checkpoints.save(accelerator, iteration)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    signum = stop.requested or signal.SIGTERM  # another process got the signal: this one stops with it
    how = "run the same command to resume" if config.resume == "auto" else "run the same command with resume=auto to resume"
    raise TrainingInterrupted(f"interrupted at iteration {iteration} ({signal.Signals(signum).name}); checkpoint "
                              f"{path}; {how}", iteration, signum)


class _Resumed:
    """A batch sampler over an already-positioned batch iterator (the DataLoader asks for ``__iter__``)."""

    def __init__(self, batches: Iterator[list]):
        self.batches = batches

    def __iter__(self) -> Iterator[list]:
        return self.batches


def _evaluate(task: Task, model: nn.Module, dataset: Dataset, accelerator: Accelerator, output_dir: Path,
              iteration: int, config: Config) -> dict[str, float]:
    model.eval()
    metrics = task.evaluate(accelerator.unwrap_model(model), dataset, accelerator, output_dir, config)
    model.train()
    if accelerator.is_main_process:
        with open(output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"iteration": iteration, **{f"val/{k}": v for k, v in metrics.items()}}) + "\n")
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=iteration)
    return metrics
