"""ONNX export (tools/export.py, tasks/deploy.py): ONNX Runtime against the PyTorch model on real photos at
sizes other than the traced one; the tools on exported files; torch.export programs."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from safetensors.torch import save_file

from backbones.errors import UserError
from tasks.config import load_config
from tasks.data.images import read_image
from tasks.deploy import EXAMPLE_SIZE, OnnxDetector, OnnxSegmenter, export_metadata, export_onnx, export_program
from tasks.detection import build_detector
from tasks.registry import get_task, prepare_config
from tasks.segmentation import build_segmenter

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT.parent / "shared" / "data" / "tinycoco" / "images" / "val2017").glob("*.jpg"))
# (height, width) of the photos fed to both sides: none is the traced EXAMPLE_SIZE, landscape and portrait,
# sides that are and are not multiples of the size divisibility
SIZES = [(320, 427), (288, 224), (250, 333)]
DETECTOR_METADATA = export_metadata(320, 512, {k: f"class {k}" for k in range(1, 6)}, {k: k for k in range(1, 6)})
assert EXAMPLE_SIZE not in SIZES


def photo(index: int, size: tuple[int, int]) -> torch.Tensor:
    """A real COCO photo resized to ``size``, ``uint8`` ``(3, H, W)``."""
    image = read_image(PHOTOS[index % len(PHOTOS)])
    return torch.from_numpy(cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1).contiguous()


def small_detector(layout: str, masks: bool = False) -> torch.nn.Module:
    """A random ResNet-18 detector of the layout (a Mask R-CNN with ``masks``), seeded; the class scores are
    spread (the predictor's weights drawn wider than its initialisation) so that detections pass the
    threshold in a clear order, and so are the mask logits."""
    torch.manual_seed(0)
    model = build_detector({
        "layout": layout, "num_classes": 5, "backbone": {"name": "resnet", "depth": 18},
        "fpn": {"out_channels": 32}, "roi_heads": {"fc_dim": 64, "detections_per_image": 50, "score_thresh": 0.001},
        "rpn": {"pre_nms_topk": [2000, 300], "post_nms_topk": [1000, 100]},
        "masks": masks, "mask_head": {"conv_dim": 16, "rules": "detectron2"},
    }, init_weights=False).eval()
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.weight.normal_(0, 0.05)
        if masks:
            model.roi_heads.mask_head.predictor.weight.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each detector layout and an FCN, exported once: {name: (PyTorch model, ONNX Runtime model)}."""
    folder = tmp_path_factory.mktemp("onnx")
    models = {}
    for layout in ("fpn", "c4", "dc5"):
        model = small_detector(layout)
        path = export_onnx(model, "detection", folder / f"{layout}.onnx",
                           DETECTOR_METADATA)
        models[layout] = (model, OnnxDetector(path, threads=1))
    torch.manual_seed(0)
    segmenter = build_segmenter({"num_classes": 5, "backbone": {"name": "resnet", "depth": 18}, "output_stride": 16,
                                 "aux": False}, init_weights=False).eval()
    path = export_onnx(segmenter, "segmentation", folder / "fcn.onnx",
                       export_metadata(320, 512, {k: f"class {k}" for k in range(5)}), logits=True)
    models["fcn"] = (segmenter, OnnxSegmenter(path, threads=1))
    return models


def match_one_to_one(reference: dict, candidate: dict) -> None:
    """Every reference detection has its own candidate detection: same label, box within 0.01 px, score
    within 1e-4; and nothing is left over."""
    assert len(candidate["boxes"]) == len(reference["boxes"]), (len(candidate["boxes"]), len(reference["boxes"]))
    free = torch.ones(len(candidate["boxes"]), dtype=torch.bool)
    for box, score, label in zip(reference["boxes"], reference["scores"], reference["labels"]):
        fits = (free & (candidate["labels"] == label) & ((candidate["boxes"] - box).abs().amax(1) <= 0.01)
                & ((candidate["scores"] - score).abs() <= 1e-4))
        assert fits.any(), f"no match for label {int(label)} box {box.tolist()} score {float(score)}"
        free[torch.where(fits)[0][0]] = False


def save_seeded_model(config, path: Path) -> None:
    """The config's model, initialised from seed 0, saved as the checkpoint the tools read."""
    torch.manual_seed(0)
    model = get_task(config.task).build_model(config, init_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def assert_same_detections(model, onnx_model, sizes) -> None:
    """On photos of each of ``sizes``, ONNX Runtime gives the PyTorch model's detections, clipped to the input."""
    for index, size in enumerate(sizes):
        image = photo(index, size)
        with torch.no_grad():
            (reference,) = model([image])
        (got,) = onnx_model([image])
        assert len(reference["boxes"]) >= 5, "the test needs detections to compare"
        match_one_to_one(reference, got)
        assert got["boxes"][:, 2].max() <= size[1] and got["boxes"][:, 3].max() <= size[0]  # clipped to this input


@pytest.mark.parametrize("layout", ["fpn", "c4", "dc5"])
def test_onnx_detector_gives_the_pytorch_detections(exported, layout):
    assert_same_detections(*exported[layout], SIZES)


def test_dynamo_exporter_gives_the_pytorch_detections(tmp_path):
    """The ``torch.export``-based ONNX exporter takes the whole detector (its sizes fixed or symbols): at sizes
    other than the traced one, ONNX Runtime gives the PyTorch model's detections. (C4: the fastest to export.)"""
    model = small_detector("c4")
    path = export_onnx(model, "detection", tmp_path / "c4.onnx", DETECTOR_METADATA, exporter="dynamo")
    assert_same_detections(model, OnnxDetector(path, threads=1), SIZES[:2])


@pytest.mark.parametrize("layout", ["fpn", "c4"])
def test_onnx_mask_rcnn_gives_the_pytorch_masks(tmp_path, layout):
    """A Mask R-CNN exported with its masks as ``mask_probs`` ``(D, M, M)`` (the metadata names the paste):
    on ONNX Runtime, at sizes other than the traced one, the PyTorch model's detections, mask probabilities
    (to 1e-4) and pasted masks."""
    model = small_detector(layout, masks=True)
    onnx_model = OnnxDetector(export_onnx(model, "detection", tmp_path / "mask.onnx", DETECTOR_METADATA), threads=1)
    assert onnx_model.has_masks and onnx_model.metadata["resdet.mask_rules"] == "detectron2"
    assert json.loads(onnx_model.metadata["resdet.outputs"]) == ["boxes", "scores", "labels", "mask_probs"]
    for index, size in enumerate(SIZES[:2]):
        image = photo(index, size)
        with torch.no_grad():
            (reference,) = model([image])
        (got,) = onnx_model([image])
        assert len(reference["boxes"]) >= 5
        match_one_to_one(reference, got)
        match = (got["boxes"][None] - reference["boxes"][:, None]).abs().amax(-1).argmin(1)
        assert (got["mask_probs"][match] - reference["mask_probs"]).abs().max() <= 1e-4
        assert 0.05 < (reference["mask_probs"] > 0.5).float().mean() < 0.95  # masks worth comparing
        pasted, theirs = model.paste_masks(reference, size)["masks"], onnx_model.paste_masks(got, size)["masks"]
        assert (pasted == theirs[match]).float().mean() >= 0.999


def test_onnx_segmenter_gives_the_pytorch_class_map(exported):
    model, onnx_model = exported["fcn"]
    for index, size in enumerate(SIZES):
        image = photo(index, size)
        with torch.no_grad():
            (reference,) = model([image])
        out = onnx_model.run(image)
        assert out["classes"].shape == size and out["logits"].shape == (5, *size)
        agree = (out["classes"] == reference.argmax(0)).float().mean().item()
        assert agree >= 0.999, agree
        assert len(reference.argmax(0).unique()) > 1  # a map worth comparing


def test_onnx_errors(exported, tmp_path):
    _, detector = exported["fpn"]
    with pytest.raises(UserError, match=r"image 1 of the batch has shape \(3, 0, 40\)"):
        detector([photo(0, (64, 64)), torch.zeros((3, 0, 40), dtype=torch.uint8)])
    not_a_model = tmp_path / "notes.onnx"
    not_a_model.write_text("not a model")
    with pytest.raises(UserError, match="notes.onnx is not an ONNX model"):
        OnnxDetector(not_a_model)
    with pytest.raises(UserError, match="is a segmentation model but the config's task is detection"):
        OnnxDetector(exported["fcn"][1].path)
    assert detector.metadata["resdet.task"] == "detection" and detector.min_size_test == 320
    assert detector.classes == {k: f"class {k}" for k in range(1, 6)} and detector.categories == {k: k for k in range(1, 6)}


def test_export_and_infer_tools_on_grayscale_and_cmyk_photos(exported, shapes, tmp_path, capsys):
    """tools/export.py writes the file; tools/infer.py gives the same predictions.json from it as from the
    checkpoint, on a grayscale and a CMYK JPEG; bad files are one-line errors."""
    from tools.export import main as export_main
    from tools.infer import main as infer_main

    overrides = [*TINY, f"data.root={shapes}", "data.min_size_test=256", "data.max_size_test=400",
                 "model.rpn.post_nms_topk=[500,100]"]
    config = prepare_config(load_config(ROOT / "configs" / "quickstart.yaml", overrides))
    save_seeded_model(config, tmp_path / "model.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    Image.open(PHOTOS[1]).convert("L").save(images / "gray.jpg")
    Image.open(PHOTOS[2]).convert("CMYK").save(images / "cmyk.jpg")
    quickstart = ROOT / "configs" / "quickstart.yaml"
    export = lambda argv: export_main([str(a) for a in argv])  # noqa: E731
    infer = lambda argv: infer_main([str(a) for a in argv])  # noqa: E731
    assert export([quickstart, "--weights", tmp_path / "model.safetensors", "--output", tmp_path / "model.onnx",
                   *overrides]) == 0
    predictions = {}
    for weights in ("model.safetensors", "model.onnx"):
        assert infer([quickstart, "--weights", tmp_path / weights, "--input", images, "--output",
                      tmp_path / f"out_{weights}", *overrides]) == 0
        out = tmp_path / f"out_{weights}"
        predictions[weights] = json.loads((out / "predictions.json").read_text())
        assert (out / "gray.png").is_file() and (out / "cmyk.png").is_file()
    ours, onnx = predictions["model.safetensors"], predictions["model.onnx"]
    assert len(ours) == len(onnx) > 0 and {p["file_name"] for p in onnx} == {"gray.jpg", "cmyk.jpg"}
    key = lambda p: (p["file_name"], p["category_id"], p["score"])  # noqa: E731
    for a, b in zip(sorted(ours, key=key), sorted(onnx, key=key)):
        assert a["file_name"] == b["file_name"] and a["category_id"] == b["category_id"]
        assert abs(a["score"] - b["score"]) <= 1e-4 and np.allclose(a["bbox"], b["bbox"], atol=0.01)

    capsys.readouterr()
    (tmp_path / "notes.onnx").write_text("not a model")
    for weights, message in ((exported["fcn"][1].path, "is a segmentation model but the config's task is detection"),
                             (tmp_path / "notes.onnx", "notes.onnx is not an ONNX model")):
        assert infer([quickstart, "--weights", weights, "--input", images, "--output", tmp_path / "bad",
                      *overrides]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_torch_export_programs(exported, tmp_path):
    """``.pt2`` programs of the whole segmenter and the whole detector (image to outputs: NMS's output and
    the kept count are size symbols): at a size other than the traced one, the model's own outputs."""
    segmenter, _ = exported["fcn"]
    program = torch.export.load(str(export_program(segmenter, "segmentation", tmp_path / "fcn.pt2")))
    image = photo(0, SIZES[0])
    with torch.no_grad():
        (reference,) = segmenter([image])
        assert (program.module()(image) == reference.argmax(0)).float().mean().item() >= 0.999
    detector, _ = exported["fpn"]
    program = torch.export.load(str(export_program(detector, "detection", tmp_path / "fpn.pt2")))
    for size in SIZES[:2]:
        image = photo(1, size)
        with torch.no_grad():
            boxes, scores, labels = program.module()(image)
            (reference,) = detector([image])
        assert len(boxes) == len(reference["boxes"]) > 0
        match_one_to_one(reference, {"boxes": boxes, "scores": scores, "labels": labels})


def test_benchmark_compares_with_onnxruntime(exported, tmp_path, capsys):
    """``--compare onnxruntime`` times our model and its export (made in the run, or a given file) side by
    side; training cannot be compared."""
    from tools.benchmark import main as benchmark

    quickstart = str(ROOT / "configs" / "quickstart.yaml")
    common = ["--mode", "infer", "--compare", "onnxruntime", "--device", "cpu", "--batch-size", "1", "--size", "96x128",
              "--iters", "1", "--warmup", "0"]
    assert benchmark([quickstart, *common, "--output", str(tmp_path / "b.json")]) == 0
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert results["time_ratio"] == results["ours"]["seconds_per_iteration"] / results["onnxruntime"]["seconds_per_iteration"]
    assert benchmark([quickstart, *common, "--weights", str(exported["fcn"][1].path)]) == 2
    assert "is a segmentation model but the config's task is detection" in capsys.readouterr().err
    assert benchmark([quickstart, *common[:-6], "--mode", "train"]) == 2
    assert "--compare onnxruntime measures inference" in capsys.readouterr().err


def test_infer_tool_on_an_exported_segmenter_writes_the_same_class_maps(tmp_path):
    """tools/export.py --logits, then tools/infer.py: the label PNGs from the ONNX file equal (>= 99.9% of
    pixels) those from the checkpoint, at the photos' own sizes."""
    from tools.export import main as export
    from tools.infer import main as infer

    config_file = str(ROOT / "configs" / "quickstart_fcn.yaml")
    overrides = ["data.min_size_test=96", "data.max_size_test=128"]
    config = prepare_config(load_config(config_file, overrides))
    save_seeded_model(config, tmp_path / "fcn.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    Image.open(PHOTOS[3]).convert("CMYK").save(images / "cmyk.jpg")
    assert export([config_file, "--weights", str(tmp_path / "fcn.safetensors"), "--output", str(tmp_path / "fcn.onnx"),
                   "--logits", *overrides]) == 0
    for weights in ("fcn.safetensors", "fcn.onnx"):
        assert infer([config_file, "--weights", str(tmp_path / weights), "--input", str(images), "--output",
                      str(tmp_path / f"out_{weights}"), *overrides]) == 0
    ours, onnx = (np.array(Image.open(tmp_path / f"out_{w}" / "cmyk_labels.png")) for w in ("fcn.safetensors", "fcn.onnx"))
    assert ours.shape == onnx.shape == Image.open(PHOTOS[3]).size[::-1]
    assert (ours == onnx).mean() >= 0.999 and len(np.unique(ours)) > 1
