"""Training engine: a few iterations, checkpoints, exact resume, non-finite losses, the check period (its
host reads, late non-finite losses, stops), 2-process training and evaluation, eval of results files against
pycocotools' official numbers, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY, free_port
from safetensors.torch import load_file

from backbones.errors import TrainingInterrupted
from tasks.config import load_config
from tasks.engine import NonFiniteLossError, loop, train
from tasks.registry import get_task

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "data" / "coco_eval_reference"


def run(shapes, out, *overrides, task=None):
    config = load_config(ROOT / "configs" / "quickstart.yaml",
                         [*TINY, f"data.root={shapes}", f"output_dir={out}", *overrides])
    return train(task or get_task(config.task), config)


def with_training_hook(hook):
    """The detection task, its models passing each training forward's losses with the call's number (from 1)
    to ``hook``: what it returns, if anything, replaces them."""
    task, calls = get_task("detection"), [0]
    build = task.build_model

    def forward_hook(module, args, losses):
        if module.training:
            calls[0] += 1
            return hook(calls[0], losses)

    def build_model(config, init_weights=True):
        model = build(config, init_weights)
        model.register_forward_hook(forward_hook)
        return model

    task.build_model = build_model
    return task


def losses(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_train_checkpoint_and_exact_resume(shapes, tmp_path):
    full = run(shapes, tmp_path / "full", "train.max_iters=6", "train.checkpoint_period=3")
    assert full.iterations == 6
    for name in ("config.yaml", "model.safetensors", "metrics.json", "metrics.jsonl", "categories.json",
                 "coco_results.json", "world.json", "per_category.json"):
        assert (tmp_path / "full" / name).is_file(), name
    assert list((tmp_path / "full" / "visualizations").glob("*.png"))
    assert (tmp_path / "full" / "checkpoints" / "latest").read_text() == "iter_0000006"
    assert "bbox/AP" in json.loads((tmp_path / "full" / "metrics.json").read_text())
    per_category = json.loads((tmp_path / "full" / "per_category.json").read_text())["bbox"]
    assert [row["name"] for row in per_category] == ["circle", "square", "triangle"]

    run(shapes, tmp_path / "resumed", "train.max_iters=3")  # stops after iteration 3 ...
    # ... a crash while writing the next checkpoint leaves a partial folder behind, never a broken latest
    (tmp_path / "resumed" / "checkpoints" / ".partial_iter_0000004").mkdir()
    resumed = run(shapes, tmp_path / "resumed", "train.max_iters=6")  # resume=auto continues
    assert resumed.iterations == 6
    expected = {r["iteration"]: r["loss"] for r in losses(tmp_path / "full")}
    got = {r["iteration"]: r["loss"] for r in losses(tmp_path / "resumed")}
    for iteration in (4, 5, 6):
        assert got[iteration] == pytest.approx(expected[iteration], rel=1e-5), iteration


def test_non_finite_loss_stops_naming_iteration_and_term(shapes, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at iteration \d+: \{'loss_.*checkpoint"):
        run(shapes, tmp_path / "nan", "train.max_iters=50", "train.base_lr=1e12", "train.warmup_iters=0",
            "train.checkpoint_period=1")
    assert (tmp_path / "nan" / "checkpoints" / "latest").is_file()  # the last good checkpoint is kept


NO_PERIODIC_READS = ("train.log_period=100", "train.checkpoint_period=0")  # only the check period's reads


@pytest.mark.parametrize("nan_in", ["value", "gradients"])
def test_a_check_period_finds_a_non_finite_loss_at_the_next_check_before_any_checkpoint(shapes, tmp_path, nan_in):
    """train.check_period=4, a checkpoint every 3: iteration 6 is checked (it checkpoints) and a loss made
    non-finite at iteration 7 (its value only, or its gradients too: the optimizer step makes the weights NaN)
    is found by the check at 8, before the checkpoint of 9: the error names 7 to 8 and the latest checkpoint is
    iteration 6's, finite."""
    def nan_at_7(n, losses):
        if n == 7:
            key = sorted(k for k in losses if k.startswith("loss"))[0]
            bad = losses[key] + float("nan") if nan_in == "value" else losses[key] * float("nan")
            return {**losses, key: bad}

    out = tmp_path / nan_in
    expected = r"non-finite loss between iterations 7 and 8 \(found by the check at iteration 8, train.check_period=4\): \{'loss_"
    with pytest.raises(NonFiniteLossError, match=expected) as error:
        run(shapes, out, *NO_PERIODIC_READS, "train.max_iters=12", "train.check_period=4", "train.checkpoint_period=3",
            task=with_training_hook(nan_at_7))
    assert f"The last good checkpoint is {out / 'checkpoints' / 'iter_0000006'};" in str(error.value)
    if nan_in == "value":  # iteration 8's loss is finite: the term is found in the sums since the last log line
        assert "(summed since iteration 1)" in str(error.value)
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "iter_0000006"
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == ["iter_0000003", "iter_0000006"]
    weights = load_file(checkpoints / "iter_0000006" / "model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("overrides, checked", [
    (["train.check_period=1"], list(range(1, 11))),
    (["train.check_period=1", "train.grad_accum_steps=2"], [i for i in range(1, 11) for _ in "ab"]),  # every micro-batch
    (["train.check_period=4"], [4, 8, 10]),  # and the last iteration
    (["train.check_period=4", "train.grad_accum_steps=2"], [4, 8, 10]),  # at the last micro-batch only
    (["train.check_period=4", "train.log_period=3", "train.eval_period=5", "train.checkpoint_period=9"],
     [3, 4, 5, 6, 8, 9, 10]),  # and wherever a log line, an evaluation or a checkpoint follows
])
def test_the_check_reads_the_device_once_in_check_period_iterations(shapes, tmp_path, monkeypatch, overrides, checked):
    """The flags are read back (``tolist``) once per check, at the iterations the check period and the periodic
    reads say; the loop's only other reads are its log lines'."""
    reads, checks = Counter(), []
    tolist, check = torch.Tensor.tolist, loop._check_finite_and_stop

    def counted_tolist(self):
        reads[sys._getframe(1).f_code.co_name] += 1
        return tolist(self)

    def counted_check(run, *args):
        checks.append(run.progress.iteration + 1)
        return check(run, *args)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    monkeypatch.setattr(loop, "_check_finite_and_stop", counted_check)
    run(shapes, tmp_path / "run", *NO_PERIODIC_READS, "train.max_iters=10", *overrides)
    assert checks == checked
    assert reads["_check_finite_and_stop"] == len(checked)
    assert reads["_log"] == len(losses(tmp_path / "run")) and not {"_step", "_periodic", "train"} & set(reads)


def test_a_stop_signal_with_a_check_period_stops_at_the_next_check_and_resumes_exactly(shapes, tmp_path, monkeypatch):
    """SIGTERM during iteration 6 with train.check_period=4 (and a log line every 5): the run stops at the next
    check, iteration 8, with its checkpoint; resumed, it ends with the weights and metrics of an uninterrupted run."""
    stops = []

    class RecordedStopSignals(loop.StopSignals):
        def __enter__(self):
            stops.append(self)
            return super().__enter__()

    def sigterm_at_6(n, losses):
        if n == 6:
            stops[-1]._handle(signal.SIGTERM, None)  # what the signal handler does, whatever thread runs the test

    monkeypatch.setattr(loop, "StopSignals", RecordedStopSignals)
    common = ("train.max_iters=10", "train.check_period=4", "train.log_period=5", "train.checkpoint_period=0")
    reference = run(shapes, tmp_path / "reference", *common)
    with pytest.raises(TrainingInterrupted, match=r"interrupted at iteration 8 \(SIGTERM\)") as stopped:
        run(shapes, tmp_path / "stopped", *common, task=with_training_hook(sigterm_at_6))
    assert stopped.value.iteration == 8
    assert (tmp_path / "stopped" / "checkpoints" / "latest").read_text() == "iter_0000008"
    assert [r["iteration"] for r in losses(tmp_path / "stopped")] == [5, 8]  # the partial window 6..8 logged
    resumed = run(shapes, tmp_path / "stopped", *common)
    assert [r["iteration"] for r in losses(tmp_path / "stopped")] == [5, 8, 10]  # no gap, no repeated point
    assert resumed.iterations == 10 and resumed.metrics == pytest.approx(reference.metrics, abs=1e-6)
    got, expected = (load_file(tmp_path / name / "model.safetensors") for name in ("stopped", "reference"))
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def launch(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch",
                           "--main_process_port", str(free_port()), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_two_process_training_and_evaluation(shapes, tmp_path):
    """A Mask R-CNN (the detector with its mask head: boxes and masks both) trained and evaluated by two
    processes: disjoint shards, and the same metrics and results as one process."""
    out = tmp_path / "ddp"
    result = launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no", "tools/train.py", "configs/quickstart.yaml", *TINY,
                    f"data.root={shapes}", f"output_dir={out}", "train.max_iters=3", "model.masks=true",
                    "model.mask_head.conv_dim=16")
    assert result.returncode == 0, result.stderr[-3000:]
    # every parameter's gradient has the parameter's strides (DDP warns and copies otherwise), and the
    # processes other than the main one log warnings only
    assert "Grad strides do not match" not in result.stderr
    assert result.stderr.count("training on 2 process(es)") == 1
    world = json.loads((out / "world.json").read_text())
    assert world["world_size"] == 2
    rank0, rank1 = world["images_per_rank"]
    assert rank0 and rank1 and not set(rank0[:4]) & set(rank1[:4])  # each rank read its own shard first

    # 5 validation images over 2 processes: the metrics equal a 1-process evaluation of the same weights
    two = launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "tools/eval.py", str(out), "--output-dir", str(tmp_path / "eval2"))
    assert two.returncode == 0, two.stderr[-3000:]
    from tools.eval import main as evaluate  # one process: this one

    assert evaluate([str(out), "--output-dir", str(tmp_path / "eval1")]) == 0
    metrics1 = json.loads((tmp_path / "eval1" / "metrics.json").read_text())
    metrics2 = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert metrics1 == metrics2 and "segm/AP" in metrics1 and "bbox/AP" in metrics1
    results1 = json.loads((tmp_path / "eval1" / "coco_results.json").read_text())
    results2 = json.loads((tmp_path / "eval2" / "coco_results.json").read_text())
    key = lambda r: (r["image_id"], r["score"], r["category_id"])  # noqa: E731
    assert sorted(results1, key=key) == sorted(results2, key=key)
    assert {r["image_id"] for r in results2} <= set(range(1, 6)) and len(results2) == len(results1)
    assert all("counts" in r["segmentation"] for r in results2)  # the masks as RLE


@pytest.mark.parametrize("iou_type, expected", [
    ("bbox", (0.5045806987249628, 0.6969727247299577, 0.5729816669904824)),
    ("segm", (0.3195452758576433, 0.5622883972521636, 0.29892653412086784)),
])
def test_eval_of_a_results_file_gives_the_official_numbers(tmp_path, iou_type, expected, capsys):
    from tools.eval import main

    assert main(["--annotations", str(REFERENCE / "instances_val2014_100.json"), "--results",
                 str(REFERENCE / f"instances_val2014_fake{iou_type}100_results.json"), "--iou-type", iou_type,
                 "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert (metrics[f"{iou_type}/AP"], metrics[f"{iou_type}/AP50"], metrics[f"{iou_type}/AP75"]) == expected
    # per category: the categories with ground truth average to the summary (the same accumulated precision)
    per_category = json.loads((tmp_path / "per_category.json").read_text())[iou_type]
    for key in ("AP", "AP50", "AP75"):
        values = [row[key] for row in per_category if row[key] is not None]
        assert abs(sum(values) / len(values) - metrics[f"{iou_type}/{key}"]) <= 1e-12
    assert len(per_category) == 80 and {"category_id", "name"} <= set(per_category[0])
    output = capsys.readouterr().out
    assert f"{iou_type} per category:" in output and "pr_curves.png" in output
    assert (tmp_path / "pr_curves.png").stat().st_size > 10_000
    printed = [line for line in output.splitlines() if line.startswith(" Average")]
    reference = (REFERENCE / "val2014_fake_eval_res.txt").read_text()
    assert len(printed) == 12
    for line in printed:
        assert line.split("=")[-1].strip() in reference


def test_bad_input_names_the_problem(shapes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    first = sorted((data / "train2017").glob("*.jpg"))[0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=f"{first.name} \\(image id 1, listed in .*instances_train2017.json\\)"):
        run(data, tmp_path / "missing", "train.max_iters=12")
    shutil.copy(shapes / "train2017" / first.name, first)
    first.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=f"cannot decode image .*{first.name}"):
        run(data, tmp_path / "corrupt", "train.max_iters=12")
    (data / "annotations" / "instances_train2017.json").write_text(json.dumps({"not": "coco"}))
    with pytest.raises(ValueError, match="instances_train2017.json is not a COCO instances file"):
        run(data, tmp_path / "notcoco", "train.max_iters=1")
    from tools.train import main

    assert main([str(ROOT / "configs" / "quickstart.yaml"), "train.max_iter=3"]) == 2  # typo: error, no run


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_faster_coco_eval_backend_equals_pycocotools(iou_type, capsys):
    """The optional faster-coco-eval backend gives pycocotools' 12 numbers to 1e-6 on the official
    reference files (pycocotools stays the default and the reference)."""
    from tasks.data.coco import load_coco
    from tasks.evaluation.coco import STAT_NAMES, coco_report, load_results

    gt = load_coco(REFERENCE / "instances_val2014_100.json")
    results = load_results(REFERENCE / f"instances_val2014_fake{iou_type}100_results.json")
    slow_report, fast_report = (coco_report(gt, results, iou_type, backend) for backend in ("pycocotools", "faster_coco_eval"))
    (reference, reference_categories), (fast, fast_categories) = ((r.summary, r.per_category) for r in (slow_report, fast_report))
    assert list(fast) == list(STAT_NAMES)
    for name in STAT_NAMES:
        assert abs(fast[name] - reference[name]) <= 1e-6, (name, fast[name], reference[name])
    for iou, key in ((0.5, "AP50"), (0.75, "AP75")):  # the curves drawn are the ones the numbers come from
        curves = slow_report.precision[iou][[r["AP"] is not None for r in reference_categories]]
        assert curves.shape[1] == len(slow_report.recall) == 101 and abs(curves.mean() - reference[key]) <= 1e-12
    for ours, theirs in zip(fast_categories, reference_categories):
        assert ours["category_id"] == theirs["category_id"]
        assert all((ours[k] is None and theirs[k] is None) or abs(ours[k] - theirs[k]) <= 1e-6 for k in ("AP", "AP50", "AP75"))
    official = {"bbox": 0.5045806987249628, "segm": 0.3195452758576433}[iou_type]
    assert abs(fast["AP"] - official) <= 1e-6
    assert sum(line.startswith(" Average") for line in capsys.readouterr().out.splitlines()) >= 24  # both summaries


def test_plot_draws_the_curves_of_several_runs(tmp_path, capsys):
    """tools/plot.py overlays runs' losses, learning rate and validation metrics in one PNG."""
    from PIL import Image

    from tools.plot import main

    for name, scale in (("r18", 1.0), ("r50", 0.5)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"iteration": i, "loss": scale / i, "loss_cls": scale / i, "lr": 0.01} for i in range(10, 101, 10)]
        lines.append({"iteration": 100, "val/bbox/AP": 0.3 * scale, "val/bbox/AP50": 0.5 * scale})
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "curves.png"
    assert main([str(tmp_path / "r18"), str(tmp_path / "r50"), "--output", str(out)]) == 0
    assert "5 panels: loss, loss_cls, lr, val/bbox/AP, val/bbox/AP50" in capsys.readouterr().out
    width, height = Image.open(out).size
    assert width > 1000 and height > 500
    assert main([str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_results_travel_between_processes_as_compact_arrays():
    """Evaluation gathers box results as (N, 7) arrays: the round trip gives back exactly the entries."""
    import numpy as np

    from tasks.evaluation.coco import array_to_results, load_results, results_to_array

    results = load_results(REFERENCE / "instances_val2014_fakebbox100_results.json")
    array = results_to_array(results)
    assert array.shape == (len(results), 7) and array.dtype == np.float64
    assert array_to_results(array) == [{k: r[k] for k in ("image_id", "category_id", "bbox", "score")} for r in results]
    assert array_to_results(results_to_array([])) == []
