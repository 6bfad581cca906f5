"""Mask R-CNN: torchvision's and detectron2's own outputs reproduced from their checkpoints (boxes, 28x28 mask
probabilities, pasted masks), the mask targets and pastes against their libraries, the instance data path,
segm evaluation, training and the tools."""

from __future__ import annotations

import glob
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import randomize_frozen_
from PIL import Image
from pycocotools import mask as mask_utils
from test_detectron2 import _match, _photo, photo_folder
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes
from torchvision.ops.misc import FrozenBatchNorm2d

from heads import paste_masks
from heads.mask_head import mask_targets
from tasks.config import load_config
from tasks.detection.checkpoint import load_detector_weights
from tasks.detection.data import CocoDetection, detection_transform
from tasks.detection.model import build_detector
from tasks.registry import prepare_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
REFERENCE = SHARED / "detectron2_reference"
TINYCOCO = SHARED / "tinycoco"
PHOTOS = TINYCOCO / "images" / "val2017"
CONFIGS = ROOT / "configs"
# the reference models' narrow widths (detectron2_reference's README) and no ImageNet initialisation
NARROW = ["model.backbone.width_per_group=8", "model.backbone.res2_out_channels=32", "model.fpn.out_channels=64",
          "model.roi_heads.fc_dim=128", "model.mask_head.conv_dim=64", "model.backbone.weights=null"]
# the speed options that change float rounding, off
EXACT = ["model.backbone.fold_frozen_bn=false", "model.channels_last=false"]


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "as_shipped"])
@pytest.mark.parametrize("layout", ["FPN", "C4"])
def test_zoo_checkpoint_gives_detectron2_masks(layout, exact):
    """detectron2's own Mask R-CNN outputs on real photos, from its zoo-format checkpoint through our
    ``configs/detectron2`` config: boxes, scores, classes, the mask head's probabilities of the first 20
    detections and every pasted mask."""
    name = f"mask_rcnn_R_50_{layout}_1x"
    reference = json.loads((REFERENCE / f"{name}_outputs.json").read_text())
    config = load_config(CONFIGS / "detectron2" / f"{name}.yaml", NARROW + (EXACT if exact else []))
    model = build_detector(config.model)
    assert load_detector_weights(model, REFERENCE / f"{name}.pkl") == "detectron2-detection"
    model.eval()
    corner, score, prob = (0.05, 1e-3, 1e-4) if exact else (0.25, 5e-3, 5e-3)
    for file, expected in reference["images"].items():
        image = _photo(file)
        with torch.no_grad():
            (found,) = model([image]).cpu()
        found = model.paste_masks(found, image.shape[1:])
        boxes, scores = torch.tensor(expected["boxes"]), torch.tensor(expected["scores"])
        assert len(found["boxes"]) == len(boxes), f"{name} {file}: number of detections"
        match = _match(found["boxes"], boxes)
        assert sorted(match.tolist()) == list(range(len(boxes))), f"{name} {file}: detections not one to one"
        assert (found["boxes"][match] - boxes).abs().max() < corner, f"{name} {file}: boxes"
        assert (found["scores"][match] - scores).abs().max() < score, f"{name} {file}: scores"
        assert torch.equal(found["labels"][match], torch.tensor(expected["classes"]) + 1), f"{name} {file}: classes"
        probs = torch.tensor(expected["mask_probs_28_first20"])
        assert found["mask_probs"].shape[1:] == probs.shape[1:] == ((28, 28) if layout == "FPN" else (14, 14))
        assert (found["mask_probs"][match[:20]] - probs).abs().max() < prob, f"{name} {file}: mask probabilities"
        theirs = torch.from_numpy(mask_utils.decode([{**rle, "counts": rle["counts"].encode()} for rle in expected["masks_rle"]]))
        theirs = theirs.permute(2, 0, 1).bool()
        ious = [_iou(found["masks"][m], t) for m, t in zip(match.tolist(), theirs)]
        assert min(ious) >= 0.99, f"{name} {file}: pasted masks (lowest IoU {min(ious):.4f})"


def torchvision_maskrcnn(seed: int) -> torchvision.models.detection.MaskRCNN:
    """torchvision's maskrcnn_resnet50_fpn layout (FrozenBN, 3 trainable stages) with random weights and random
    norm statistics, no score threshold, images taken at their size (shorter side 480). The predictors are
    scaled down so that a photo has 100 detections and mask logits spread around 0 (not saturated)."""
    torch.manual_seed(seed)
    body = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    reference = torchvision.models.detection.MaskRCNN(
        _resnet_fpn_extractor(body, 3), num_classes=91, min_size=480, max_size=1333, box_score_thresh=0.0)
    with torch.no_grad():
        heads = reference.roi_heads
        heads.box_predictor.cls_score.weight.normal_(0, 0.003)
        heads.box_predictor.bbox_pred.weight.normal_(0, 0.0003)
        heads.mask_predictor.mask_fcn_logits.weight.mul_(0.003)
    return randomize_frozen_(reference).eval()


def test_torchvision_maskrcnn_equivalence(tmp_path):
    """torchvision's Mask R-CNN and ours (configs/mask_rcnn_r50_fpn_torchvision.yaml), the same random weights
    loaded from torchvision's checkpoint format, the same real photos: the same boxes, the same 28x28 mask
    probabilities, the same pasted masks."""
    reference = torchvision_maskrcnn(0)
    torch.save(reference.state_dict(), tmp_path / "maskrcnn.pth")
    config = load_config(CONFIGS / "mask_rcnn_r50_fpn_torchvision.yaml", ["model.roi_heads.score_thresh=0.0"])
    ours = build_detector(config.model).eval()
    assert load_detector_weights(ours, tmp_path / "maskrcnn.pth") == "torchvision-detection"
    probabilities = []  # torchvision's 28x28 probabilities, before its paste (which replaces them in place)
    reference.roi_heads.register_forward_hook(
        lambda module, args, output: probabilities.append([image["masks"].clone() for image in output[0]]))

    files = sorted(glob.glob(str(PHOTOS / "*.jpg")))[:2]
    images = []
    for path in files:  # each photo at the test scale (shorter side 480) beforehand
        image = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)
        h, w = image.shape[-2:]
        images.append(torchvision.transforms.functional.resize(image, [480, round(w * 480 / h)] if h <= w else [round(h * 480 / w), 480]))
    with torch.no_grad():
        expected = reference([i.float() / 255 for i in images])
        got = ours(images, original_sizes=[tuple(i.shape[-2:]) for i in images]).cpu()
    for e, g, p, image in zip(expected, got, probabilities[0], images):
        g = ours.paste_masks(g, image.shape[-2:])
        assert len(g["boxes"]) == len(e["boxes"]) == 100
        match = _match(g["boxes"], e["boxes"])  # one to one: tied scores leave NMS's order to its sort
        assert sorted(match.tolist()) == list(range(100))
        assert torch.equal(g["labels"][match], e["labels"])
        assert (g["boxes"][match] - e["boxes"]).abs().max() <= 0.01
        assert (g["scores"][match] - e["scores"]).abs().max() <= 1e-4
        assert ((p > 0.05) & (p < 0.95)).float().mean() > 0.1  # probabilities, not 0s and 1s
        assert (g["mask_probs"][match] - p[:, 0]).abs().max() <= 1e-4
        agree = (g["masks"][match] == (e["masks"][:, 0] > 0.5)).float().mean().item()
        assert agree >= 0.999, f"pasted masks agree on {agree:.5f} of the pixels"


def test_mask_targets_are_the_libraries_own():
    """torchvision's rule is its ``project_masks_on_boxes``; detectron2's (``BitMasks.crop_and_resize``:
    aligned RoIAlign, then >= 0.5) is checked on a hand-made case: a box exactly on a square mask."""
    torch.manual_seed(0)
    masks = (torch.rand(2, 3, 60, 80) > 0.5).to(torch.uint8)  # (N, G, H, W)
    boxes = torch.rand(2, 5, 4) * 40
    boxes[..., 2:] += boxes[..., :2] + 5
    matched = torch.randint(0, 3, (2, 5))
    ours = mask_targets(masks, matched, boxes, 28, "torchvision")
    theirs = torch.cat([project_masks_on_boxes(masks[i], boxes[i], matched[i], 28) for i in range(2)])
    assert torch.allclose(ours, theirs, atol=1e-6)

    square = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    square[..., 16:48, 8:40] = 1  # pixels 16..47 (rows), 8..39 (columns): the box x1=8, y1=16, x2=40, y2=48
    target = mask_targets(square, torch.zeros(1, 1, dtype=torch.int64), torch.tensor([[[8.0, 16, 40, 48]]]), 28,
                          "detectron2")
    assert torch.equal(target, torch.ones(1, 28, 28))
    half = mask_targets(square, torch.zeros(1, 1, dtype=torch.int64), torch.tensor([[[24.0, 16, 56, 48]]]), 28,
                        "detectron2")  # the box's left half on the mask
    assert torch.equal(half[0, :, :14], torch.ones(28, 14)) and torch.equal(half[0, :, 14:], torch.zeros(28, 14))


def test_torchvision_paste_is_torchvisions():
    """Our torchvision-rule paste equals ``paste_masks_in_image`` thresholded at 0.5, boxes partly outside
    the image included."""
    torch.manual_seed(1)
    probs = torch.rand(12, 28, 28)
    boxes = torch.rand(12, 4) * torch.tensor([90.0, 70.0, 90.0, 70.0]) - 10
    boxes[:, 2:] = boxes[:, :2] + torch.rand(12, 2) * 60 + 1
    ours = paste_masks(probs, boxes, (64, 80), "torchvision")
    theirs = paste_masks_in_image(probs[:, None], boxes, (64, 80))[:, 0] > 0.5
    assert torch.equal(ours, theirs)


def test_instance_masks_move_with_the_image():
    """The instance data path: each kept annotation's mask drawn as pycocotools draws it, resized (nearest) and
    flipped with its image and box, crowd RLEs included."""
    import cv2

    annotations = TINYCOCO / "annotations" / "instances_val2017.json"
    plain = CocoDetection(annotations, PHOTOS, None, masks=True)
    flipped = CocoDetection(annotations, PHOTOS, detection_transform(True, (240,), 400, flip_prob=1.0), masks=True)
    coco = plain.coco
    crowd_seen = False
    for index in range(len(plain)):
        _, target = plain[index]
        image, moved = flipped[(index, 0)]
        rows = plain.annotation_rows[plain.record(index).rows]
        assert len(target["masks"]) == len(rows) == len(moved["masks"]) == len(moved["boxes"])
        for mask, resized, row in zip(target["masks"], moved["masks"], rows):
            ann = coco.anns[int(plain.table.ann_ids[row])]
            drawn = coco.annToMask(ann)
            assert torch.equal(mask, torch.from_numpy(drawn))
            expected = cv2.resize(drawn, (image.shape[2], image.shape[1]), interpolation=cv2.INTER_NEAREST)[:, ::-1]
            assert torch.equal(resized, torch.from_numpy(expected.copy()))
            crowd_seen |= bool(ann["iscrowd"])
    assert crowd_seen


def test_mask_configs_are_complete():
    """Every Mask R-CNN config validates, with masks on and the mask rules of its family; the depth swaps
    with one key; each detectron2 zoo name downloads like the detection ones."""
    from backbones.weights import detectron2_url

    published = {"R_50_C4_1x": ("36.8", "32.2"), "R_50_DC5_1x": ("38.3", "34.2"), "R_50_FPN_1x": ("38.6", "35.2"),
                 "R_50_C4_3x": ("39.8", "34.4"), "R_50_DC5_3x": ("40.0", "35.9"), "R_50_FPN_3x": ("41.0", "37.2"),
                 "R_101_C4_3x": ("42.6", "36.7"), "R_101_DC5_3x": ("41.9", "37.3"), "R_101_FPN_3x": ("42.9", "38.6")}
    for name, (box, mask) in published.items():
        path = CONFIGS / "detectron2" / f"mask_rcnn_{name}.yaml"
        model = prepare_config(load_config(path)).model
        assert model["masks"] and model["mask_head"]["rules"] == "detectron2" and model["mask_head"]["sampling_ratio"] == 0
        assert model["layout"] == name.split("_")[2].lower() and model["backbone"]["depth"] == int(name.split("_")[1])
        header = " ".join(path.read_text().splitlines()[:5])
        assert f"box AP {box}, mask AP {mask}" in header
        assert detectron2_url(f"COCO-InstanceSegmentation/mask_rcnn_{name}").endswith(".pkl")
    for name, layout, depth in (("mask_rcnn_r50", "fpn", 50), ("mask_rcnn_r101", "fpn", 101),
                                ("mask_rcnn_r50_c4", "c4", 50), ("mask_rcnn_r50_fpn_torchvision", "fpn", 50)):
        model = prepare_config(load_config(CONFIGS / f"{name}.yaml")).model
        assert model["masks"] and model["layout"] == layout and model["backbone"]["depth"] == depth
        assert model["mask_head"]["num_conv"] == (0 if layout == "c4" else 4)


def test_mask_quickstart_learns_masks(tmp_path):
    """configs/quickstart_mask.yaml for 250 iterations (box AP 0.108, mask AP 0.125 measured; the 1000 it ships
    with take
    7-9 minutes on 2 CPU cores, too long for the test command: tests/test_cuda.py holds them to the README's
    bar on a GPU): box and mask AP of at least 0.08 on the held-out synthetic split (an untrained model
    scores 0), the curves of both and the drawings written."""
    from tasks.engine import train
    from tasks.registry import get_task

    config = load_config(CONFIGS / "quickstart_mask.yaml", [f"data.root={tmp_path / 'synthetic'}",
                                                             f"output_dir={tmp_path / 'run'}", "train.max_iters=250"])
    result = train(get_task(config.task), config)
    assert result.metrics["segm/AP"] >= 0.08 and result.metrics["bbox/AP"] >= 0.08, result.metrics
    assert (tmp_path / "run" / "visualizations").is_dir() and (tmp_path / "run" / "pr_curves_segm.png").is_file()


def test_mask_head_presence_mismatch_is_named_and_fine_tuning_starts_it_anew(caplog):
    """A Mask R-CNN checkpoint for a Faster R-CNN config (and the reverse) is a one-line error naming the key
    to set; fine-tuning a Mask R-CNN from a Faster R-CNN checkpoint loads everything else strictly and leaves
    the mask head initialised, logged."""
    from backbones.errors import UserError

    faster = build_detector(load_config(CONFIGS / "detectron2" / "faster_rcnn_R_50_FPN_1x.yaml", NARROW[:4] + NARROW[5:]).model)
    with pytest.raises(UserError, match="are a Mask R-CNN's .* set model.masks=true"):
        load_detector_weights(faster, REFERENCE / "mask_rcnn_R_50_FPN_1x.pkl")
    masked = build_detector(load_config(CONFIGS / "detectron2" / "mask_rcnn_R_50_FPN_1x.yaml", NARROW).model)
    with pytest.raises(UserError, match="hold no mask head but the config's model is a Mask R-CNN"):
        load_detector_weights(masked, REFERENCE / "faster_rcnn_R_50_FPN_1x.pkl")
    initial = {k: v.clone() for k, v in masked.state_dict().items() if "mask_head" in k}
    with caplog.at_level("INFO"):
        load_detector_weights(masked, REFERENCE / "faster_rcnn_R_50_FPN_1x.pkl", new_classes=True)
    assert "left initialised: the mask head" in caplog.text
    assert all(torch.equal(masked.state_dict()[k], v) for k, v in initial.items())
    with open(REFERENCE / "faster_rcnn_R_50_FPN_1x.pkl", "rb") as f:  # the rest: the file's
        theirs = pickle.load(f)["model"]["proposal_generator.rpn_head.conv.weight"]
    assert torch.equal(masked.state_dict()["rpn.head.conv.weight"], torch.from_numpy(theirs))


def test_infer_tool_writes_detectron2_masks_as_rle(tmp_path):
    """tools/infer.py with a detectron2 Mask R-CNN config and its zoo-format ``.pkl``: ``predictions.json``
    carries each detection's mask as COCO RLE, detectron2's own masks (IoU >= 0.99), and the drawing shows
    them (filled, in the class colours)."""
    from tools.infer import main

    reference = json.loads((REFERENCE / "mask_rcnn_R_50_FPN_1x_outputs.json").read_text())
    file = "000000444010.jpg"  # 480 x 640
    expected = reference["images"][file]
    folder = photo_folder(tmp_path, file)
    assert main([str(CONFIGS / "detectron2" / "mask_rcnn_R_50_FPN_1x.yaml"), "--weights",
                 str(REFERENCE / "mask_rcnn_R_50_FPN_1x.pkl"), "--input", str(folder), "--output", str(tmp_path / "out"),
                 "data.min_size_test=480", "data.max_size_test=640", f"data.root={tmp_path / 'no_coco_here'}",
                 "--draw-threshold", "0.0", *NARROW]) == 0
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(predictions) == len(expected["boxes"])
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (p["bbox"] for p in predictions)])
    match = _match(boxes, torch.tensor(expected["boxes"]))
    ours = mask_utils.decode([{**predictions[i]["segmentation"], "counts": predictions[i]["segmentation"]["counts"].encode()}
                              for i in match.tolist()])
    theirs = mask_utils.decode([{**rle, "counts": rle["counts"].encode()} for rle in expected["masks_rle"]])
    ious = [_iou(torch.from_numpy(ours[..., k]).bool(), torch.from_numpy(theirs[..., k]).bool()) for k in range(len(match))]
    assert min(ious) >= 0.99
    drawn = np.asarray(Image.open(tmp_path / "out" / "000000444010.png").convert("RGB")).astype(int)
    inside = torch.from_numpy(theirs.any(axis=2)).numpy()
    assert (np.abs(drawn - _photo(file).permute(1, 2, 0).numpy()).sum(2)[inside] > 0).mean() > 0.9  # masks filled
