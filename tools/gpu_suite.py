"""``python tools/benchmark.py --suite gpu --output DIR``: the CUDA tests and every GPU figure, one report.

Each step is a subprocess of its own (logs in ``DIR/logs``), run in this order:

1. ``tests/test_cuda.py`` (pytest, JUnit XML in ``DIR/cuda_tests.xml``);
2. training and inference of R50-FPN, R101-FPN and R101-C4 side by side with torchvision, bf16, at
   ``--size`` (default 800x1088, a COCO image at test scale, padded), with each config's own batch
   sizes (``train.batch_size``, ``eval.batch_size``);
3. the training data pipeline of R50-FPN with its ``data.num_workers`` workers, on ``datasets/coco``
   when it is there, else on the test photos (``../shared/data/tinycoco``);
4. the detection quickstart end to end (``tools/train.py configs/quickstart.yaml``): seconds and AP.

The report holds each step's command, exit code, seconds and results, the device and versions, and the
R50-FPN targets (training time_ratio <= 1/1.5, >= 60 images/s, memory_ratio <= 1.0; inference
time_ratio <= 1/1.5; data >= 2x training images/s) with the figure reached. Results of an earlier run
in the same folder are removed first. ``--device cpu`` is a dry run of the suite itself: the tests on
the CPU (``RESDET_TEST_DEVICE=cpu``), a 4-iteration quickstart.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backbones.errors import UserError
from tasks.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# (config, name) of the models the GPU suite measures against torchvision
GPU_SUITE_MODELS = [("configs/frcnn_r50.yaml", "R50-FPN"), ("configs/frcnn_r101.yaml", "R101-FPN"),
                    ("configs/frcnn_r101_c4.yaml", "R101-C4")]


@dataclass
class Suite:
    """What the steps share: the output folder, the benchmark settings, and each step's record and results."""

    out: Path
    device: str
    size: str
    dry_run: bool
    iters: int
    warmup: int
    steps: dict[str, dict] = field(default_factory=dict)
    figures: dict[str, dict | None] = field(default_factory=dict)

    def step(self, name: str, command: list[str], env: dict | None = None) -> dict:
        """Run ``python COMMAND`` in the repository, its output to ``logs/NAME.log``; its record."""
        print(f"[suite] {name}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, **(env or {})})
        (self.out / "logs" / f"{name}.log").write_text(done.stdout + done.stderr)
        self.steps[name] = {"command": " ".join(["python", *command]), "returncode": done.returncode,
                            "seconds": round(time.perf_counter() - start, 1)}
        if done.returncode:
            print(f"[suite] {name} failed (exit {done.returncode}); its log: {self.out / 'logs' / (name + '.log')}",
                  flush=True)
        return self.steps[name]


def gpu_suite(args) -> dict:
    """Run the suite (see the module docstring) and return its report."""
    suite = setup(args)
    run_cuda_tests(suite)
    run_side_by_side(suite)
    run_data_pipeline(suite)
    run_quickstart(suite)
    run_variants(suite)
    return report(suite)


def setup(args) -> Suite:
    """Check what the suite needs, clear what an earlier run wrote to ``--output`` and settle the
    iterations (default 20 and 5 warm-up on CUDA, 1 and 0 in a dry run)."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--suite gpu needs a CUDA device, and torch sees none (torch.cuda.is_available() is False); "
                        "--device cpu runs a short dry run of the suite itself")
    missing = [name for name in ("pytest", "pycocotools", "albumentations") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--suite gpu needs {', '.join(missing)}: pip install -e '.[test]'")
    if not args.output:
        raise UserError("--suite gpu writes a folder of results: give it with --output DIR")
    out = Path(args.output).resolve()
    remove_earlier_results(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    dry_run = not args.device.startswith("cuda")
    return Suite(out=out, device=args.device, size=args.size, dry_run=dry_run,
                 iters=args.iters or (1 if dry_run else 20),
                 warmup=args.warmup if args.warmup is not None else (0 if dry_run else 5))


def remove_earlier_results(out: Path) -> None:
    """Delete what this suite wrote to ``out`` before, and nothing else."""
    written = ["report.json", "cuda_tests.xml", "data_r50-fpn.json",
               *(f"{mode}_{name.lower()}.json" for _, name in GPU_SUITE_MODELS for mode in ("train", "infer")),
               *(f"train_r50-fpn_{variant}.json" for variant in VARIANTS)]
    for earlier in ("logs", "quickstart", "synthetic"):
        shutil.rmtree(out / earlier, ignore_errors=True)
    for earlier in written:
        (out / earlier).unlink(missing_ok=True)


def results_of(path: Path) -> dict | None:
    """The ``results`` of a benchmark report, ``None`` where the step wrote none."""
    return json.loads(path.read_text())["results"] if path.is_file() else None


def run_cuda_tests(suite: Suite) -> None:
    """Step 1: ``tests/test_cuda.py`` on the suite's device, each test's outcome from its JUnit XML."""
    xml = suite.out / "cuda_tests.xml"
    # one process (not the test command's pytest-xdist workers, which the GPU node may not have installed)
    tests = suite.step("cuda_tests", ["-m", "pytest", "-q", "-o", "addopts=-ra", "-p", "no:cacheprovider",
                                      "tests/test_cuda.py", f"--junitxml={xml}"], env={"RESDET_TEST_DEVICE": suite.device})
    if xml.is_file():
        cases = ElementTree.parse(xml).getroot().iter("testcase")
        tests["outcomes"] = {f"{c.get('classname', '').rsplit('.', 1)[-1]}::{c.get('name')}":
                             next((child.tag for child in c if child.tag in ("failure", "error", "skipped")), "passed")
                             for c in cases}


def run_side_by_side(suite: Suite) -> None:
    """Step 2: training, then inference, of each model against torchvision, bf16, at each config's batch size."""
    common = ["--device", suite.device, "--size", suite.size, "--iters", str(suite.iters), "--warmup", str(suite.warmup)]
    for config_file, name in GPU_SUITE_MODELS:
        config = load_config(ROOT / config_file)
        for mode, batch in (("train", config.train.batch_size), ("infer", config.eval.batch_size)):
            key = f"{mode} {name}"
            path = suite.out / f"{mode}_{name.lower()}.json"
            suite.step(key, ["tools/benchmark.py", config_file, "--mode", mode, "--compare", "torchvision",
                             "--mixed-precision", "bf16", "--batch-size", str(batch), *common, "--output", str(path)])
            suite.figures[key] = results_of(path)


def run_data_pipeline(suite: Suite) -> None:
    """Step 3: R50-FPN's training data loader, on ``datasets/coco`` where it is there, else on tinycoco."""
    coco = ROOT / "datasets" / "coco"
    data_overrides = ([f"data.root={coco}"] if (coco / "annotations").is_dir() else
                      [f"data.root={ROOT.parent / 'shared' / 'data' / 'tinycoco'}", "data.train.images=images/train2017"])
    path = suite.out / "data_r50-fpn.json"
    suite.step("data R50-FPN", ["tools/benchmark.py", "configs/frcnn_r50.yaml", "--mode", "data", *data_overrides,
                                "--iters", str(max(suite.iters, 25)), "--warmup", "5", "--batch-size", "2",
                                "--output", str(path)])
    suite.figures["data R50-FPN"] = results_of(path)


def run_quickstart(suite: Suite) -> None:
    """Step 4: the detection quickstart end to end (4 iterations in a dry run), with its metrics."""
    quick = ["tools/train.py", "configs/quickstart.yaml", f"output_dir={suite.out / 'quickstart'}",
             f"data.root={suite.out / 'synthetic'}", "resume=false"]
    quickstart = suite.step("quickstart", quick + (["train.max_iters=4", "train.checkpoint_period=0"] if suite.dry_run else []))
    metrics = suite.out / "quickstart" / "metrics.json"
    quickstart["metrics"] = json.loads(metrics.read_text()) if metrics.is_file() else None


VARIANTS = ("compiled", "cuda_graphs")  # tools/benchmark.py --compare choices: the same model, another way to run it


def run_variants(suite: Suite) -> None:
    """Step 5: R50-FPN's training step eager against ``torch.compile`` and against the CUDA-graph backbone
    (``train.cuda_graphs``), bf16, side by side. Not in a dry run: inductor's compilation takes the CPU
    minutes, and CUDA graphs need CUDA."""
    common = ["--device", suite.device, "--size", suite.size, "--iters", str(suite.iters), "--warmup", str(suite.warmup)]
    for variant in VARIANTS:
        key = f"train R50-FPN {variant}"
        if suite.dry_run:
            suite.steps[key] = {"skipped": "dry run"}
            continue
        path = suite.out / f"train_r50-fpn_{variant}.json"
        suite.step(key, ["tools/benchmark.py", "configs/frcnn_r50.yaml", "--mode", "train", "--compare", variant,
                         "--mixed-precision", "bf16", *common, "--output", str(path)])
        suite.figures[key] = results_of(path)


def figure(figures: dict, key: str, *fields: str):
    """``figures[key][field][...]``, ``None`` where any level is missing."""
    value = figures.get(key)
    for name in fields:
        value = value.get(name) if isinstance(value, dict) else None
    return value


def check_targets(figures: dict) -> dict:
    """The R50-FPN targets, each with the figure reached and whether it is met (``None``: no figure)."""
    train_rate = figure(figures, "train R50-FPN", "ours", "images_per_second")
    data_rate = figure(figures, "data R50-FPN", "images_per_second")
    targets = [  # (what, figure reached, bound, at most or at least); 1.5x the throughput is 1/1.5 the time
        ("train R50-FPN time_ratio", figure(figures, "train R50-FPN", "time_ratio"), 1 / 1.5, "at most"),
        ("train R50-FPN images/s", train_rate, 60.0, "at least"),
        ("train R50-FPN memory_ratio", figure(figures, "train R50-FPN", "memory_ratio"), 1.0, "at most"),
        ("infer R50-FPN time_ratio", figure(figures, "infer R50-FPN", "time_ratio"), 1 / 1.5, "at most"),
        ("data images/s / train images/s", data_rate / train_rate if data_rate and train_rate else None, 2.0, "at least"),
    ]
    return {what: {"figure": value, "target": f"{side} {bound:.4g}",
                   "met": None if value is None else (value <= bound if side == "at most" else value >= bound)}
            for what, value, bound, side in targets}


def report(suite: Suite) -> dict:
    """The suite's report: settings, each step's record, the figures, the targets, CUDA and cuDNN versions."""
    return {"dry_run": suite.dry_run, "iters": suite.iters, "warmup": suite.warmup, "steps": suite.steps,
            "figures": suite.figures, "targets": check_targets(suite.figures), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "all_steps_ran": all(s["returncode"] == 0 for s in suite.steps.values())}
