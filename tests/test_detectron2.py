"""detectron2 interoperability: its model-zoo checkpoints load into our detector and give detectron2's own
outputs; MSRA's Caffe2 ResNets load as backbone initialisation.

The reference is ``../shared/data/detectron2_reference``: three narrow R50 Faster R-CNNs (C4, DC5, FPN)
saved by detectron2 in the model-zoo format, with detectron2's RPN proposals and final detections on real
COCO photos. Our model is built from ``configs/detectron2/<name>.yaml`` with the same narrow widths.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_
from PIL import Image

from backbones import ResNet, load_pretrained
from backbones.errors import UserError
from backbones.weights import detectron2_cache_path, detectron2_url, fetch_named_weights, map_caffe2_resnet_key
from tasks.config import load_config
from tasks.detection.checkpoint import load_detector_weights
from tasks.detection.model import build_detector
from tasks.registry import get_task, prepare_config

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "data" / "detectron2_reference"
PHOTOS = ROOT.parent / "shared" / "data" / "tinycoco" / "images" / "val2017"
CONFIGS = ROOT / "configs" / "detectron2"
ZOO = ["faster_rcnn_R_50_C4_1x", "faster_rcnn_R_50_DC5_1x", "faster_rcnn_R_50_FPN_1x", "faster_rcnn_R_50_C4_3x",
       "faster_rcnn_R_50_DC5_3x", "faster_rcnn_R_50_FPN_3x", "faster_rcnn_R_101_C4_3x", "faster_rcnn_R_101_DC5_3x",
       "faster_rcnn_R_101_FPN_3x"]
# the reference models' narrow widths (MODEL.RESNETS.WIDTH_PER_GROUP 8, RES2_OUT_CHANNELS 32,
# FPN.OUT_CHANNELS 64, ROI_BOX_HEAD.FC_DIM 128) and no ImageNet initialisation: the checkpoint replaces it
NARROW = ["model.backbone.width_per_group=8", "model.backbone.res2_out_channels=32", "model.fpn.out_channels=64",
          "model.roi_heads.fc_dim=128", "model.backbone.weights=null"]


def _reference_model(name: str, **overrides: str) -> torch.nn.Module:
    config = load_config(CONFIGS / f"{name}.yaml", NARROW + [f"{k}={v}" for k, v in overrides.items()])
    model = build_detector(config.model)
    assert load_detector_weights(model, REFERENCE / f"{name}.pkl") == "detectron2-detection"
    return model.eval()


def _photo(file: str) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(PHOTOS / file).convert("RGB"))).permute(2, 0, 1).contiguous()


def photo_folder(tmp_path: Path, file: str) -> Path:
    """A folder holding the photo ``file`` as a lossless PNG (decoded once, so tools read the same pixels)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(_photo(file).permute(1, 2, 0).numpy()).save(folder / f"{Path(file).stem}.png")
    return folder


def _match(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """For each of ``theirs`` boxes the index of the nearest of ``ours`` (max coordinate difference)."""
    return (ours[None, :, :] - theirs[:, None, :]).abs().amax(-1).argmin(1)


@pytest.mark.parametrize("name", ["faster_rcnn_R_50_C4_1x", "faster_rcnn_R_50_DC5_1x", "faster_rcnn_R_50_FPN_1x"])
def test_zoo_checkpoint_gives_detectron2_outputs(name):
    reference = json.loads((REFERENCE / f"{name}_outputs.json").read_text())
    model = _reference_model(name)
    with torch.no_grad():
        for file, expected in reference["images"].items():
            image = _photo(file)
            assert tuple(image.shape[1:]) == (expected["height"], expected["width"])
            batch, sizes = model.preprocess([image])
            features = model.backbone(batch)
            maps = [features[f] for f in model.rpn.in_features]
            proposals, logits, _ = model.rpn.propose(maps, model.rpn.anchors(maps), torch.tensor(sizes, dtype=torch.float32))
            # the same top 50 proposals with the same logits; proposals whose logits tie to float rounding may
            # trade places, so each is looked up among our best 60
            top, top_logits = torch.tensor(expected["proposals_top50"]), torch.tensor(expected["proposal_logits_top50"])
            match = _match(proposals[0][:60], top)
            assert len(set(match.tolist())) == len(top), f"{name} {file}: RPN proposals not one to one"
            assert (proposals[0][match] - top).abs().max() < 0.01, f"{name} {file}: RPN proposals"
            assert (logits[0][match] - top_logits).abs().max() < 1e-4, f"{name} {file}: RPN logits"
            assert (match - torch.arange(len(top))).abs().max() <= 2, f"{name} {file}: RPN proposal order"

            detections = model([image])[0]
            boxes, scores = torch.tensor(expected["boxes"]), torch.tensor(expected["scores"])
            classes = torch.tensor(expected["classes"]) + 1  # detectron2: 0..79, ours: 1..80 (0 is background)
            assert len(detections["boxes"]) == len(boxes), f"{name} {file}: number of detections"
            match = _match(detections["boxes"], boxes)
            assert sorted(match.tolist()) == list(range(len(boxes))), f"{name} {file}: detections not one to one"
            assert (detections["boxes"][match] - boxes).abs().max() < 0.01, f"{name} {file}: boxes"
            assert (detections["scores"][match] - scores).abs().max() < 1e-4, f"{name} {file}: scores"
            assert torch.equal(detections["labels"][match], classes), f"{name} {file}: classes"


@pytest.mark.parametrize("name", ZOO)
def test_zoo_configs_are_detectron2_models(name):
    """Each of the nine configs validates, has detectron2's settings and its published AP in the header;
    the R50 ones take the zoo-format checkpoint of their layout strictly (at the reference's widths)."""
    config = prepare_config(load_config(CONFIGS / f"{name}.yaml"))
    model = config.model
    depth, layout = int(name.split("_")[3]), name.split("_")[4]
    assert model["layout"] == layout.lower()
    assert model["input_format"] == "BGR" and model["input_range"] == 255.0 and model["pixel_std"] == [1.0, 1.0, 1.0]
    assert model["backbone"]["stride_in_1x1"] is True and model["anchors"]["round"] is False
    assert model["roi_heads"]["sampling_ratio"] == 0 and model["roi_heads"]["smooth_l1_beta"] == 0.0
    assert model["backbone"]["depth"] == depth
    assert model["backbone"]["weights"] == f"detectron2:ImageNetPretrained/MSRA/R-{model['backbone']['depth']}.pkl"
    assert model["backbone"].get("dilate_first_block") is (layout == "DC5")
    header = (CONFIGS / f"{name}.yaml").read_text().splitlines()[:4]
    published = dict(zip(ZOO, ["35.7", "37.3", "37.9", "38.4", "39.0", "40.2", "41.1", "40.6", "42.0"]))
    assert any(published[name] in line for line in header)
    assert config.train.max_iters == (90000 if name.endswith("1x") else 270000)
    if depth == 50:
        narrow = build_detector(load_config(CONFIGS / f"{name}.yaml", NARROW).model, init_weights=False)
        load_detector_weights(narrow, REFERENCE / f"faster_rcnn_R_50_{layout}_1x.pkl")


def test_a_detectron2_syncbn_mask_rcnn_checkpoint_loads_by_its_names(tmp_path):
    """A checkpoint of detectron2's SyncBN Mask R-CNN (Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml: FPN.NORM, the
    4conv1fc ROI_BOX_HEAD with NORM, ROI_MASK_HEAD.NORM) loads strictly into the model the same keys
    build: the narrow reference Mask R-CNN's zoo-format file, its FPN, box head and mask head replaced by
    tensors under the names detectron2's FPN, FastRCNNConvFCHead and MaskRCNNConvUpsampleHead give those
    layers (``fpn_lateral2.norm.running_var``, ``box_head.conv1.norm.weight``, ``box_head.fc1``,
    ``mask_head.mask_fcn1.norm.bias``, ...; no conv bias beside a norm), each landing in its layer."""
    with open(REFERENCE / "mask_rcnn_R_50_FPN_1x.pkl", "rb") as f:
        zoo = pickle.load(f, encoding="latin1")["model"]
    kept = {k: v for k, v in zoo.items() if not k.startswith(("backbone.fpn_", "roi_heads.box_head.", "roi_heads.mask_head.mask_fcn"))}
    rng = np.random.default_rng(0)
    stats = ("weight", "bias", "running_mean", "running_var")
    written, ours = {}, {}  # detectron2's name -> tensor, and the key it must land at in our model

    def conv(name, own, shape, channels):
        written[f"{name}.weight"], ours[f"{name}.weight"] = rng.normal(size=shape).astype(np.float32), f"{own}.weight"
        for stat in stats:
            written[f"{name}.norm.{stat}"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
            ours[f"{name}.norm.{stat}"] = f"{own}.norm.{stat}"
        written[f"{name}.norm.num_batches_tracked"] = np.array(7, dtype=np.int64)  # nn.SyncBatchNorm's buffer
        ours[f"{name}.norm.num_batches_tracked"] = f"{own}.norm.num_batches_tracked"

    for stage, channels in zip(range(2, 6), (32, 64, 128, 256)):
        conv(f"backbone.fpn_lateral{stage}", f"backbone.lateral_convs.{stage - 2}", (64, channels, 1, 1), 64)
        conv(f"backbone.fpn_output{stage}", f"backbone.output_convs.{stage - 2}", (64, 64, 3, 3), 64)
    for k in range(1, 5):
        conv(f"roi_heads.box_head.conv{k}", f"roi_heads.box_head.convs.{k - 1}", (64, 64, 3, 3), 64)
        conv(f"roi_heads.mask_head.mask_fcn{k}", f"roi_heads.mask_head.convs.{k - 1}", (64, 64, 3, 3), 64)
    written["roi_heads.box_head.fc1.weight"] = rng.normal(size=(128, 64 * 7 * 7)).astype(np.float32)
    written["roi_heads.box_head.fc1.bias"] = rng.normal(size=128).astype(np.float32)
    ours.update({f"roi_heads.box_head.fc1.{p}": f"roi_heads.box_head.fcs.0.{p}" for p in ("weight", "bias")})
    path = tmp_path / "mask_rcnn_R_50_FPN_syncbn.pkl"
    path.write_bytes(pickle.dumps({"model": {**kept, **written}, "__author__": "test"}))

    norms = ["model.fpn.norm=SyncBN", "model.roi_heads.num_conv=4", "model.roi_heads.conv_dim=64", "model.roi_heads.num_fc=1",
             "model.roi_heads.norm=SyncBN", "model.mask_head.conv_dim=64", "model.mask_head.norm=SyncBN"]
    model = build_detector(load_config(CONFIGS / "mask_rcnn_R_50_FPN_1x.yaml", NARROW + norms).model, init_weights=False)
    assert load_detector_weights(model, path) == "detectron2-detection"  # strict: every tensor placed, none left
    state = model.state_dict()
    for name, value in written.items():
        assert torch.equal(state[ours[name]], torch.as_tensor(value)), name
    convs = {key.rsplit(".", 1)[0] for name, key in ours.items() if name.endswith(".weight") and ".norm." not in name}
    assert len(convs) == 17 and not any(f"{conv}.bias" in state for conv in convs - {"roi_heads.box_head.fcs.0"})
    assert isinstance(model.backbone.lateral_convs[0].norm, torch.nn.SyncBatchNorm)


def test_moco_res5_extra_norm_loads_by_its_name_and_follows_res5(tmp_path):
    """MoCo's C4 head (detectron2's Res5ROIHeadsExtraNorm: a norm appended to the head's res5 as
    ``roi_heads.res5.norm``): the narrow reference Mask R-CNN C4 file plus that norm loads strictly with
    ``model.roi_heads.res5_norm``, the norm lands in the box head, and the map the box and mask heads read is
    that norm of res5's output (eval mode: the loaded running statistics)."""
    with open(REFERENCE / "mask_rcnn_R_50_C4_1x.pkl", "rb") as f:
        zoo = pickle.load(f, encoding="latin1")["model"]
    channels = zoo["roi_heads.res5.2.conv3.weight"].shape[0]
    rng = np.random.default_rng(1)
    extra = {f"roi_heads.res5.norm.{stat}": rng.uniform(0.5, 1.5, channels).astype(np.float32)
             for stat in ("weight", "bias", "running_mean", "running_var")}
    path = tmp_path / "mask_rcnn_R_50_C4_moco.pkl"
    path.write_bytes(pickle.dumps({"model": {**zoo, **extra}, "__author__": "test"}))
    config = load_config(CONFIGS / "mask_rcnn_R_50_C4_1x.yaml", NARROW + ["model.mask_head.conv_dim=64", "model.roi_heads.res5_norm=SyncBN"])
    model = build_detector(config.model, init_weights=False)
    assert load_detector_weights(model, path) == "detectron2-detection"  # strict
    head = model.roi_heads.box_head
    assert isinstance(head.norm, torch.nn.SyncBatchNorm)
    for stat, value in extra.items():
        assert torch.equal(getattr(head.norm, stat.rsplit(".", 1)[1]), torch.as_tensor(value))
    head.eval()
    x = torch.randn(3, head.res5[0].conv1.in_channels, 14, 14)
    with torch.no_grad():
        res5 = head.res5(x)
        expected = (res5 - torch.as_tensor(extra["roi_heads.res5.norm.running_mean"])[:, None, None]) / torch.sqrt(
            torch.as_tensor(extra["roi_heads.res5.norm.running_var"])[:, None, None] + 1e-5)
        expected = expected * torch.as_tensor(extra["roi_heads.res5.norm.weight"])[:, None, None] + torch.as_tensor(
            extra["roi_heads.res5.norm.bias"])[:, None, None]
        torch.testing.assert_close(head.feature_map(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head(x), expected.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    plain = build_detector(load_config(CONFIGS / "mask_rcnn_R_50_C4_1x.yaml", NARROW).model, init_weights=False)
    assert plain.roi_heads.box_head.norm is None and not any(".box_head.norm." in k for k in plain.state_dict())
    with pytest.raises(UserError, match="model.roi_heads.res5_norm is the norm after C4's res5 box head; layout fpn"):
        build_detector(load_config(CONFIGS / "mask_rcnn_R_50_FPN_1x.yaml", NARROW + ["model.roi_heads.res5_norm=BN"]).model)


def test_zoo_checkpoint_mismatch_is_named(tmp_path):
    """Strict: a zoo checkpoint under the wrong config names the mismatching tensors in one error."""
    config = load_config(CONFIGS / "faster_rcnn_R_50_C4_1x.yaml", NARROW + ["model.num_classes=3"])
    model = build_detector(config.model)
    with pytest.raises(UserError, match=r"shape mismatch .*roi_heads\.predictor\.cls_score\.weight: checkpoint \(81, 256\) vs model \(4, 256\).*model\.num_classes"):
        load_detector_weights(model, REFERENCE / "faster_rcnn_R_50_C4_1x.pkl")
    wide = build_detector(load_config(CONFIGS / "faster_rcnn_R_50_C4_1x.yaml", ["model.backbone.weights=null"]).model)
    with pytest.raises(UserError, match=r"backbone\.stem\.conv\.weight|backbone\.res2\.0\.conv1\.weight"):
        load_detector_weights(wide, REFERENCE / "faster_rcnn_R_50_C4_1x.pkl")


def test_fine_tuning_from_a_zoo_checkpoint_keeps_new_class_predictor(caplog):
    """``model.weights`` starts training from a zoo detector on another class count: every tensor but the
    class and box predictors comes from the checkpoint; those stay initialised and are logged."""
    reference = _reference_model("faster_rcnn_R_50_FPN_1x")
    config = load_config(CONFIGS / "faster_rcnn_R_50_FPN_1x.yaml",
                         NARROW + ["model.num_classes=3", f"model.weights={REFERENCE / 'faster_rcnn_R_50_FPN_1x.pkl'}"])
    with caplog.at_level("INFO"):
        model = get_task("detection").build_model(config)  # built, then started from model.weights
    theirs, ours = reference.state_dict(), model.state_dict()
    for key, value in ours.items():
        if key.startswith("roi_heads.predictor."):
            assert value.shape != theirs[key].shape
            assert f"left initialised: {key}" in caplog.text
        else:
            assert torch.equal(value, theirs[key]), key
    model.train()
    image = _photo(sorted(p.name for p in PHOTOS.iterdir())[0])
    target = {"boxes": torch.tensor([[10.0, 20.0, 200.0, 220.0]]), "labels": torch.tensor([2])}
    losses = model([image], [target])
    assert all(torch.isfinite(v) for v in losses.values())


def _to_caffe2(model: ResNet) -> dict[str, np.ndarray]:
    """Our ResNet in MSRA's Caffe2 blob names, each BatchNorm folded into a scale and a bias (what the
    Caffe2 files store), plus an ImageNet classifier and a momentum blob as the real files have."""
    own = {k: v.numpy() for k, v in model.state_dict().items()}
    inverse = {}
    for key in own:
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        parts = key.split(".")
        if parts[0] == "stem":
            blob = {"conv": "conv1", "norm": "res_conv1_bn"}[parts[1]]
        else:
            stage, block = parts[0][3:], parts[1]
            if parts[2] == "shortcut":
                branch, kind = "branch1", parts[3]
            else:
                branch, kind = "branch2" + "abc"[int(parts[2][-1]) - 1], parts[2][:-1]
            blob = f"res{stage}_{block}_{branch}" + ("_bn" if kind == "norm" else "")
        inverse[key] = blob + {"weight": "_w", "bias": "_b"}[parts[-1]] if not blob.endswith("_bn") else blob + {"weight": "_s", "bias": "_b"}[parts[-1]]
    blobs = {}
    for key, blob in inverse.items():
        if blob.endswith("_bn_s"):
            prefix = key[: -len("weight")]
            eps = 1e-5
            scale = own[key] / np.sqrt(own[prefix + "running_var"] + eps)
            blobs[blob] = scale
            blobs[blob[:-2] + "_b"] = own[prefix + "bias"] - own[prefix + "running_mean"] * scale
        elif not blob.endswith("_bn_b"):
            blobs[blob] = own[key]
    blobs["fc1000_w"] = np.zeros((1000, 2048), np.float32)
    blobs["fc1000_b"] = np.zeros(1000, np.float32)
    blobs["res2_0_branch2a_w_momentum"] = np.zeros_like(blobs["res2_0_branch2a_w"])
    return blobs


def test_msra_caffe2_resnet_loads_by_round_trip(tmp_path):
    """MSRA's ImageNet ResNets (``R-50.pkl``: Caffe2 names, BatchNorm folded into scale and bias) load as a
    backbone initialisation. No such file is available offline, so the mapping is tested by a round
    trip: a ResNet-50 written in that naming and format (a Python 2 era pickle, ``{"blobs": ...}``) loads
    back into a fresh one and gives the same features."""
    source = randomize_(ResNet(50, stride_in_1x1=True, norm="FrozenBN")).eval()
    blobs = _to_caffe2(source)
    assert {"conv1_w", "res_conv1_bn_s", "res_conv1_bn_b", "res2_0_branch1_w", "res2_0_branch2a_bn_s",
            "res5_2_branch2c_w", "res4_5_branch2b_bn_b"} <= set(blobs)
    assert map_caffe2_resnet_key("res3_1_branch2b_bn_s") == "res3.1.norm2.weight"
    assert map_caffe2_resnet_key("res_conv1_bn_b") == "stem.norm.bias"
    assert map_caffe2_resnet_key("fc1000_w") is None
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))

    target = ResNet(50, stride_in_1x1=True, norm="FrozenBN").eval()
    report = load_pretrained(target, path)
    assert report.format == "caffe2-resnet" and report.loaded == len(target.state_dict())
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected, got = source(images), target(images)
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-4), name

    wrong = ResNet(50, stride_in_1x1=False, norm="FrozenBN")
    with pytest.raises(UserError, match="stride_in_1x1: true"):
        load_pretrained(wrong, path)


def test_detectron2_resnet_names_load_into_backbone():
    """The backbone part of a detectron2 checkpoint (its own ResNet names) loads into our ResNet."""
    from backbones.weights import read_checkpoint

    state = read_checkpoint(REFERENCE / "faster_rcnn_R_50_DC5_1x.pkl")
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    model = ResNet(50, stride_in_1x1=True, norm="FrozenBN", width_per_group=8, res2_out_channels=32,
                   output_stride=16, dilate_first_block=True)
    from backbones.weights import load_pretrained_state

    report = load_pretrained_state(model, backbone, "detectron2 DC5 backbone", "detectron2-resnet")
    assert report.loaded == len(model.state_dict())


def test_width_keys_and_wide_resnet_match_torchvision():
    """``width_per_group: 128`` is torchvision's Wide ResNet-50-2: same parameter shapes, same outputs."""
    import torchvision

    from backbones.weights import load_pretrained_state

    reference = randomize_(torchvision.models.wide_resnet50_2()).eval()
    model = ResNet(50, stride_in_1x1=False, width_per_group=128).eval()
    load_pretrained_state(model, reference.state_dict(), "wide_resnet50_2", "torchvision-resnet")
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        body = torchvision.models.feature_extraction.create_feature_extractor(reference, {"layer4": "res5"})
        assert torch.allclose(model(images)["res5"], body(images)["res5"], atol=1e-4)
    shapes = ResNet(50, width_per_group=8, res2_out_channels=32).output_shape()
    assert [s.channels for s in shapes.values()] == [32, 64, 128, 256]
    with pytest.raises(ValueError, match="basic-block"):
        ResNet(18, res2_out_channels=256)


def test_dilate_first_block():
    """detectron2's DC5 dilates res5's first block too; torchvision's keeps the previous dilation there."""
    d2 = ResNet(50, output_stride=16, dilate_first_block=True)
    tv = ResNet(50, output_stride=16)
    assert d2.res5[0].conv2.dilation == (2, 2) and tv.res5[0].conv2.dilation == (1, 1)
    assert d2.res5[1].conv2.dilation == tv.res5[1].conv2.dilation == (2, 2)


def test_named_zoo_weights_offline_say_where_to_put_the_file(tmp_path, monkeypatch):
    """``detectron2:COCO-Detection/<name>`` resolves to the zoo's address; with the network blocked, the
    one-line error names it and the cache path to put the file at, and leaves no partial file."""
    import socket

    url = detectron2_url("COCO-Detection/faster_rcnn_R_101_C4_3x")
    assert url == ("https://dl.fbaipublicfiles.com/detectron2/COCO-Detection/faster_rcnn_R_101_C4_3x/138204752/"
                   "model_final_298dad.pkl")

    def blocked(*args, **kwargs):
        raise OSError("network access blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    cache = tmp_path / "torch" / "hub" / "checkpoints" / "detectron2" / "COCO-Detection" / "faster_rcnn_R_101_C4_3x"
    with pytest.raises(UserError) as error:
        fetch_named_weights("detectron2:COCO-Detection/faster_rcnn_R_101_C4_3x")
    assert url in str(error.value) and str(cache / "138204752" / "model_final_298dad.pkl") in str(error.value)
    assert "\n" not in str(error.value) and not list(cache.rglob("*.partial"))
    with pytest.raises(UserError, match="unknown detectron2 weights"):
        detectron2_cache_path("COCO-Detection/faster_rcnn_R_18_C4_1x")


def test_infer_tool_with_a_zoo_file_gives_detectron2_detections(tmp_path):
    """tools/infer.py with a detectron2 config and a zoo-format ``.pkl`` writes detectron2's detections (at
    the photo's own size, so no resizing changes a pixel), labelled with COCO's category ids even without
    the COCO annotation files at hand."""
    from tools.infer import main

    reference = json.loads((REFERENCE / "faster_rcnn_R_50_DC5_1x_outputs.json").read_text())
    file = "000000444010.jpg"  # 480 x 640
    expected = reference["images"][file]
    folder = photo_folder(tmp_path, file)
    assert main([str(CONFIGS / "faster_rcnn_R_50_DC5_1x.yaml"), "--weights", str(REFERENCE / "faster_rcnn_R_50_DC5_1x.pkl"),
                 "--input", str(folder), "--output", str(tmp_path / "out"), "data.min_size_test=480",
                 "data.max_size_test=640", f"data.root={tmp_path / 'no_coco_here'}", *NARROW]) == 0
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    from tasks.data.coco import COCO_CATEGORIES

    coco_ids = sorted(COCO_CATEGORIES)
    assert len(predictions) == len(expected["boxes"]) and predictions[0]["image_id"] == 444010
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (p["bbox"] for p in predictions)])
    match = _match(boxes, torch.tensor(expected["boxes"]))
    assert sorted(match.tolist()) == list(range(len(predictions)))
    assert (boxes[match] - torch.tensor(expected["boxes"])).abs().max() < 0.01
    assert (torch.tensor([predictions[i]["score"] for i in match]) - torch.tensor(expected["scores"])).abs().max() < 1e-4
    assert [predictions[i]["category_id"] for i in match] == [coco_ids[c] for c in expected["classes"]]


def test_detectron2_box_losses_are_l1():
    """detectron2's recipe (``smooth_l1_beta: 0``) makes both box losses plain L1 sums."""
    from heads.boxes import box_loss

    config = prepare_config(load_config(CONFIGS / "faster_rcnn_R_50_FPN_1x.yaml"))
    pred, target = torch.tensor([[0.3, -0.02, 1.5, 0.0]]), torch.tensor([[0.0, 0.01, -0.5, 0.004]])
    for section in ("rpn", "roi_heads"):
        settings = config.model[section]
        got = box_loss(pred, target, settings["box_loss_type"], settings["smooth_l1_beta"])
        assert torch.allclose(got, (pred - target).abs().sum()), section
