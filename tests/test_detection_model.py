"""Faster R-CNN: torchvision equivalence on real photos, empty images, crowd regions, every layout and
depth builds, and a tiny detector overfits a few images."""

import glob
import json
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from conftest import randomize_frozen_
from PIL import Image
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from backbones.errors import UserError
from tasks.detection import build_detector
from tasks.detection.checkpoint import load_detector_weights
from tasks.detection.data import CocoDetection, detection_transform
from tasks.detection.model import pad_targets
from tasks.modeling.batching import batch_images

ROOT = Path(__file__).resolve().parents[1]
TINYCOCO = ROOT.parent / "shared" / "data" / "tinycoco"
TINY = {
    "backbone": {"name": "resnet", "depth": 18, "stride_in_1x1": False, "norm": "BN", "freeze_at": 0},
    "rpn": {"batch_size_per_image": 64, "pre_nms_topk": [300, 300], "post_nms_topk": [100, 100]},
    "roi_heads": {"batch_size_per_image": 64, "fc_dim": 256},
}


def tiny_detector(layout: str, num_classes: int = 3, **overrides):
    return build_detector({"layout": layout, "num_classes": num_classes, **TINY, **overrides})


def torchvision_reference(seed: int, min_size: int = 480) -> torchvision.models.detection.FasterRCNN:
    """torchvision's fasterrcnn_resnet50_fpn layout (FrozenBN, 3 trainable stages) with random weights and
    random norm statistics, no score threshold."""
    torch.manual_seed(seed)
    body = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    reference = torchvision.models.detection.FasterRCNN(
        _resnet_fpn_extractor(body, 3), num_classes=91, min_size=min_size, max_size=1333, box_score_thresh=0.0
    )
    return randomize_frozen_(reference).eval()


def ours_from_torchvision(reference: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Our torchvision-exact detector (no score threshold), loaded from ``reference``'s checkpoint file."""
    torch.save(reference.state_dict(), folder / "fasterrcnn.pth")
    config = yaml.safe_load(open(ROOT / "configs" / "frcnn_r50_fpn_torchvision.yaml"))["model"]
    config["roi_heads"]["score_thresh"] = 0.0
    ours = build_detector(config).eval()
    assert load_detector_weights(ours, folder / "fasterrcnn.pth") == "torchvision-detection"
    return ours


def in_tie_order(detections: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detections best first, those of exactly equal scores by label, then x1, then y1: the order NMS leaves
    tied detections in is its sort's choice (random weights saturate many scores to 1.0)."""
    order = torch.arange(len(detections["scores"]))
    for key in (detections["boxes"][:, 1], detections["boxes"][:, 0], detections["labels"].double(), -detections["scores"]):
        order = order[key[order].argsort(stable=True)]
    return {k: v[order] for k, v in detections.items()}


def test_torchvision_fasterrcnn_equivalence(tmp_path):
    """torchvision's fasterrcnn_resnet50_fpn and ours, same random weights (loaded from torchvision's
    checkpoint format), same real photos at torchvision's test scale: same detections."""
    reference = torchvision_reference(0)
    ours = ours_from_torchvision(reference, tmp_path)

    files = sorted(glob.glob(str(TINYCOCO / "images" / "val2017" / "*.jpg")))[:3]
    images = []
    for path in files:  # bring each photo to the test scale (shorter side 480) beforehand
        image = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)
        h, w = image.shape[-2:]
        images.append(torchvision.transforms.functional.resize(image, [480, round(w * 480 / h)] if h <= w else [round(h * 480 / w), 480]))
    with torch.no_grad():
        expected = reference([i.float() / 255 for i in images])
        got = ours(images, original_sizes=[tuple(i.shape[-2:]) for i in images])
    for e, g in zip(expected, got):
        assert len(g["boxes"]) == len(e["boxes"]) > 10
        e, g = in_tie_order(e), in_tie_order(g)
        assert torch.equal(g["labels"][:100], e["labels"][:100])
        assert (g["boxes"][:100] - e["boxes"][:100]).abs().max() <= 0.01
        assert (g["scores"][:100] - e["scores"][:100]).abs().max() <= 1e-4


def test_checkpoint_mismatch_is_explained(tmp_path):
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(reference.state_dict(), tmp_path / "fasterrcnn.pth")
    config = yaml.safe_load(open(ROOT / "configs" / "frcnn_r50_fpn_torchvision.yaml"))["model"]
    config["num_classes"] = 80
    with pytest.raises(ValueError, match="num_classes"):
        load_detector_weights(build_detector(config), tmp_path / "fasterrcnn.pth")


@pytest.mark.parametrize("layout", ["fpn", "c4", "dc5"])
@pytest.mark.parametrize("pooler_impl", ["torchvision", "sparse"])
def test_no_proposal_at_all_gives_empty_detections(layout, pooler_impl):
    """An RPN that proposes nothing (here: no score passes its threshold) leaves every image with an empty
    result, not an error."""
    rpn = {**TINY["rpn"], "score_thresh": 1.1}
    model = tiny_detector(layout, rpn=rpn, roi_heads={**TINY["roi_heads"], "pooler_impl": pooler_impl}).eval()
    with torch.no_grad():
        results = model([torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)] * 2)
    assert [len(r["boxes"]) for r in results] == [0, 0]
    assert all(r["boxes"].shape == (0, 4) and len(r["scores"]) == len(r["labels"]) == 0 for r in results)


@pytest.mark.parametrize("layout", ["fpn", "c4", "dc5"])
def test_trains_and_infers_under_bf16_autocast(layout):
    """bf16 mixed precision (what ``train.mixed_precision: bf16`` turns on) on the CPU, with the sparse
    RoIAlign, which runs in float32 inside autocast: finite losses, gradients, detections."""
    model = tiny_detector(layout, roi_heads={**TINY["roi_heads"], "pooler_impl": "sparse"})
    images = [torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        results = model.eval()(images)
    assert results[0]["boxes"].shape[1] == 4


@pytest.mark.parametrize("layout", ["fpn", "c4", "dc5"])
def test_image_without_boxes_trains_with_zero_box_loss(layout):
    model = tiny_detector(layout).train()
    images = [torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, empty)
    assert losses["loss_rpn_box"].item() == 0 and losses["loss_box"].item() == 0
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_crowd_boxes_are_ignored_by_the_rpn():
    model = tiny_detector("fpn")
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [100.0, 100.0, 132.0, 132.0], [300.0, 300.0, 310.0, 310.0]])
    target = {"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0], [100.0, 100.0, 132.0, 132.0]]),
              "labels": torch.tensor([1, 2]), "iscrowd": torch.tensor([False, True])}
    labels, matched = model.rpn.label_anchors(anchors, [target])
    assert labels.tolist() == [[1, -1, 0]]


def test_crowd_boxes_are_ignored_by_the_roi_heads():
    model = tiny_detector("fpn")
    proposals = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [100.0, 100.0, 131.0, 131.0], [300.0, 300.0, 310.0, 310.0],
                               [0.0, 0.0, 31.0, 31.0]]])
    valid = torch.tensor([[True, True, True, False]])  # the last: a row's filler, not a proposal
    target = {"boxes": torch.tensor([[1.0, 1.0, 32.0, 32.0], [100.0, 100.0, 132.0, 132.0]]),
              "labels": torch.tensor([3, 2]), "iscrowd": torch.tensor([False, True])}
    sampled, labels, _, _ = model.roi_heads.sample_proposals(proposals, valid, [target])
    assert sampled.shape == (1, 6, 4) and labels.shape == (1, 6)  # all 6 candidates: fewer than batch_size_per_image
    by_box = {tuple(box.tolist()): int(label) for box, label in zip(sampled[0], labels[0]) if label >= 0}
    assert len(by_box) == 3  # a foreground proposal, the ground-truth box itself, a background proposal
    assert by_box[(0.0, 0.0, 32.0, 32.0)] == 3 and by_box[(1.0, 1.0, 32.0, 32.0)] == 3
    assert (100.0, 100.0, 131.0, 131.0) not in by_box  # matched to the crowd box: neither fg nor bg
    assert by_box[(300.0, 300.0, 310.0, 310.0)] == 0
    assert (100.0, 100.0, 132.0, 132.0) not in by_box  # crowd boxes are not added as proposals
    assert (0.0, 0.0, 31.0, 31.0) not in by_box  # nor fillers


@pytest.mark.parametrize("layout", ["fpn", "c4", "dc5"])
@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_every_layout_builds_for_every_depth(layout, depth):
    with torch.device("meta"):
        model = build_detector({"layout": layout, "backbone": {"name": "resnet", "depth": depth, "stride_in_1x1": False}})
    expected_features = {"fpn": ["p2", "p3", "p4", "p5", "p6"], "c4": ["res4"], "dc5": ["res5"]}[layout]
    assert model.rpn.in_features == expected_features
    if layout == "c4":
        assert not hasattr(model.backbone, "res5") and model.roi_heads.box_head.out_channels == (2048 if depth >= 50 else 512)


@pytest.mark.parametrize("layout", ["fpn", "c4", "dc5"])
def test_timm_backbone_in_every_layout(layout):
    model = build_detector({"layout": layout, "num_classes": 2, **{**TINY, "backbone": {"name": "timm", "model": "resnet18"}}})
    model.train()
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])}]
    losses = model([torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)], targets)
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (detections,) = model([torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)], original_sizes=[(192, 256)])
    assert detections["boxes"].shape[1] == 4 and detections["boxes"][:, 2].max() <= 256


def test_detector_config_errors_name_the_key():
    with pytest.raises(UserError, match="model.rpn.nms_thresold"):
        build_detector({"rpn": {"nms_thresold": 0.5}})
    with pytest.raises(ValueError, match="layout"):
        build_detector({"layout": "c5"})
    with pytest.raises(UserError, match="out_features"):
        build_detector({"backbone": {"name": "resnet", "depth": 18, "out_features": ["res5"]}})
    with pytest.raises(UserError, match=r"model.roi_heads.nms_thresh must be a number .*got 'high'"):
        build_detector({"roi_heads": {"nms_thresh": "high"}})


def test_boxes_are_rescaled_to_the_original_size():
    model = tiny_detector("fpn").eval()
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        (small,) = model([image])
        (scaled,) = model([image], original_sizes=[(128, 192)])
    assert torch.allclose(scaled["boxes"], small["boxes"] * 2)


@pytest.mark.parametrize("layout,steps", [("fpn", 60), ("c4", 40), ("dc5", 40)])
def test_tiny_detector_overfits_a_few_real_images(layout, steps):
    """60 AdamW steps on two photos take FPN's loss to a fifth of its start, 40 take C4's and DC5's to a
    fifth and a sixth (one thread): each must end below a quarter."""
    torch.manual_seed(0)
    dataset = CocoDetection(
        TINYCOCO / "annotations" / "instances_val2017.json",
        TINYCOCO / "images" / "val2017",
        detection_transform(False, (128,), 192),
        train=True,
    )
    items = [dataset[0], dataset[1]]
    images = [image for image, _ in items]
    targets = [{k: t[k] for k in ("boxes", "labels", "iscrowd")} for _, t in items]
    # C4 runs res5 on every sampled region: fewer, smaller regions keep the test short
    c4 = {"roi_heads": {"batch_size_per_image": 32, "fc_dim": 256, "pooler_resolution": 8}} if layout == "c4" else {}
    model = tiny_detector(layout, num_classes=dataset.num_classes, **c4).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(steps):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < history[0] / 4, (layout, history)


def test_infer_tool_reproduces_torchvision_from_its_checkpoint(tmp_path):
    """tools/infer.py with the torchvision config and a torchvision checkpoint file writes the detections
    torchvision's model gives for the same photos (at the test scale), in COCO results format."""
    from tools.infer import main

    reference = torchvision_reference(1)
    torch.save(reference.state_dict(), tmp_path / "fasterrcnn_resnet50_fpn_coco.pth")
    folder = tmp_path / "photos"
    folder.mkdir()
    images = {}
    for path in sorted(glob.glob(str(TINYCOCO / "images" / "train2017" / "*.jpg")))[:2]:
        image = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)
        h, w = image.shape[-2:]
        image = torchvision.transforms.functional.resize(image, [480, round(w * 480 / h)] if h <= w else [round(h * 480 / w), 480])
        name = Path(path).stem + ".png"  # lossless, so both sides read the same pixels
        torchvision.io.write_png(image, str(folder / name))
        images[name] = image
    assert main([str(ROOT / "configs" / "frcnn_r50_fpn_torchvision.yaml"), "--weights", str(tmp_path / "fasterrcnn_resnet50_fpn_coco.pth"),
                 "--input", str(folder), "--output", str(tmp_path / "out"), "data.min_size_test=480",
                 "model.roi_heads.score_thresh=0.0"]) == 0
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    with torch.no_grad():  # one image at a time, as the tool runs them (padding a batch changes borders)
        expected = [reference([i.float() / 255])[0] for i in images.values()]
    for name, e in zip(images, expected):
        got = [p for p in predictions if p["file_name"] == name]
        assert len(got) == len(e["boxes"]) > 10 and got[0]["image_id"] == int(Path(name).stem)
        assert [p["category_id"] for p in got] == e["labels"].tolist()
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (p["bbox"] for p in got)])
        assert (boxes - e["boxes"]).abs().max() <= 0.01
        assert (torch.tensor([p["score"] for p in got]) - e["scores"]).abs().max() <= 1e-4
        assert (tmp_path / "out" / (Path(name).stem + ".png")).is_file()


def test_evaluation_shards_read_by_workers_give_the_same_results():
    """Evaluation reads its images in DataLoader workers, each process its own shard (every n-th image):
    over 1, 2 and 3 shards of 7 real photos, read by 2 workers, the union of the results is the results
    file of one process reading in its main loop; nothing is duplicated or dropped at shard edges."""
    from tasks.detection.task import DetectionTask

    dataset = CocoDetection(TINYCOCO / "annotations" / "instances_train2017.json", TINYCOCO / "images" / "train2017",
                            detection_transform(False, (160,), 240), train=False)
    model = tiny_detector("fpn", num_classes=dataset.num_classes, roi_heads={"score_thresh": 0.0, "fc_dim": 256}).eval()
    task, images = DetectionTask(), list(range(7))

    def key(result):
        return result["image_id"], result["category_id"], result["score"], tuple(result["bbox"])

    expected = sorted(task.predict(model, dataset, images), key=key)
    assert len({r["image_id"] for r in expected}) == 7
    for processes in (1, 2, 3):
        shards = [task.predict(model, dataset, images[rank::processes], num_workers=2) for rank in range(processes)]
        assert sorted((r for shard in shards for r in shard), key=key) == expected, processes


def test_drawings_colour_each_class_and_hide_low_scores():
    """Each class in its own colour (the same in every picture), labels on a filled background, detections
    below the threshold left out; the validation drawing puts the ground truth beside the predictions."""
    import numpy as np

    from tasks.detection.drawing import class_color, draw_detections, side_by_side

    image = np.full((120, 200, 3), 255, np.uint8)
    detections = {"boxes": torch.tensor([[10.0, 40.0, 60.0, 100.0], [100.0, 40.0, 180.0, 110.0], [5.0, 5.0, 195.0, 115.0]]),
                  "labels": torch.tensor([1, 2, 3]), "scores": torch.tensor([0.9, 0.8, 0.1])}
    drawn = np.asarray(draw_detections(image, detections, {1: "circle", 2: "square", 3: "triangle"}, 0.5))
    assert class_color(1) != class_color(2)
    assert tuple(drawn[70, 10]) == class_color(1) and tuple(drawn[70, 100]) == class_color(2)  # left edges
    assert tuple(drawn[60, 5]) == (255, 255, 255)  # the low-scoring box is not drawn
    assert (drawn[42:50, 12:40] == class_color(1)).all(axis=-1).sum() > 20  # its label's filled background (inside, on top)
    truth = draw_detections(image, {"boxes": detections["boxes"][:1], "labels": detections["labels"][:1]}, {})
    assert tuple(np.asarray(truth)[70, 10]) == class_color(1)  # ground truth: no scores, all drawn
    both = side_by_side(truth, Image.fromarray(drawn))
    assert both.size == (2 * 200 + 6, 120)


def test_batches_are_padded_to_the_smallest_bucket_that_holds_them():
    mean, std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    images = [torch.zeros(3, 100, 120, dtype=torch.uint8), torch.zeros(3, 90, 130, dtype=torch.uint8)]
    assert batch_images(images, mean, std, 32)[0].shape[-2:] == (128, 160)  # its own size, rounded up
    buckets = [(256, 256), (150, 170), (130, 500)]  # rounded up to (160, 192); the smallest area that holds it
    batch, sizes = batch_images(images, mean, std, 32, buckets=buckets)
    assert batch.shape[-2:] == (160, 192) and sizes == [(100, 120), (90, 130)]
    assert batch_images(images, mean, std, 32, buckets=[(96, 500)])[0].shape[-2:] == (128, 160)  # none holds it


def test_padded_targets_label_the_anchors_as_the_targets_themselves():
    """``pad_targets``: the count a power of two from 8 up, label 0 (padding) matching nothing, so the RPN's
    anchor labels and matched boxes and the RoI heads' labels equal those of the unpadded targets."""
    model = tiny_detector("fpn")
    targets = [{"boxes": torch.tensor([[10.0, 10, 60, 70], [80, 40, 150, 120], [0, 0, 30, 30]]),
                "labels": torch.tensor([1, 2, 3]), "iscrowd": torch.tensor([0, 0, 1])},
               {"boxes": torch.cat([corners := torch.rand(9, 2, generator=torch.Generator().manual_seed(0)) * 100,
                                    corners + 40], dim=1), "labels": torch.ones(9, dtype=torch.int64)}]
    padded = pad_targets(targets, torch.device("cpu"))
    assert [len(t["boxes"]) for t in padded] == [16, 16] and padded[0]["labels"][3:].eq(0).all()
    assert padded[1]["iscrowd"].eq(0).all() and set(padded[0]) == {"boxes", "labels", "iscrowd"}
    assert len(pad_targets([targets[0]], torch.device("cpu"))[0]["boxes"]) == 8
    maps = [torch.zeros(2, 8, 160 // s, 192 // s) for s in (4, 8, 16, 32, 64)]
    anchors = model.rpn.anchors(maps)
    for ours, theirs in zip(model.rpn.label_anchors(anchors, padded), model.rpn.label_anchors(anchors, targets)):
        assert torch.equal(ours, theirs)
    boxes = torch.cat([anchors[:500], targets[0]["boxes"]])
    for target, plain in zip(padded[:1], targets[:1]):
        assert all(torch.equal(a, b) for a, b in zip(model.roi_heads._label(boxes, target),
                                                       model.roi_heads._label(boxes, plain)))


# The norms of detectron2's SyncBN / GN baselines (its Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml): the FPN's,
# the "4conv1fc" box head's and the mask head's, each written out here from detectron2's parameter names.
def _detectron2_conv_names(prefix: str, count: int, norm: str) -> list[str]:
    """detectron2's names of ``count`` ``layers.Conv2d`` with ``norm`` (``<prefix><k>``, k from 1)."""
    stats = ["running_mean", "running_var", "num_batches_tracked"] if norm in ("BN", "SyncBN") else []
    return [f"{prefix}{k}.{p}" for k in range(1, count + 1) for p in ["weight", "norm.weight", "norm.bias", *[f"norm.{s}" for s in stats]]]


def _by_hand(x: torch.Tensor, params: dict[str, torch.Tensor], names: list[str], norm: str, training: bool) -> torch.Tensor:
    """detectron2's conv -> norm -> ReLU of each of ``names`` (their prefixes), with torch.nn.functional and
    the parameters by detectron2's name; the running statistics in ``params`` are updated in training."""
    import torch.nn.functional as F

    for name in names:
        x = F.conv2d(x, params[f"{name}.weight"], padding=1)
        if norm == "GN":
            x = F.group_norm(x, 32, params[f"{name}.norm.weight"], params[f"{name}.norm.bias"])
        else:
            x = F.batch_norm(x, params[f"{name}.norm.running_mean"], params[f"{name}.norm.running_var"],
                             params[f"{name}.norm.weight"], params[f"{name}.norm.bias"], training=training)
        x = F.relu(x)
    return x


def _randomize_norms(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)


def _detectron2_params(module: torch.nn.Module, prefix: str, names: list[str]) -> dict[str, torch.Tensor]:
    """``module``'s tensors by detectron2's ``names``: each mapped by the checkpoint importer to ours, so the
    mapping and our module's keys are checked against the list written from detectron2's code."""
    from tasks.detection.checkpoint import _map_detectron2_detection_key

    own = {f"{prefix}.{k}": v for k, v in module.state_dict().items()}
    mapped = {name: _map_detectron2_detection_key(f"{prefix}.{name}") for name in names}
    assert sorted(mapped.values()) == sorted(own), "our keys are detectron2's names, mapped"
    return {name: own[key].clone() for name, key in mapped.items()}


@pytest.mark.parametrize("norm", ["BN", "GN"])
def test_4conv1fc_box_head_is_detectron2s_conv_fc_head(norm):
    """``roi_heads: {num_conv: 4, num_fc: 1, norm}``: detectron2's FastRCNNConvFCHead (``conv1..conv4``, each
    3x3 without bias, its norm and ReLU; flatten; ``fc1`` and ReLU): its parameter names, and the same
    features as that head written with torch.nn.functional from the same weights, with batch statistics in
    training (the running ones updated alike) and the running ones at evaluation."""
    import torch.nn.functional as F

    model = tiny_detector("fpn", roi_heads={**TINY["roi_heads"], "num_conv": 4, "num_fc": 1, "conv_dim": 32, "norm": norm})
    head = model.roi_heads.box_head
    _randomize_norms(head)
    names = _detectron2_conv_names("conv", 4, norm) + ["fc1.weight", "fc1.bias"]
    params = _detectron2_params(head, "roi_heads.box_head", names)
    assert head.out_channels == 256 and params["fc1.weight"].shape == (256, 32 * 7 * 7)
    x = torch.randn(6, 256, 7, 7)
    for training in (True, False):
        with torch.no_grad():
            got = head.train(training)(x)
            expected = _by_hand(x, params, [f"conv{k}" for k in range(1, 5)], norm, training)
            expected = F.relu(F.linear(expected.flatten(1), params["fc1.weight"], params["fc1.bias"]))
        assert (got - expected).abs().max() < 1e-4, training
    if norm == "BN":
        assert torch.allclose(head.convs[3].norm.running_var, params["conv4.norm.running_var"], atol=1e-6)


@pytest.mark.parametrize("norm", ["SyncBN", "GN"])
def test_normed_mask_head_is_detectron2s_and_normalizes_over_the_positives(norm):
    """``mask_head.norm``: detectron2's MaskRCNNConvUpsampleHead with ``ROI_MASK_HEAD.NORM`` (``mask_fcn1..4``
    without bias, each with its norm and ReLU, then ``deconv`` and ``predictor``): its parameter names and
    its logits, by hand with torch.nn.functional from the same weights. In training the head sees a fixed
    number of slots, ``weight`` 1 for the positives: a batch norm's statistics (and its running ones) are
    those of the positives alone, what detectron2's head, fed the positives only, computes; with no
    positive at all, those of every slot (finite). A group norm is per region either way."""
    import torch.nn.functional as F

    from heads import MaskHead

    head = MaskHead(32, 3, num_conv=4, conv_dim=32, norm=norm)
    _randomize_norms(head)
    names = _detectron2_conv_names("mask_fcn", 4, norm) + ["deconv.weight", "deconv.bias", "predictor.weight",
                                                           "predictor.bias"]
    params = _detectron2_params(head, "roi_heads.mask_head", names)

    def by_hand(x, training):
        x = _by_hand(x, params, [f"mask_fcn{k}" for k in range(1, 5)], norm, training)
        x = F.relu(F.conv_transpose2d(x, params["deconv.weight"], params["deconv.bias"], stride=2))
        return F.conv2d(x, params["predictor.weight"], params["predictor.bias"])

    x = torch.randn(8, 32, 14, 14)
    positive = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])
    with torch.no_grad():
        got = head.train()(x, positive)
        expected = by_hand(x[positive == 1], training=True)  # detectron2's: the positives alone
        assert got.shape == (8, 3, 28, 28) and (got[positive == 1] - expected).abs().max() < 1e-4
        if norm == "SyncBN":
            for k in range(4):
                assert torch.allclose(head.convs[k].norm.running_mean, params[f"mask_fcn{k + 1}.norm.running_mean"], atol=1e-6)
                assert torch.allclose(head.convs[k].norm.running_var, params[f"mask_fcn{k + 1}.norm.running_var"], atol=1e-6)
        assert (head.eval()(x) - by_hand(x, training=False)).abs().max() < 1e-4
        head.train()
        nothing = head(x, torch.zeros(8, dtype=torch.int64))
        assert torch.isfinite(nothing).all() and (nothing - head(x)).abs().max() < 1e-4  # the statistics of all slots


def test_default_heads_and_fpn_keep_their_modules_and_keys():
    """Without the norm keys the FPN, the box head and the mask head are what they were: plain convolutions
    with biases, two fc layers, the same state dict keys; the keys given at their defaults build the same
    network with the same initial weights."""
    from backbones import NormedConv2d

    torch.manual_seed(0)
    model = tiny_detector("fpn", masks=True)
    torch.manual_seed(0)
    explicit = tiny_detector("fpn", masks=True, fpn={"norm": ""}, mask_head={"norm": ""},
                             roi_heads={**TINY["roi_heads"], "num_conv": 0, "conv_dim": 256, "norm": ""})
    state = model.state_dict()
    assert [k for k in state if k.startswith("roi_heads.box_head.")] == [
        f"roi_heads.box_head.fcs.{i}.{p}" for i in range(2) for p in ("weight", "bias")]
    assert [k for k in state if k.startswith("roi_heads.mask_head.")] == [
        *[f"roi_heads.mask_head.convs.{i}.{p}" for i in range(4) for p in ("weight", "bias")],
        *[f"roi_heads.mask_head.{m}.{p}" for m in ("deconv", "predictor") for p in ("weight", "bias")]]
    assert [k for k in state if k.startswith("backbone.") and not k.startswith("backbone.bottom_up.")] == [
        f"backbone.{kind}_convs.{i}.{p}" for kind in ("lateral", "output") for i in range(4) for p in ("weight", "bias")]
    assert not any(isinstance(m, NormedConv2d) for m in model.modules())
    assert list(explicit.state_dict()) == list(state)
    assert all(torch.equal(v, explicit.state_dict()[k]) for k, v in state.items())


def test_syncbn_in_the_fpn_and_both_heads_trains_in_one_cpu_process():
    """SyncBN in the FPN, the 4conv1fc box head and the mask head (detectron2's SyncBN baseline) in a single
    CPU process, as the backbone's SyncBN runs there: SyncBatchNorm normalizes with its own batch (no process
    group to reduce over), every one of them trains, and the model detects at evaluation."""
    model = tiny_detector("fpn", masks=True, fpn={"norm": "SyncBN", "out_channels": 32},
                          roi_heads={**TINY["roi_heads"], "num_conv": 4, "num_fc": 1, "conv_dim": 32, "norm": "SyncBN"},
                          mask_head={"norm": "SyncBN", "conv_dim": 16})
    norms = {name for name, m in model.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)}
    assert len([n for n in norms if n.startswith("backbone.") and not n.startswith("backbone.bottom_up")]) == 8
    assert len([n for n in norms if n.startswith("roi_heads.box_head.")]) == 4
    assert len([n for n in norms if n.startswith("roi_heads.mask_head.")]) == 4
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    masks = torch.zeros(1, 96, 128, dtype=torch.uint8)
    masks[0, 20:60, 30:90] = 1
    target = {"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([1]), "masks": masks}
    losses = model.train()([image, image.flip(-1)], [target, {**target, "masks": masks.flip(-1),
                                                             "boxes": torch.tensor([[38.0, 20.0, 98.0, 60.0]])}])
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    assert all(model.get_submodule(n).weight.grad is not None for n in norms if not n.startswith("backbone.bottom_up"))
    with torch.no_grad():
        (detections,) = model.eval()([image])
    assert detections["mask_probs"].shape[1:] == (28, 28)


@pytest.mark.parametrize("overrides, message", [
    ({"fpn": {"norm": "LN"}}, r"model.fpn.norm must be one of '', 'BN', 'FrozenBN', 'SyncBN', 'GN'.*got 'LN'"),
    ({"mask_head": {"norm": "syncbn"}}, r"model.mask_head.norm must be one of"),
    ({"layout": "c4", "roi_heads": {"norm": "SyncBN"}}, r"C4's box head is the res5 stage, normalized by model.backbone.norm"),
])
def test_norm_key_errors_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        build_detector({"backbone": TINY["backbone"], **overrides})


def _two_process_batch_norm(rank: int, port: int, x: torch.Tensor, weight: torch.Tensor, out: Path) -> None:
    """One of two gloo processes: its half of the regions through ``batch_norm_over`` with a SyncBatchNorm."""
    import torch.distributed as dist

    from backbones import batch_norm_over

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        norm = torch.nn.SyncBatchNorm(x.shape[1]).train()
        mine = x[rank * 3: rank * 3 + 3].clone().requires_grad_()
        y = batch_norm_over(norm, mine, weight[rank * 3: rank * 3 + 3])
        (y * torch.arange(y.numel()).view_as(y).sin() * (1 + rank)).sum().backward()
        torch.save((y.detach(), mine.grad, norm.running_mean, norm.running_var), out / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_batch_norm_over_the_positives_of_every_process(tmp_path):
    """A SyncBatchNorm of the mask head in a process group of two: the statistics of the positives of both
    processes, reduced together (differentiably: each process's gradients are those of one process holding
    every region); outputs, input gradients and running statistics are the single-process ones over all."""
    import torch.multiprocessing as mp
    from conftest import free_port

    from backbones import batch_norm_over

    x, weight = torch.randn(6, 4, 5, 5), torch.tensor([1, 0, 1, 0, 0, 1])
    mp.get_context("forkserver").set_forkserver_preload([__name__])  # the imports once, for both processes
    mp.start_processes(_two_process_batch_norm, args=(free_port(), x, weight, tmp_path), nprocs=2,
                       start_method="forkserver")
    norm = torch.nn.SyncBatchNorm(4).train()
    whole = x.clone().requires_grad_()
    y = batch_norm_over(norm, whole, weight)
    half = torch.arange(y[:3].numel()).view_as(y[:3]).sin()
    (y * torch.cat([half, 2 * half])).sum().backward()
    for rank in (0, 1):
        got, grad, mean, var = torch.load(tmp_path / f"{rank}.pt")
        rows = slice(rank * 3, rank * 3 + 3)
        assert torch.allclose(got, y[rows].detach(), atol=1e-5) and torch.allclose(grad, whole.grad[rows], atol=1e-5)
        assert torch.allclose(mean, norm.running_mean, atol=1e-6) and torch.allclose(var, norm.running_var, atol=1e-6)
