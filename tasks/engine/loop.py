"""The training loop shared by every task, on accelerate.

accelerate does the distribution (one process or many, CPU or GPU, one node or several), mixed
precision, gradient accumulation and the checkpoint state (model, optimizer, schedule, progress and
every process's RNG). The loop knows nothing about boxes or masks: a task gives it a model that returns
a dict of losses (the ``loss*`` entries are summed and optimized; any other entry, such as a training
error, is only averaged and logged), datasets, and an ``evaluate`` function.

``train`` reads as its three parts: ``_setup`` (model, optimizer, data, resumed state), the loop of
``_step`` (one optimizer step over ``grad_accum_steps`` micro-batches) and ``_periodic`` (log, stop,
checkpoint, evaluate: every action taken at an iteration boundary), then ``_finish`` (final weights,
evaluation, pictures).

Of its own (the model has others), the loop makes the host wait for the device at two reads: the log line
(the window's losses, every ``log_period``) and the finite-loss and stop check (``_check_finite_and_stop``).
By default (``train.check_period: 1``) the check reads every micro-batch, before its backward; with
``check_period: N`` the non-finite micro-batches are counted on the device and read back (and all-reduced)
once in N iterations, at the last micro-batch of the iteration, and at every iteration that logs,
checkpoints or evaluates and at the last (``_check_due``): a non-finite loss is found up to N - 1
iterations late, named with the iterations since the check before, and never after a checkpoint (no
checkpoint holds weights it reached); a stop signal is honoured at the next check.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object, set_seed
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from backbones.errors import TrainingInterrupted, UserError, UserFileNotFoundError
from tasks.config import Config, TrainConfig, check_config, to_yaml
from tasks.data.images import worker_leaves_stops_to_its_process
from tasks.modeling.compiling import capture_cuda_graphs, compile_model, compiled_graphs

from .checkpoints import MANIFEST, CheckpointDir, verify, write_json
from .cluster import Watchdog, join_process_group, start_number
from .protocol import Task
from .schedules import lr_lambda, param_groups
from .signals import StopSignals
from .stream import Resumed, TrainingStream
from .trackers import log_drawings, start_trackers

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, float]
    iterations: int


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite: the run stops, naming the iteration, the terms and the last good checkpoint."""


def make_accelerator(collective_timeout_s: float = 0.0, **kwargs: Any) -> Accelerator:
    """An ``Accelerator``; on a machine without an accelerator device it is told so (``cpu=True``), which
    is what makes ``accelerate launch --multi_gpu --num_processes N`` run N gloo processes on the CPU
    instead of N unrelated single processes. ``collective_timeout_s`` > 0: the process group's timeout."""
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if collective_timeout_s > 0:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))]
    device = torch.accelerator.current_accelerator().type if has_device and hasattr(torch, "accelerator") else \
        ("cuda" if has_device else "cpu")
    join_process_group(device, timedelta(seconds=collective_timeout_s or 1800))  # a restarted worker's
    return Accelerator(cpu=not has_device, **kwargs)


class _Progress:
    """The iteration counter, saved with the checkpoint state."""

    def __init__(self) -> None:
        self.iteration = 0

    def state_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.iteration = int(state["iteration"])


@dataclass
class _Window:
    """The loss terms summed since the last log line, on the device (read back only at the log period)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    iterations: int = 0
    start: float = field(default_factory=time.perf_counter)
    data_seconds: float = 0.0  # waited for the loader's batches (the host's clock: no device read)


@dataclass
class _Checks:
    """The finite-loss and stop check's state: the micro-batches whose loss was non-finite since the last read-back,
    counted on the device, and the first iteration not read back yet."""

    since: int = 1
    non_finite: torch.Tensor | float = 0.0


@dataclass
class _Run:
    """What the steps of one training run share."""

    task: Task
    config: Config
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    progress: _Progress
    checkpoints: CheckpointDir
    val_set: Dataset
    batches: Iterator[tuple[list, list]]
    loader: DataLoader | None = None  # the training batches' loader (its batch sampler knows which images they hold)
    batches_read: int = 0
    seen_images: list[int] = field(default_factory=list)  # the first image ids of this process (world.json)
    window: _Window = field(default_factory=_Window)
    checks: _Checks = field(default_factory=_Checks)
    watchdog: Watchdog | None = None  # set while the loop runs

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


def train(task: Task, config: Config, accelerator: Accelerator | None = None) -> TrainResult:
    """Train ``task`` as ``config`` says; see the module docstring. Returns the final metrics.

    SIGTERM or SIGINT (a cluster preempting the job, Ctrl-C) stops every process at the same iteration
    boundary (that of the next check: within ``train.check_period`` iterations), writes a checkpoint there and
    raises ``TrainingInterrupted``; ``resume=auto`` continues exactly where it stopped."""
    config = check_config(config, task)  # the model's defaults resolved: config.yaml rebuilds this very model
    checkpoints = CheckpointDir(Path(config.output_dir), config.train.keep_checkpoints)
    accelerator = accelerator or _accelerator_for(config)
    resume_from = _resume_point(config, checkpoints, accelerator.is_main_process)
    run = _setup(task, config, accelerator, checkpoints, resume_from)
    cfg, progress = config.train, run.progress
    bar = tqdm(total=cfg.max_iters, initial=progress.iteration, disable=not run.accelerator.is_main_process,
               desc="train", dynamic_ncols=True, mininterval=1.0)
    with Watchdog(accelerator, cfg.collective_timeout_s, checkpoints.latest) as run.watchdog:
        with StopSignals() as stop, bar:  # the bar is closed (its line ended) before any error is printed
            try:
                while progress.iteration < cfg.max_iters:
                    stop_agreed = _step(run, stop)
                    run.scheduler.step()
                    progress.iteration += 1
                    run.watchdog.mark(progress.iteration)
                    run.window.iterations += 1
                    bar.update(1)
                    _periodic(run, bar, stop if stop_agreed else None)
            except RuntimeError as error:  # the DataLoader's own words for a lost worker or a stalled read
                data_fault = _data_fault(run, error)
                if data_fault is None:
                    raise
                raise data_fault from error
            bar.close()
            checkpoints.save(run.accelerator, progress.iteration)
        # from here on a signal stops the process as usual: the final checkpoint is written, and a run resumed
        # from it only evaluates
        return _finish(run)


def _resume_point(config: Config, checkpoints: CheckpointDir, report: bool) -> Path | None:
    """The checkpoint folder ``config.resume`` names, verified against its manifest: ``auto``, the newest
    intact one if any (a damaged newer one is skipped with a warning); a path, that one or an error."""
    restart = start_number() - 1
    if restart and config.resume != "auto":  # accelerate launch --max_restarts: the workers were restarted
        logger.warning("restart %d of the workers (accelerate launch --max_restarts): resuming from the newest "
                       "intact checkpoint in %s (resume=auto)", restart, checkpoints.root)
        config.resume = "auto"
    if not config.resume:
        return None
    if config.resume == "auto":
        return checkpoints.latest_good(report)
    resume_from = Path(config.resume)
    if not resume_from.is_dir():
        raise UserFileNotFoundError(f"resume={resume_from}: no such checkpoint folder (give one of "
                                    f"{checkpoints.root}/iter_*, or resume=auto)")
    problem = verify(resume_from) if (resume_from / MANIFEST).exists() else None
    if problem:
        raise UserError(f"resume={resume_from}: the checkpoint is damaged ({problem}); give an earlier one, or "
                        f"resume=auto to take the newest intact one")
    return resume_from


def _accelerator_for(config: Config) -> Accelerator:
    cfg = config.train
    return make_accelerator(
        cfg.collective_timeout_s,  # a collective that every process waits in (a deadlock) raises after it
        mixed_precision=cfg.mixed_precision if os.environ.get("ACCELERATE_MIXED_PRECISION") is None else None,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=list(cfg.log_with) or None,
        project_dir=config.output_dir,
    )


def _setup(task: Task, config: Config, accelerator: Accelerator, checkpoints: CheckpointDir,
           resume_from: Path | None) -> _Run:
    """The run folder's config, the model and its optimizer (prepared by accelerate, resumed where asked)
    and the training batches, positioned where the run stands."""
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(to_yaml(config))
    set_seed(config.seed, device_specific=True)
    # a checkpoint to resume from replaces the initial weights: nothing fetched or read for them
    model = task.build_model(config, init_weights=resume_from is None)
    train_set, val_set = task.train_dataset(config), task.val_dataset(config)
    if accelerator.is_main_process:
        write_json(output_dir / "categories.json", task.metadata(train_set)["categories"])
    if config.train.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = _optimizer(model, config.train, accelerator.num_processes)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.train))
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.train.compile:  # after prepare (a DDP wrapper's own module is compiled); checkpoints hold the model
        # with size buckets every graph is of one static shape; without, dynamo makes the shapes symbolic
        model = compile_model(model, dynamic=False if config.data.size_buckets else None)
    if config.train.cuda_graphs:
        if accelerator.device.type != "cuda":
            raise UserError(f"train.cuda_graphs captures CUDA graphs: it needs a CUDA device, this run has "
                            f"{accelerator.device}")
        model = capture_cuda_graphs(model)
    progress = _Progress()
    accelerator.register_for_checkpointing(scheduler, progress)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        logger.info("resumed from %s at iteration %d", resume_from, progress.iteration)
        if accelerator.is_main_process:
            _forget_after(output_dir / "metrics.jsonl", progress.iteration)
    elif config.resume == "auto":
        logger.info("resume=auto: no checkpoint in %s yet, starting from scratch", checkpoints.root)
    batches = _loader(task, train_set, config, accelerator, progress.iteration)
    start_trackers(config, accelerator, resumed=resume_from is not None)
    model.train()
    return _Run(task, config, accelerator, model, optimizer, scheduler, progress, checkpoints, val_set, iter(batches),
                batches,
                checks=_Checks(since=progress.iteration + 1))


def _forget_after(log: Path, iteration: int) -> None:
    """Drop the lines of ``log`` (``metrics.jsonl``) after ``iteration``: those of iterations run past the
    checkpoint resumed from (before a crash, or a damaged newer checkpoint), which this run logs again, and a
    line cut short by a crash while it was written."""
    if not log.is_file():
        return
    lines = log.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _logged_iteration(line) <= iteration]
    if len(kept) < len(lines):
        tmp = log.with_name(f".{log.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, log)
        logger.info("%s: %d lines after iteration %d dropped (logged again from the checkpoint)", log,
                    len(lines) - len(kept), iteration)


def _logged_iteration(line: str) -> float:
    """The iteration of a ``metrics.jsonl`` line; infinite for a line that is not whole (never kept)."""
    try:
        return json.loads(line).get("iteration", 0) if line.endswith("\n") else float("inf")
    except ValueError:
        return float("inf")


def _optimizer(model: nn.Module, cfg: TrainConfig, num_processes: int) -> torch.optim.Optimizer:
    """SGD with momentum at ``base_lr`` scaled linearly from ``reference_batch_size`` to the real total batch."""
    total_batch = num_processes * cfg.batch_size * cfg.grad_accum_steps
    lr = cfg.base_lr * total_batch / cfg.reference_batch_size
    logger.info(
        "training on %d process(es) x %d images x %d accumulation steps = %d images a step; learning rate "
        "%.5g = base_lr %.5g x %d / %d", num_processes, cfg.batch_size, cfg.grad_accum_steps,
        total_batch, lr, cfg.base_lr, total_batch, cfg.reference_batch_size,
    )
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias, lr, cfg.backbone_lr_mult)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def _loader(task: Task, train_set: Dataset, config: Config, accelerator: Accelerator, iteration: int) -> DataLoader:
    """This process's training batches (``TrainingStream``), starting after the ``iteration`` steps done."""
    cfg = config.train
    groups = getattr(train_set, "aspect_groups", lambda: None)()
    stream = iter(TrainingStream(len(train_set), cfg.batch_size, config.seed,
                                 accelerator.process_index, accelerator.num_processes, groups))
    for _ in range(iteration * cfg.grad_accum_steps):  # a resumed run continues the same data order
        next(stream)
    return DataLoader(
        train_set,
        batch_sampler=Resumed(stream),
        collate_fn=task.collate,
        num_workers=config.data.num_workers,
        timeout=config.data.timeout_s if config.data.num_workers > 0 else 0,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=config.data.num_workers > 0,
        worker_init_fn=worker_leaves_stops_to_its_process,
        generator=torch.Generator().manual_seed(config.seed),  # leaves the global RNG to the training step
    )


def _step(run: _Run, stop: StopSignals) -> bool:
    """One optimizer step over ``grad_accum_steps`` micro-batches; returns whether any process was asked to
    stop (every process stops after the same iteration). Each micro-batch's non-finite flag is counted on the
    device; in an iteration where ``_check_due``, the counts are read back before the backward of every
    micro-batch (``check_period`` 1) or of the last one."""
    cfg, accelerator, model = run.config.train, run.accelerator, run.model
    due = _check_due(cfg, run.progress.iteration + 1)
    stop_agreed = False
    for micro in range(cfg.grad_accum_steps):
        waited = time.perf_counter()
        images, targets = run.task.loss_inputs(next(run.batches))
        run.window.data_seconds += time.perf_counter() - waited
        run.batches_read += 1
        run.watchdog.mark(run.progress.iteration)
        if len(run.seen_images) < 64:
            run.seen_images.extend(t.get("image_id", -1) for t in targets)
        with accelerator.accumulate(model):
            if cfg.cuda_graphs:  # the last replay's outputs are done with: the next may reuse their memory
                torch.compiler.cudagraph_mark_step_begin()
            losses = model(images, targets)  # "loss*" terms are optimized; other entries are only logged
            loss = sum(v for k, v in losses.items() if k.startswith("loss"))
            run.checks.non_finite = run.checks.non_finite + (~torch.isfinite(loss.detach())).float()
            if due and (cfg.check_period == 1 or micro == cfg.grad_accum_steps - 1):
                stop_agreed = _check_finite_and_stop(run, losses, stop) or stop_agreed
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.clip_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad()
        sums = run.window.sums
        for k, v in losses.items():  # summed on the device; read back only at the log period
            sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.grad_accum_steps
    return stop_agreed


class DataLoaderFault(UserError):
    """A DataLoader worker died (most often the out-of-memory killer) or a batch did not come in
    ``data.timeout_s``: the run stops, naming the worker or the images and the last checkpoint."""


def _data_fault(run: _Run, error: RuntimeError) -> DataLoaderFault | None:
    """The one-line error for the DataLoader's ``RuntimeError`` of a lost worker or a timed-out batch (``None``
    for any other error)."""
    message, cfg = str(error), run.config
    latest = run.checkpoints.latest()
    resume = f"the last checkpoint is {latest or 'none (no checkpoint written yet)'} (resume=auto continues from it)"
    where = f"at iteration {run.progress.iteration + 1}"
    if message.startswith("DataLoader timed out"):
        batch = run.loader.batch_sampler.given(run.batches_read)
        describe = getattr(run.loader.dataset, "describe", str)
        images = ", ".join(describe(item[0] if isinstance(item, tuple) else item) for item in batch or [])
        return DataLoaderFault(
            f"data loading stalled {where}: no batch in data.timeout_s={cfg.data.timeout_s:g} s; the batch being read "
            f"holds {images or 'images no longer known'}: a file system that does not answer (a network mount?) or "
            f"a read that never returns; {resume}")
    if message.startswith("DataLoader worker") and ("killed by signal" in message or "exited unexpectedly" in message):
        what = message.rstrip(".").replace("DataLoader worker", "a data loader worker", 1)
        return DataLoaderFault(
            f"{what} {where}: most likely the out-of-memory killer (the system log names it): lower "
            f"data.num_workers (now {cfg.data.num_workers}) or train.batch_size (now {cfg.train.batch_size}), or "
            f"give the job more memory; {resume}")
    return None


def _check_due(cfg: TrainConfig, iteration: int) -> bool:
    """Whether ``iteration`` (counted from 1, as logged and checkpointed) reads the check's flags back: every
    ``check_period``-th, the last, and every one that logs, checkpoints or evaluates (``_periodic``), so no
    checkpoint or evaluation ever sees weights that an unchecked non-finite loss reached."""
    periods = (cfg.check_period, cfg.log_period, cfg.checkpoint_period, cfg.eval_period)
    return iteration == cfg.max_iters or any(p and iteration % p == 0 for p in periods)


def _check_finite_and_stop(run: _Run, losses: dict[str, torch.Tensor], stop: StopSignals) -> bool:
    """One read-back of the flags counted since the last check: was the loss finite on every process at every
    micro-batch (else ``NonFiniteLossError``), and did any process get a stop signal (returned)."""
    checks, iteration = run.checks, run.progress.iteration + 1
    flags = torch.stack([checks.non_finite, torch.tensor(float(stop.requested), device=checks.non_finite.device)])
    if run.accelerator.num_processes > 1:
        flags = run.accelerator.reduce(flags, reduction="sum")
    non_finite, stop_flag = flags.tolist()
    if non_finite:
        raise _non_finite_error(run, losses)
    checks.non_finite, checks.since = 0.0, iteration + 1
    return stop_flag > 0


def _non_finite_error(run: _Run, losses: dict[str, torch.Tensor]) -> NonFiniteLossError:
    """The error naming the iterations since the last check, the non-finite terms this process saw (this
    micro-batch's, else the window's sums, which the checks before found finite) and the last good checkpoint."""
    iteration = run.progress.iteration + 1
    first = min(run.checks.since, iteration)
    where = (f"at iteration {iteration}" if first == iteration else
             f"between iterations {first} and {iteration} (found by the check at iteration {iteration}, "
             f"train.check_period={run.config.train.check_period})")
    terms = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v.detach())}
    found = str(terms)
    if not terms:  # an earlier micro-batch's loss: its terms are in the window's sums
        sums = {k: float(v) for k, v in run.window.sums.items() if not torch.isfinite(v)}
        found = f"{sums} (summed since iteration {iteration - run.window.iterations})" if sums else "on another process"
    latest = run.checkpoints.latest()
    return NonFiniteLossError(
        f"non-finite loss {where}: {found}; stopping. The last good checkpoint is "
        f"{latest or 'none (no checkpoint written yet)'}; lower train.base_lr or raise "
        f"train.warmup_iters and resume"
    )


def _periodic(run: _Run, bar: tqdm, stop: StopSignals | None) -> None:
    """Everything done at an iteration boundary: the log line, the stop every process agreed on
    (``stop``: a checkpoint, then ``TrainingInterrupted``), the periodic checkpoint and evaluation. Each of these
    iterations was checked (``_check_due``) in its ``_step``."""
    cfg, iteration = run.config.train, run.progress.iteration
    last = iteration == cfg.max_iters
    if iteration % cfg.log_period == 0 or last or stop is not None:  # a stopped run logs its partial window
        _log(run, bar)
    if stop is not None and not last:
        bar.close()
        _interrupt(run, stop)
    if cfg.checkpoint_period and iteration % cfg.checkpoint_period == 0 and not last:
        run.checkpoints.save(run.accelerator, iteration)
    if cfg.eval_period and iteration % cfg.eval_period == 0 and not last:
        _evaluate(run)


def _log(run: _Run, bar: tqdm) -> None:
    """The window's mean losses over processes, the learning rate and the speed: ``metrics.jsonl``,
    TensorBoard and the progress bar; then a new window."""
    accelerator, window = run.accelerator, run.window
    keys = sorted(window.sums)
    values = torch.stack([window.sums[k] / window.iterations for k in keys]).to(accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    scalars = dict(zip(keys, values.tolist()))
    scalars["loss"] = sum(v for k, v in scalars.items() if k.startswith("loss"))
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    cfg = run.config.train
    images = window.iterations * cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes
    scalars.update(lr=run.scheduler.get_last_lr()[0], iters_per_second=window.iterations / elapsed,
                   images_per_second=images / elapsed, data_wait=window.data_seconds / elapsed)
    if accelerator.device.type == "cuda":  # this process's peak since the last log line
        scalars["gpu_memory_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    if run.config.train.compile:  # how many graphs the run has compiled so far (data.size_buckets bounds them)
        scalars["compiled_graphs"] = compiled_graphs()
    if accelerator.is_main_process:
        with open(run.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"iteration": run.progress.iteration, **scalars}) + "\n")
        accelerator.log(scalars, step=run.progress.iteration)
        postfix = {"loss": f"{scalars['loss']:.3f}", "lr": f"{scalars['lr']:.2g}",
                   "img/s": f"{scalars['images_per_second']:.1f}", "data": f"{scalars['data_wait']:.0%}"}
        if "gpu_memory_gb" in scalars:
            postfix["mem"] = f"{scalars['gpu_memory_gb']:.1f}G"
        bar.set_postfix(postfix)
    run.window = _Window()


def _interrupt(run: _Run, stop: StopSignals) -> None:
    """Write the checkpoint of this iteration on every process, close the logs and raise ``TrainingInterrupted``."""
    accelerator, iteration = run.accelerator, run.progress.iteration
    path = run.checkpoints.save(accelerator, iteration)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    signum = stop.requested or signal.SIGTERM  # another process got the signal: this one stops with it
    how = ("run the same command to resume" if run.config.resume == "auto"
           else "run the same command with resume=auto to resume")
    raise TrainingInterrupted(f"interrupted at iteration {iteration} ({signal.Signals(signum).name}); checkpoint "
                              f"{path}; {how}", iteration, signum)


def _evaluate(run: _Run) -> dict[str, float]:
    """The task's evaluation of the validation set, logged as ``val/...`` at this iteration."""
    accelerator, model = run.accelerator, run.model
    model.eval()
    metrics = run.task.evaluate(_plain(run), run.val_set, accelerator, run.output_dir, run.config)
    model.train()
    if accelerator.is_main_process:
        with open(run.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"iteration": run.progress.iteration,
                                **{f"val/{k}": v for k, v in metrics.items()}}) + "\n")
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=run.progress.iteration)
    return metrics


def _plain(run: _Run) -> nn.Module:
    """The model itself: without the DDP wrapper and without a whole-model ``torch.compile`` wrapper (its state
    dict's names are the model's own). A detector compiled in place (its ``network``) stays so: its
    evaluation runs the compiled network."""
    return run.accelerator.unwrap_model(run.model, keep_torch_compile=False)


def _finish(run: _Run) -> TrainResult:
    """The final weights (``model.safetensors``), evaluation (``metrics.json``) and pictures; then the
    process group is closed."""
    accelerator, output_dir, iteration = run.accelerator, run.output_dir, run.progress.iteration
    world = {"world_size": accelerator.num_processes, "images_per_rank": gather_object([run.seen_images[:64]])}
    if accelerator.is_main_process:
        write_json(output_dir / "world.json", world)
        save_file({k: v.contiguous() for k, v in _plain(run).state_dict().items()},
                  str(output_dir / "model.safetensors"))
    metrics = _evaluate(run)
    if accelerator.is_main_process:
        write_json(output_dir / "metrics.json", {"iteration": iteration, **metrics})
        run.task.visualize(_plain(run), run.val_set, output_dir / "visualizations", run.config)
        log_drawings(accelerator, output_dir / "visualizations", iteration)
    accelerator.wait_for_everyone()  # no process tears the process group down while another still uses it
    accelerator.end_training()
    return TrainResult(output_dir, metrics, iteration)
