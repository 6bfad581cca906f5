"""CUDA: every detector layout and the FCN train and infer on the GPU in fp32, bf16 and fp16 autocast, and
in fp32 give the CPU's losses and outputs for the same weights and inputs; torchvision's detector and FCN
give our outputs on the GPU; the sparse RoIAlign equals torchvision's CUDA kernel; the engine trains and
evaluates the quickstart through accelerate on one GPU.

Skipped where CUDA is absent. ``RESDET_TEST_DEVICE=cpu`` runs the same tests on the CPU instead (the
device-against-CPU comparisons then compare the CPU with itself): a dry run of this file's own code on a
machine without a GPU."""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch._inductor.config
import torchvision
from conftest import randomize_

from tasks.detection import build_detector
from tasks.segmentation import build_segmenter
from tasks.segmentation.checkpoint import load_segmenter_weights

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT.parent / "shared" / "data" / "tinycoco" / "images" / "val2017").glob("*.jpg"))
DEVICE = torch.device(os.environ.get("RESDET_TEST_DEVICE", "cuda"))
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_float32():
    """fp32 means fp32: no TF32 in cuDNN convolutions or matrix products while comparing with the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def photos(sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Real COCO photos resized to ``sizes`` (h, w), ``uint8`` ``(3, H, W)`` on the CPU, as the data
    loader hands them over."""
    out = []
    for path, size in zip(PHOTOS, sizes):
        image = torchvision.io.decode_image(str(path), mode=torchvision.io.ImageReadMode.RGB)
        out.append(torchvision.transforms.functional.resize(image, list(size), antialias=True))
    return out


SIZES = [(224, 320), (256, 192)]
TARGETS = [  # boxes in the resized photos' pixels
    {"boxes": torch.tensor([[20.0, 30.0, 150.0, 200.0], [160.0, 40.0, 300.0, 120.0]]), "labels": torch.tensor([1, 3])},
    {"boxes": torch.tensor([[10.0, 100.0, 90.0, 250.0]]), "labels": torch.tensor([2])},
]


def detector(layout: str, every_sample: bool = False) -> torch.nn.Module:
    """A seeded random ResNet-18 detector of ``layout``; its class scores spread so that detections pass
    the threshold in a clear order. ``every_sample``: the RPN and RoI heads train on every labelled anchor
    and proposal (no random sampling), so two devices compute the same losses."""
    torch.manual_seed(0)
    batch = 10**6 if every_sample else 128
    model = build_detector({
        "layout": layout, "num_classes": 5, "backbone": {"name": "resnet", "depth": 18, "norm": "BN", "freeze_at": 0},
        "fpn": {"out_channels": 32}, "roi_heads": {"fc_dim": 64, "detections_per_image": 50, "score_thresh": 0.001,
                                                   "batch_size_per_image": batch},
        "rpn": {"pre_nms_topk": [600, 300], "post_nms_topk": [300, 100], "batch_size_per_image": batch},
    }, init_weights=False)
    randomize_(model)
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.weight.normal_(0, 0.05)
    return model


def segmenter(dropout: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(build_segmenter({"num_classes": 5, "backbone": {"name": "resnet", "depth": 18},
                                       "output_stride": 16, "dropout": dropout}, init_weights=False))


def seg_targets(sizes: list[tuple[int, int]]) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"mask": torch.randint(0, 5, size, generator=generator)} for size in sizes]


def on(device: torch.device, targets: list[dict]) -> list[dict]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def train_steps(model: torch.nn.Module, images, targets, dtype, steps: int = 3) -> list[dict[str, float]]:
    """``steps`` SGD steps under autocast of ``dtype`` (fp16 with a gradient scaler, as accelerate does);
    the losses of each step. Asserts finite losses, finite gradients (fp16: where the scaler did not skip
    the step for an overflow, which it may do while it finds its scale), and parameters that moved."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=dtype == torch.float16)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    history = []
    for _ in range(steps):
        with torch.autocast(DEVICE.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = model(images, on(DEVICE, targets))
        assert all(v.device.type == DEVICE.type for v in losses.values())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.unscale_(optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads
        if dtype != torch.float16:
            assert all(torch.isfinite(g).all() for g in grads)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)
        scaler.update()
        if scale is not None and scaler.get_scale() >= scale:  # the step was taken: its gradients were finite
            assert all(torch.isfinite(g).all() for g in grads)
        history.append({k: float(v.detach()) for k, v in losses.items()})
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    return history


def match(reference: dict, candidate: dict, box_tol: float, score_tol: float, count: int = 20) -> None:
    """The ``count`` best reference detections each have their own candidate: same label, box within
    ``box_tol`` px, score within ``score_tol``."""
    assert len(reference["boxes"]) >= 5, "the test needs detections to compare"
    free = torch.ones(len(candidate["boxes"]), dtype=torch.bool)
    boxes, scores, labels = (candidate[k].float().cpu() for k in ("boxes", "scores", "labels"))
    for box, score, label in list(zip(reference["boxes"], reference["scores"], reference["labels"]))[:count]:
        fits = free & (labels == label) & ((boxes - box.float().cpu()).abs().amax(1) <= box_tol) & \
            ((scores - score.float().cpu()).abs() <= score_tol)
        assert fits.any(), f"no match for label {int(label)} box {box.tolist()} score {float(score)}"
        free[torch.where(fits)[0][0]] = False


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("layout", ["fpn", "c4", "dc5"])
def test_detector_trains_and_infers(layout, precision):
    dtype = PRECISIONS[precision]
    model = detector(layout).to(DEVICE).eval()
    images = photos(SIZES)  # uint8 on the CPU: the model moves them
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        results = model(images, original_sizes=[(2 * h, 2 * w) for h, w in SIZES])
    for result, (h, w) in zip(results, SIZES):
        assert result["boxes"].device.type == DEVICE.type and result["boxes"].dtype == torch.float32
        assert len(result["boxes"]) > 0 and torch.isfinite(result["boxes"]).all()
        assert result["boxes"][:, 2].max() <= 2 * w and result["boxes"][:, 3].max() <= 2 * h
    train_steps(model, images, TARGETS, dtype)


@pytest.mark.parametrize("layout", ["fpn", "c4", "dc5"])
def test_detector_fp32_equals_the_cpu(layout):
    """The same weights and inputs on the CPU and the device, every anchor and proposal sampled: the same
    losses (1e-4 relative) and, from the same weights in eval mode, the same detections."""
    cpu, dev = detector(layout, every_sample=True), detector(layout, every_sample=True).to(DEVICE)
    images = photos(SIZES)
    expected, got = cpu.train()(images, TARGETS), dev.train()(images, on(DEVICE, TARGETS))
    assert expected.keys() == got.keys()
    for key in expected:
        assert float(got[key].detach()) == pytest.approx(float(expected[key].detach()), rel=1e-4, abs=1e-6), key
    with torch.no_grad():
        for reference, candidate in zip(cpu.eval()(images), dev.eval()(images)):
            match(reference, candidate, box_tol=0.01, score_tol=1e-4)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_segmenter_trains_and_infers(precision):
    dtype = PRECISIONS[precision]
    model = segmenter().to(DEVICE)
    images = photos(SIZES)
    history = train_steps(model, images, seg_targets(SIZES), dtype)
    assert set(history[0]) == {"loss_seg", "loss_aux"}
    model.eval()
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(images)
    assert [tuple(logit.shape) for logit in logits] == [(5, *size) for size in SIZES]
    assert all(torch.isfinite(logit).all() and logit.device.type == DEVICE.type for logit in logits)


def test_segmenter_fp32_equals_the_cpu():
    cpu, dev = segmenter(dropout=0.0), segmenter(dropout=0.0).to(DEVICE)  # no random masks to differ
    images, targets = photos(SIZES), seg_targets(SIZES)
    expected, got = cpu.train()(images, targets), dev.train()(images, on(DEVICE, targets))
    for key in expected:
        assert float(got[key].detach()) == pytest.approx(float(expected[key].detach()), rel=1e-4), key
    with torch.no_grad():
        for reference, candidate in zip(cpu.eval()(images), dev.eval()(images)):
            assert (candidate.cpu() - reference).abs().max() <= 1e-3
            assert (candidate.argmax(0).cpu() == reference.argmax(0)).float().mean() >= 0.999


def test_torchvision_detector_gives_our_detections(tmp_path):
    """torchvision's fasterrcnn_resnet50_fpn and ours from its checkpoint, both on the device, on real
    photos at torchvision's test scale (one shape: torchvision's own resize leaves them as they are, and
    both pad the batch alike)."""
    from test_detection_model import ours_from_torchvision, torchvision_reference

    reference = torchvision_reference(0)
    ours = ours_from_torchvision(reference, tmp_path)
    reference, ours = reference.to(DEVICE), ours.to(DEVICE)
    images = photos([(480, 640), (480, 640)])
    with torch.no_grad():
        expected = reference([i.to(DEVICE).float() / 255 for i in images])
        got = ours(images, original_sizes=[tuple(i.shape[-2:]) for i in images])
    for e, g in zip(expected, got):
        assert len(g["boxes"]) == len(e["boxes"]) > 10
        match(e, g, box_tol=0.01, score_tol=1e-4, count=100)


def test_torchvision_fcn_gives_our_logits(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=21,
                                                             aux_loss=True)
    randomize_(reference).eval()
    torch.save(reference.state_dict(), tmp_path / "fcn.pth")
    ours = build_segmenter({"num_classes": 21, "backbone": {"name": "resnet", "depth": 50, "stride_in_1x1": False}}).eval()
    assert load_segmenter_weights(ours, tmp_path / "fcn.pth") == "torchvision-fcn"
    reference, ours = reference.to(DEVICE), ours.to(DEVICE)
    (image,) = photos([(200, 300)])
    mean = torch.tensor([0.485, 0.456, 0.406], device=DEVICE).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=DEVICE).view(3, 1, 1)
    with torch.no_grad():
        expected = reference(((image.to(DEVICE).float() / 255 - mean) / std)[None])["out"][0]
        (got,) = ours([image])
    assert (got - expected).abs().max().item() <= 1e-3


def test_sparse_roi_align_equals_torchvision_kernel():
    """``pooler_impl: sparse`` chosen on the device: forward and backward equal to torchvision's kernel."""
    from heads.roi_align import sparse_roi_align

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 16, 40, 56, generator=generator).to(DEVICE).requires_grad_()
    xy = torch.rand(30, 2, generator=generator) * torch.tensor([400.0, 280.0])
    wh = torch.rand(30, 2, generator=generator) * 120 + 2
    rois = torch.cat([torch.randint(0, 2, (30, 1), generator=generator).float(), xy, xy + wh], 1).to(DEVICE)
    expected = torchvision.ops.roi_align(features, rois, 7, spatial_scale=1 / 8, sampling_ratio=2, aligned=True)
    got = sparse_roi_align(features, rois, 7, 1 / 8, 2, aligned=True)
    assert (got - expected).abs().max() <= 1e-4
    weights = torch.randn(expected.shape, generator=generator).to(DEVICE)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), features)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), features)
    assert (got_grad - expected_grad).abs().max() <= 1e-4


@pytest.mark.parametrize("name, metric, bar", [("quickstart", "bbox/AP", 0.5), ("quickstart_mask", "segm/AP", 0.3)])
def test_engine_trains_and_evaluates_the_quickstart_on_one_gpu(tmp_path, name, metric, bar):
    """configs/quickstart.yaml and quickstart_mask.yaml as shipped, through accelerate on one device: the
    model trained on it and the README's bar reached (box AP >= 0.5; mask AP >= 0.3)."""
    from tasks.config import load_config
    from tasks.engine import train
    from tasks.registry import get_task

    config = load_config(ROOT / "configs" / f"{name}.yaml",
                         [f"data.root={tmp_path / 'synthetic'}", f"output_dir={tmp_path / 'run'}"])
    if DEVICE.type == "cpu":  # the dry run: the same path, a few iterations
        config.train.max_iters, config.train.checkpoint_period = 4, 0
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(get_task(config.task), config)
    if DEVICE.type == "cuda":
        assert torch.cuda.max_memory_allocated() > 0  # the model ran on the device
        assert result.metrics[metric] >= bar, result.metrics
    assert (tmp_path / "run" / "coco_results.json").is_file()


@pytest.mark.parametrize("layout", ["fpn", "c4", "dc5"])
def test_host_syncs_on_the_device_are_the_counted_ones(layout):
    """The host-blocking points tests/test_syncs.py holds (counted on the CPU with CUDA's code paths), counted
    on the device itself."""
    from test_syncs import OURS, detector_and_batch

    from tools.syncs import HostSyncs, count_model_syncs, cuda_code_paths

    model, _, images, targets = detector_and_batch(layout)
    counts = count_model_syncs(model.to(DEVICE), images, targets, DEVICE)
    assert (counts["train"].total, counts["infer"].total) == OURS[layout], counts["infer"].as_dict()
    with torch.no_grad(), cuda_code_paths(model), HostSyncs(images, DEVICE) as counter:  # and the evaluation's read
        model.eval()(images).cpu()
    copies = 1 if DEVICE.type == "cuda" else 0  # the whole batch in one copy (none: already on the host)
    assert counter.report.total == OURS[layout][1] + copies, counter.report.as_dict()
    with torch.no_grad():
        detections = model(images)
    for on_device, on_host in zip(detections, detections.cpu()):
        for name, field in on_device.items():
            assert on_host[name].device.type == "cpu" and on_host[name].dtype == field.dtype
            assert torch.equal(on_host[name], field.cpu()), name


def test_compiled_detector_gives_the_eager_detections_and_losses():
    """``train.compile``'s compilation (tasks/modeling/compiling.py) of a detector on the device: the eager
    model's detections, and its losses for the same sampled anchors and RoIs (same seed)."""
    from tasks.modeling.compiling import compile_model

    model = detector("fpn").to(DEVICE)
    compiled = compile_model(copy.deepcopy(model))  # in place: a twin of the same weights
    images = photos(SIZES)
    with torch.no_grad():
        expected, got = model.eval()(images), compiled.eval()(images)
    for reference, candidate in zip(expected, got):
        match(reference, candidate, box_tol=0.01, score_tol=1e-4)
    model.train()
    losses = []
    with torch._inductor.config.patch(fallback_random=True):  # the eager random numbers: the same samples
        for run in (model, compiled):
            torch.manual_seed(0)
            losses.append({k: float(v) for k, v in run(images, on(DEVICE, TARGETS)).items()})
    assert losses[0].keys() == losses[1].keys()
    assert all(abs(losses[0][k] - losses[1][k]) <= 1e-3 * max(1.0, abs(losses[0][k])) for k in losses[0]), losses


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need CUDA")
def test_cuda_graph_backbone_gives_the_eager_detections_and_losses():
    """``train.cuda_graphs`` (``capture_cuda_graphs``): the backbone recorded once, then replayed, gives the
    eager model's detections and training losses (same weights, same seed)."""
    from tasks.modeling.compiling import capture_cuda_graphs

    model = detector("fpn", every_sample=True).to(DEVICE)
    model.size_buckets = [(256, 320)]  # both sizes of photos(SIZES) padded to one static shape
    captured = capture_cuda_graphs(copy.deepcopy(model))
    images = photos(SIZES)
    with torch.no_grad():
        expected = model.eval()(images)
        for _ in range(3):  # warm-up, record, replay
            torch.compiler.cudagraph_mark_step_begin()
            got = captured.eval()(images)
    for reference, candidate in zip(expected, got):
        match(reference, candidate, box_tol=0.01, score_tol=1e-4)
    losses = []
    for run in (model.train(), captured.train()):
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            torch.manual_seed(0)
            step = run(images, on(DEVICE, TARGETS))
            sum(step.values()).backward()
        losses.append({k: float(v) for k, v in step.items()})
    assert all(abs(losses[0][k] - losses[1][k]) <= 1e-3 * max(1.0, abs(losses[0][k])) for k in losses[0]), losses
