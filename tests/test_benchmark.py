"""tools/benchmark.py runs every mode and reports the side-by-side ratios."""

import json
from pathlib import Path

import pytest
import torch

from tasks.config import load_config
from tasks.detection.model import build_detector
from tools.benchmark import Runner, main, torchvision_detector

ROOT = Path(__file__).resolve().parents[1]
TINYCOCO = ROOT.parent / "shared" / "data" / "tinycoco"


def test_train_and_infer_side_by_side(tmp_path):
    for mode in ("train", "infer"):
        out = tmp_path / f"{mode}.json"
        assert main([str(ROOT / "configs" / "frcnn_r50_fpn_torchvision.yaml"), "--mode", mode, "--compare",
                     "torchvision", "--device", "cpu", "--batch-size", "1", "--size", "128x160", "--iters", "1",
                     "--warmup", "0", "--output", str(out), "model.backbone.depth=50"]) == 0
        record = json.loads(out.read_text())
        results = record["results"]
        assert results["ours"]["parameters"] == results["torchvision"]["parameters"]  # the same architecture
        # FLOPs depend on how many proposals survive NMS (random weights differ): same order of magnitude
        assert 0.5 < results["ours"]["gflops_per_image"] / results["torchvision"]["gflops_per_image"] < 2
        assert results["time_ratio"] == results["ours"]["seconds_per_iteration"] / results["torchvision"]["seconds_per_iteration"]
        assert record["software"]["torch"] and record["hardware"]["cpu_threads"] >= 1


@pytest.mark.parametrize("config", ["frcnn_r101.yaml", "frcnn_r50_c4.yaml", "frcnn_r50_dc5.yaml", "mask_rcnn_r50.yaml"])
def test_torchvision_side_has_the_configs_architecture(tmp_path, config):
    """torchvision's side is assembled to the config's layout and depth: the same parameters, trainable and
    in all (the ImageNet weights the config names are not needed: the benchmark starts both at random);
    torchvision's Mask R-CNN has one mask map more, the background's (256 weights and a bias)."""
    out = tmp_path / "train.json"
    few_rois = ["model.rpn.post_nms_topk=[32,32]", "model.roi_heads.batch_size_per_image=16"]  # fast; same parameters
    assert main([str(ROOT / "configs" / config), *few_rois, "--mode", "train", "--compare", "torchvision", "--device",
                 "cpu", "--batch-size", "1", "--size", "96x128", "--iters", "1", "--warmup", "0", "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    background_map = 257 if config.startswith("mask") else 0
    assert results["ours"]["parameters"] + background_map == results["torchvision"]["parameters"]
    assert results["same_parameters"]
    model = load_config(ROOT / "configs" / config).model
    ours = build_detector({**model, "backbone": {**model["backbone"], "weights": None}})
    theirs = torchvision_detector(load_config(ROOT / "configs" / config), 96, 128)
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, theirs)]
    assert trainable[0] + background_map == trainable[1]


def test_data_mode(tmp_path):
    out = tmp_path / "data.json"
    assert main([str(ROOT / "configs" / "frcnn_r50.yaml"), "--mode", "data", f"data.root={TINYCOCO}",
                 "data.train.images=images/train2017", "data.num_workers=0", "--batch-size", "2", "--iters", "3",
                 "--warmup", "1", "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert results["images_per_second"] > 0 and 0 < results["images"] <= 32 and results["build_seconds"] > 0
    assert results["process_bytes_added"] is not None and results["worker_copy_bytes"] is not None


def test_data_mode_on_a_synthetic_coco_train_file(tmp_path):
    """The generated annotation file has COCO's shape (polygons, crowd RLEs): the segmentation dataset,
    which keeps them, builds from it."""
    out = tmp_path / "data.json"
    assert main([str(ROOT / "configs" / "fcn_r50.yaml"), "--mode", "data", "--synthetic-coco-train", "300",
                 "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert results["synthetic_annotations"]["images"] == 300
    assert 1500 < results["synthetic_annotations"]["annotations"] < 2700
    assert 0 < results["images"] <= 300 and "images_per_second" not in results


def test_state_bytes_counts_parameters_gradients_and_optimizer_state():
    """What a model keeps between steps (the GPU peak memory adds it to what a step allocates)."""
    model = torch.nn.Linear(10, 4)  # 44 parameters
    model.register_buffer("counter", torch.zeros(3, dtype=torch.int64))
    runner = Runner("m", model, "train", torch.device("cpu"), None, False)
    assert runner.state_bytes() == 44 * 4 + 3 * 8
    model(torch.randn(2, 10)).sum().backward()
    runner.optimizer.step()  # SGD with momentum: one buffer per parameter
    assert runner.state_bytes() == 3 * 44 * 4 + 3 * 8


def test_eval_mode_times_both_backends_on_the_same_numbers(tmp_path):
    """--mode eval: a synthetic COCO-like set evaluated by pycocotools and faster-coco-eval side by side."""
    out = tmp_path / "eval.json"
    assert main(["--mode", "eval", "--images", "60", "--per-image", "20", "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert results["images"] == 60 and results["results"] == 60 * 20 and results["same_numbers"]
    assert set(results["seconds"]) == {"pycocotools", "faster_coco_eval"} and results["time_ratio"] > 0
    assert 0.05 < results["AP"] < 0.9  # found objects, false positives and misses: neither 0 nor perfect


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
def test_gpu_suite_without_cuda_is_a_one_line_error(tmp_path, capsys):
    assert main(["--suite", "gpu", "--output", str(tmp_path)]) == 2
    assert "--suite gpu needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()
