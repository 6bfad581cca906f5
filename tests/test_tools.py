"""The tools as a user meets them: one-line errors, fail-fast config checks, checkpoints that replace the
initialisation (offline), complete run folders, preemption by a real signal, inheritance across backbone
families, data checks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, free_port
from safetensors.torch import save_file

from tasks.config import load_config, to_yaml
from tasks.engine import train
from tasks.registry import get_task, prepare_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
QUICKSTART_FCN = ROOT / "configs" / "quickstart_fcn.yaml"
TINY_FCN = ["data.min_size_train=[64]", "data.max_size_train=96", "data.crop_size=64", "data.min_size_test=64",
            "data.max_size_test=96", "data.num_workers=0", "train.batch_size=2", "train.log_period=1",
            "train.warmup_iters=0", "eval.num_visualize=0"]


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def error_line(main, argv, capsys) -> str:
    """Run a tool's ``main`` in-process; it must exit 2 with exactly one ``error:`` line and no traceback."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- one-line errors, failing fast -------------------------------------------------------------------

def test_user_errors_are_one_line_with_exit_code_2(shapes, tmp_path, capsys):
    from tasks.data.synthetic.__main__ import main as generate_main
    from tools.benchmark import main as benchmark
    from tools.check_data import main as check_data
    from tools.eval import main as evaluate
    from tools.infer import main as infer
    from tools.train import main as train_main

    nowhere = f"data.root={tmp_path / 'no_dataset_here'}"  # checked before any data is read: never reached
    assert "model.backbone.depht; did you mean 'model.backbone.depth'" in error_line(
        train_main, [QUICKSTART, "model.backbone.depht=50", nowhere], capsys)
    assert "model.rpn.nms_thresh must be a number" in error_line(
        train_main, [QUICKSTART, "model.rpn.nms_thresh=high", nowhere], capsys)
    assert "output_stride follows from model.layout (dc5)" in error_line(
        train_main, [QUICKSTART, "model.layout=dc5", "model.backbone.output_stride=8", nowhere], capsys)
    assert "unknown task 'detektion'" in error_line(train_main, [QUICKSTART, "task=detektion", nowhere], capsys)
    assert "train.batch_size must be at least 1" in error_line(train_main, [QUICKSTART, "train.batch_size=0"], capsys)
    assert "data.format must be one of coco, voc for task detection, got 'folder'" in error_line(
        train_main, [QUICKSTART, "data.format=folder", nowhere], capsys)
    assert "'train.max_iters'" in error_line(train_main, [QUICKSTART, "train.max_iters=many"], capsys)
    assert "annotation file not found" in error_line(
        train_main, [QUICKSTART, *TINY, f"data.root={shapes}", "data.train.annotations=none.json",
                     f"output_dir={tmp_path / 'a'}"], capsys)
    not_coco = tmp_path / "not_coco.json"
    not_coco.write_text(json.dumps([1, 2]))
    assert "not_coco.json is not a COCO instances file" in error_line(
        train_main, [QUICKSTART, *TINY, f"data.root={shapes}", f"data.train.annotations={not_coco}",
                     f"output_dir={tmp_path / 'b'}"], capsys)
    assert "have 3 labels (data.label_map=contiguous) but model.num_classes is 2" in error_line(
        train_main, [QUICKSTART, *TINY, f"data.root={shapes}", "model.num_classes=2", f"output_dir={tmp_path / 'c'}"],
        capsys)

    # results files of the wrong shape, unknown images, unfinished runs, checkpoints that do not fit
    annotations = shapes / "annotations" / "instances_val2017.json"
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps([{"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [1, 2, 3]}]))
    assert "entry 0: 'bbox' is not four numbers" in error_line(
        evaluate, ["--annotations", annotations, "--results", bad], capsys)
    bad.write_text(json.dumps([{"image_id": 999, "category_id": 1, "score": 0.5, "bbox": [1, 2, 3, 4]}]))
    assert "not in the ground truth (first: [999])" in error_line(
        evaluate, ["--annotations", annotations, "--results", bad], capsys)
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(QUICKSTART.read_text())
    assert "has not finished" in error_line(evaluate, [run_dir], capsys)
    segmenter = prepare_config(load_config(QUICKSTART_FCN))
    save_file(get_task("segmentation").build_model(segmenter).state_dict(), str(tmp_path / "fcn.safetensors"))
    message = error_line(evaluate, [QUICKSTART, "--weights", tmp_path / "fcn.safetensors", *TINY,
                                    f"data.root={shapes}"], capsys)
    assert "do not match FasterRCNN: missing from the checkpoint" in message and "unexpected in the checkpoint" in message
    assert "input not found" in error_line(
        infer, [QUICKSTART, "--weights", tmp_path / "fcn.safetensors", "--input", tmp_path / "nothing",
                "--output", tmp_path / "out"], capsys)
    assert "model.fpn.out_chanels" in error_line(benchmark, [QUICKSTART, "model.fpn.out_chanels=8"], capsys)
    assert "'data.rot'" in error_line(check_data, [QUICKSTART, "data.rot=x"], capsys)
    assert "--size at least 32" in error_line(generate_main, [tmp_path / "gen", "--size", "4"], capsys)


def test_error_output_of_a_real_process_and_debug(tmp_path):
    plain = cli("tools/train.py", QUICKSTART, "model.backbone.depht=50")
    assert plain.returncode == 2
    from backbones.build import _RESNET_KEYS

    assert plain.stderr.strip().splitlines() == [
        "error: unknown key model.backbone.depht; did you mean 'model.backbone.depth'? (valid keys: "
        f"{', '.join(_RESNET_KEYS)})"]
    assert _RESNET_KEYS[:4] == ("depth", "out_features", "stride_in_1x1", "shortcut")
    debug = cli("tools/train.py", QUICKSTART, "model.backbone.depht=50", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserError" in debug.stderr


def test_an_undecodable_image_read_by_a_worker_is_one_line_naming_image_and_annotations(shapes, tmp_path):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(shapes, data)
    for image in (data / "train2017").glob("*.jpg"):
        image.write_bytes(image.read_bytes()[:200])  # truncated files
    result = cli("tools/train.py", QUICKSTART, *TINY, f"data.root={data}", "data.num_workers=1",
                 f"output_dir={tmp_path / 'run'}", "train.max_iters=2")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "cannot decode image" in lines[0] and ".jpg (image id" in lines[0]
    assert f"listed in {data / 'annotations' / 'instances_train2017.json'}" in lines[0]


# --- a checkpoint replaces the initialisation ------------------------------------------------------------

BLOCK_NETWORK = """
import socket

def _blocked(*args, **kwargs):
    raise OSError("network access blocked by the test")

_connect = socket.socket.connect

def _local_only(self, address):  # DataLoader workers hand tensors over through Unix sockets
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _blocked()
    return _connect(self, address)

socket.socket.connect = _local_only
socket.create_connection = _blocked
"""


def test_checkpoints_load_offline_without_fetching_the_initialisation(shapes, tmp_path):
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCK_NETWORK)
    offline = {"PYTHONPATH": str(tmp_path / "block"), "TORCH_HOME": str(tmp_path / "torch_home"),
               "HF_HUB_OFFLINE": "1"}
    detection = [*TINY, f"data.root={shapes}", "model.backbone.weights=torchvision"]
    detector = prepare_config(load_config(QUICKSTART, detection))
    save_file({k: v.contiguous() for k, v in get_task("detection").build_model(detector, init_weights=False).state_dict().items()},
              str(tmp_path / "det.safetensors"))
    segmenter = prepare_config(load_config(QUICKSTART_FCN, ["model.backbone.weights=torchvision"]))
    save_file(get_task("segmentation").build_model(segmenter, init_weights=False).state_dict(),
              str(tmp_path / "seg.safetensors"))

    # the block is real: building the initialisation needs the network and fails, in one line
    fetch = cli("tools/train.py", QUICKSTART, *detection, f"output_dir={tmp_path / 'fetch'}", env=offline)
    assert fetch.returncode == 2 and "could not fetch torchvision:resnet18.IMAGENET1K_V1" in fetch.stderr
    assert "Traceback" not in fetch.stderr

    evaluated = cli("tools/eval.py", QUICKSTART, "--weights", tmp_path / "det.safetensors", *detection,
                    "--output-dir", tmp_path / "eval", env=offline)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "bbox/AP" in json.loads((tmp_path / "eval" / "metrics.json").read_text())
    inferred = cli("tools/infer.py", QUICKSTART_FCN, "--weights", tmp_path / "seg.safetensors", "--input",
                   shapes / "val2017", "--output", tmp_path / "infer", "model.backbone.weights=torchvision",
                   env=offline)
    assert inferred.returncode == 0, inferred.stderr[-2000:]
    assert len(list((tmp_path / "infer").glob("*_labels.png"))) == 5


def test_resuming_does_not_fetch_the_initialisation(shapes, tmp_path, monkeypatch):
    import backbones.weights

    out = tmp_path / "run"
    first = load_config(QUICKSTART, [*TINY, f"data.root={shapes}", f"output_dir={out}", "train.max_iters=1"])
    train(get_task("detection"), first)

    def no_fetch(source):
        raise AssertionError(f"fetched {source} although a checkpoint was resumed")

    monkeypatch.setattr(backbones.weights, "fetch_named_weights", no_fetch)
    resumed = load_config(QUICKSTART, [*TINY, f"data.root={shapes}", f"output_dir={out}", "train.max_iters=2",
                                       "model.backbone.weights=torchvision"])
    assert train(get_task("detection"), resumed).iterations == 2


# --- the run folder holds every value -------------------------------------------------------------------

def test_run_config_holds_every_model_default_and_rebuilds_the_same_model(shapes, tmp_path, monkeypatch):
    from tasks.detection import model as detection_model
    from tasks.detection.checkpoint import load_detector_weights

    out = tmp_path / "run"
    train(get_task("detection"), load_config(QUICKSTART, [*TINY, f"data.root={shapes}", f"output_dir={out}",
                                                          "train.max_iters=1"]))
    saved = load_config(out / "config.yaml")
    model_cfg = saved.model
    assert model_cfg["rpn"]["nms_thresh"] == 0.7 and model_cfg["roi_heads"]["pooler_resolution"] == 7
    assert model_cfg["backbone"]["shortcut"] == "B" and model_cfg["backbone"]["fold_frozen_bn"] is False
    assert model_cfg["anchors"]["sizes"] == [[16], [32], [64], [128], [256]]  # the quickstart's own
    assert prepare_config(saved) == saved  # resolving a resolved config changes nothing
    assert to_yaml(prepare_config(saved)) == (out / "config.yaml").read_text()

    # the defaults change; the run's config still builds the model it trained
    monkeypatch.setitem(detection_model.DEFAULTS["rpn"], "nms_thresh", 0.5)
    monkeypatch.setitem(detection_model.DEFAULTS["roi_heads"], "fc_dim", 2048)
    model = get_task("detection").build_model(saved)
    assert model.rpn.nms_thresh == 0.7
    load_detector_weights(model, out / "model.safetensors")  # strict: every tensor with its shape


# --- preemption ---------------------------------------------------------------------------------------------

def _losses(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: {k: v for k, v in r.items() if k.startswith("loss")} for r in rows if "loss" in r}


def _interrupt_when_logged(command: list, run_dir: Path, iteration: int, sig=signal.SIGTERM) -> subprocess.CompletedProcess:
    """Start ``command``, send ``sig`` once ``iteration`` is logged, and wait for it to exit."""
    process = subprocess.Popen([sys.executable, *map(str, command)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and max(_losses(run_dir), default=0) >= iteration:
            process.send_signal(sig)
            break
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def launch_2() -> list[str]:
    return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
            str(free_port()), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_writes_a_checkpoint_and_resuming_equals_an_uninterrupted_run(shapes, tmp_path, processes):
    launcher = launch_2() if processes == 2 else []
    args = ["tools/train.py", QUICKSTART, *TINY, f"data.root={shapes}", "data.num_workers=1", "train.max_iters=16",
            "train.checkpoint_period=0"]
    reference = cli(*launcher, *args, f"output_dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "interrupted"
    stopped = _interrupt_when_logged([*launcher, *args, f"output_dir={run_dir}"], run_dir, 3)
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    stopped_at = [line for line in stopped.stderr.splitlines() if line.startswith("interrupted at iteration")]
    assert stopped_at and stopped_at[0].endswith("run the same command to resume"), stopped.stderr[-3000:]
    iteration = int(stopped_at[0].split()[3])
    assert 3 <= iteration < 16
    # no traceback from the training processes (accelerate's launcher prints its own on SIGTERM)
    assert not [f for f in ("tasks", "tools", "backbones", "heads") if f'File "{ROOT / f}' in stopped.stderr]
    assert stopped.stderr.count("interrupted at iteration") == processes  # every process stopped at the same one
    assert len(set(stopped_at)) == 1
    assert (run_dir / "checkpoints" / f"iter_{iteration:07d}").is_dir()
    assert (run_dir / "checkpoints" / "latest").read_text() == f"iter_{iteration:07d}"
    if processes == 1:
        assert stopped.returncode == 128 + signal.SIGTERM

    resumed = cli(*launcher, *args, f"output_dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = _losses(tmp_path / "reference"), _losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == pytest.approx(json.loads((tmp_path / "reference" / "metrics.json").read_text()), abs=1e-6)


# --- inheritance across backbone families --------------------------------------------------------------

def test_a_config_inheriting_from_a_resnet_config_can_swap_in_a_timm_backbone(shapes, tmp_path):
    (tmp_path / "det_timm.yaml").write_text(
        f"_base_: {QUICKSTART}\nmodel:\n  backbone: {{name: timm, model: resnet18, norm: native}}\n")
    (tmp_path / "seg_timm.yaml").write_text(f"_base_: {QUICKSTART_FCN}\nmodel:\n  backbone: {{name: timm, model: resnet18}}\n")
    small = [o for o in TINY if not o.startswith("model.backbone")]
    detection = load_config(tmp_path / "det_timm.yaml", [*small, f"data.root={shapes}", "train.max_iters=2",
                                                          f"output_dir={tmp_path / 'det'}"])
    assert detection.model["backbone"] == {"name": "timm", "model": "resnet18", "norm": "native"}
    assert train(get_task("detection"), detection).iterations == 2  # FPN over the timm ResNet
    segmentation = load_config(tmp_path / "seg_timm.yaml", [*TINY_FCN, f"data.root={shapes}", "train.max_iters=2",
                                                            f"output_dir={tmp_path / 'seg'}"])
    assert train(get_task("segmentation"), segmentation).iterations == 2
    # the same rule for command-line overrides
    swapped = load_config(QUICKSTART, ["model.backbone.name=timm", "model.backbone.model=resnet18"])
    assert swapped.model["backbone"] == {"name": "timm", "model": "resnet18"}


# --- data checks ---------------------------------------------------------------------------------------------

def test_check_data_reports_problems_and_exit_codes(shapes, tmp_path, capsys):
    import shutil

    from tools.check_data import main as check_data

    assert check_data([str(QUICKSTART), f"data.root={shapes}", "--decode", "--workers", "1"]) == 0
    assert "no errors found" in capsys.readouterr().out

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    annotation_file = data / "annotations" / "instances_train2017.json"
    raw = json.loads(annotation_file.read_text())
    images = sorted(raw["images"], key=lambda i: i["id"])
    (data / "train2017" / images[0]["file_name"]).unlink()
    (data / "train2017" / images[1]["file_name"]).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    raw["annotations"][0]["bbox"] = [float("nan"), 1, 2, 3]
    raw["annotations"][1]["bbox"] = [1000, 1000, 5, 5]
    raw["annotations"][2]["category_id"] = 77
    annotation_file.write_text(json.dumps(raw))
    assert check_data([str(QUICKSTART), f"data.root={data}", "--split", "train", "--decode", "--workers", "1"]) == 1
    report = capsys.readouterr().out
    assert f"image files missing; e.g. {data / 'train2017' / images[0]['file_name']}" in report
    assert f"images that cannot be decoded; e.g. cannot decode image {data / 'train2017' / images[1]['file_name']}" in report
    assert "1 annotations of unknown categories" in report and "category_id 77" in report
    assert "1 boxes with non-finite coordinates (dropped)" in report
    assert "1 boxes outside their image (dropped)" in report
    assert report.rstrip().endswith("errors found")


def test_non_finite_boxes_are_dropped_and_counted(shapes, tmp_path):
    from tasks.detection.data import CocoDetection

    raw = json.loads((shapes / "annotations" / "instances_val2017.json").read_text())
    raw["annotations"][0]["bbox"] = [float("nan"), 1.0, 5.0, 5.0]
    raw["annotations"][1]["bbox"] = [1.0, 1.0, float("inf"), 5.0]
    (tmp_path / "ann.json").write_text(json.dumps(raw))
    dataset = CocoDetection(tmp_path / "ann.json", shapes / "val2017")
    assert dataset.dropped["boxes with non-finite coordinates"] == 2
    assert all(np.isfinite(dataset.record(i).boxes).all() for i in range(len(dataset)))


def test_prepare_config_reads_no_weights_and_no_data(tmp_path, monkeypatch):
    """The whole config is checked by building the model on the meta device: no weights fetched or read,
    no dataset touched."""
    import backbones.weights

    def no_fetch(source):
        raise AssertionError(f"fetched {source} while checking a config")

    monkeypatch.setattr(backbones.weights, "fetch_named_weights", no_fetch)
    config = load_config(ROOT / "configs" / "frcnn_r101.yaml", [f"data.root={tmp_path / 'nothing'}"])
    prepared = prepare_config(config)
    assert prepared.model["backbone"]["weights"] == "torchvision" and prepared.model["backbone"]["depth"] == 101
    assert not (tmp_path / "nothing").exists()
