"""FPN against torchvision's FeaturePyramidNetwork, and building every backbone from plain data."""

import json
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from backbones import FPN, ResNet, ShapeSpec, TimmBackbone, build_backbone
from backbones.errors import UserError


def test_fpn_shapes_follow_the_bottom_up():
    fpn = FPN(ResNet(50, out_features=["res2", "res3", "res4", "res5"]))
    assert fpn.output_shape() == {f"p{i}": ShapeSpec(256, 2**i) for i in range(2, 7)}
    assert fpn.size_divisibility == 32
    assert fpn.lateral_convs[0].in_channels == 256 and fpn.lateral_convs[3].in_channels == 2048
    out = fpn(torch.randn(1, 3, 128, 96))
    for name, feature in out.items():
        channels, stride = fpn.output_shape()[name]
        assert feature.shape == (1, channels, -(-128 // stride), -(-96 // stride))  # ceil


def test_fpn_subset_and_top_blocks():
    bottom_up = ResNet(18, out_features=["res3", "res4", "res5"])
    conv = FPN(bottom_up, in_features=["res3", "res4", "res5"], out_channels=64, top_block="conv")
    assert list(conv.output_shape()) == ["p3", "p4", "p5", "p6"]
    assert conv(torch.randn(1, 3, 64, 64))["p6"].shape == (1, 64, 1, 1)
    none = FPN(ResNet(18), in_features=["res4", "res5"], top_block="none")
    assert list(none.output_shape()) == ["p4", "p5"]


def test_fpn_equals_torchvision_feature_pyramid_network():
    bottom_up = ResNet(18).eval()
    ours = FPN(bottom_up).eval()
    reference = FeaturePyramidNetwork([64, 128, 256, 512], 256, extra_blocks=LastLevelMaxPool()).eval()
    with torch.no_grad():
        for i in range(4):
            reference.inner_blocks[i][0].weight.copy_(ours.lateral_convs[i].weight)
            reference.inner_blocks[i][0].bias.copy_(torch.randn(256))
            ours.lateral_convs[i].bias.copy_(reference.inner_blocks[i][0].bias)
            reference.layer_blocks[i][0].weight.copy_(ours.output_convs[i].weight)
            reference.layer_blocks[i][0].bias.copy_(torch.randn(256))
            ours.output_convs[i].bias.copy_(reference.layer_blocks[i][0].bias)
        images = torch.randn(2, 3, 96, 64)
        got = ours(images)
        features = bottom_up(images)
        expected = reference(OrderedDict((k, features[k]) for k in ["res2", "res3", "res4", "res5"]))
    for name, reference_name in zip(["p2", "p3", "p4", "p5", "p6"], ["res2", "res3", "res4", "res5", "pool"]):
        assert (got[name] - expected[reference_name]).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("norm", ["BN", "GN"])
def test_fpn_norm_equals_torchvision_feature_pyramid_network_with_a_norm_layer(norm):
    """``norm``: each lateral and output convolution without bias and followed by the norm, no activation,
    as detectron2's FPN (``use_bias = norm == ""``) and torchvision's with ``norm_layer`` (its
    Conv2dNormActivation drops the bias too) both wire it: the same pyramid from the same weights, with
    batch statistics in training and the running ones it leaves at evaluation. (torchvision's only other
    difference is naming: ``inner_blocks.i.0``/``.1`` for ``lateral_convs.i``/``.norm``.) Without a norm
    the convolutions keep their bias and the keys stay as they were."""
    bottom_up = ResNet(18, norm="FrozenBN")
    ours = FPN(bottom_up, out_channels=64, norm=norm)
    layer = torch.nn.BatchNorm2d if norm == "BN" else (lambda channels: torch.nn.GroupNorm(32, channels))
    reference = FeaturePyramidNetwork([64, 128, 256, 512], 64, extra_blocks=LastLevelMaxPool(), norm_layer=layer)
    assert [k for k in ours.state_dict() if not k.startswith("bottom_up.")][:2] == [
        "lateral_convs.0.weight", "lateral_convs.0.norm.weight"]
    with torch.no_grad():
        for i in range(4):
            for theirs, mine in ((reference.inner_blocks[i], ours.lateral_convs[i]),
                                 (reference.layer_blocks[i], ours.output_convs[i])):
                assert mine.bias is None and theirs[0].bias is None
                theirs[0].weight.copy_(mine.weight)
                mine.norm.weight.uniform_(0.5, 1.5)
                mine.norm.bias.uniform_(-0.5, 0.5)
                theirs[1].load_state_dict(mine.norm.state_dict())
    images = torch.randn(2, 3, 96, 64)
    names = ["res2", "res3", "res4", "res5", "pool"]
    for mode in ("train", "eval"):  # training updates the running statistics on both sides alike
        ours.train(mode == "train")
        reference.train(mode == "train")
        with torch.no_grad():
            got, features = ours(images), bottom_up(images)
            expected = reference(OrderedDict((k, features[k]) for k in names[:4]))
        for name, reference_name in zip(["p2", "p3", "p4", "p5", "p6"], names):
            assert (got[name] - expected[reference_name]).abs().max().item() <= 1e-4, (mode, name)
    plain = [k for k in FPN(ResNet(18), out_channels=64).state_dict() if not k.startswith("bottom_up.")]
    assert plain == [f"{kind}_convs.{i}.{p}" for kind in ("lateral", "output") for i in range(4) for p in ("weight", "bias")]


def test_fpn_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="doubling strides"):
        FPN(ResNet(50, output_stride=16))
    with pytest.raises(ValueError, match="res2"):
        FPN(ResNet(50, out_features=["res4", "res5"]), in_features=["res2", "res5"])
    with pytest.raises(ValueError, match="top_block"):
        FPN(ResNet(18), top_block="p6p7")


def test_build_the_issue_example_and_nested_fpn():
    backbone = build_backbone(
        {"name": "resnet", "depth": 50, "stride_in_1x1": False, "out_features": ["res2", "res3", "res4", "res5"]}
    )
    assert isinstance(backbone, ResNet) and not backbone.stride_in_1x1
    fpn = build_backbone(
        {
            "name": "fpn",
            "bottom_up": {"name": "timm", "model": "resnet18", "freeze_at": 1},
            "in_features": ["res3", "res4", "res5"],
            "out_channels": 128,
        }
    )
    assert isinstance(fpn.bottom_up, TimmBackbone)
    assert fpn.output_shape() == {"p3": (128, 8), "p4": (128, 16), "p5": (128, 32), "p6": (128, 64)}


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_depth_swap_is_one_key(depth):
    config = {"name": "fpn", "bottom_up": {"name": "resnet", "depth": depth, "norm": "FrozenBN", "freeze_at": 2}}
    fpn = build_backbone(config)
    assert fpn.output_shape()["p2"] == (256, 4)


def test_build_loads_weights_key(tmp_path):
    source = ResNet(18)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    built = build_backbone({"name": "resnet", "depth": 18, "weights": str(tmp_path / "r18.pth")})
    assert torch.equal(built.res3[0].conv1.weight, source.res3[0].conv1.weight)


@pytest.mark.parametrize(
    "config, error, message",
    [
        ({"name": "resnet", "dpeth": 50}, UserError, "backbone.dpeth; did you mean 'backbone.depth'"),
        ({"name": "fpn", "bottom_up": {"name": "resnet", "strde_in_1x1": True}}, UserError, "bottom_up.strde_in_1x1"),
        ({"name": "resnt", "depth": 50}, ValueError, "name must be one of resnet, timm, fpn"),
        ({"name": "resnet", "depth": 51}, ValueError, "depth must be one of"),
        ({"name": "fpn"}, ValueError, "bottom_up"),
        ({"name": "resnet", "depth": 50, "weights": "/nonexistent/r50.pth"}, FileNotFoundError, "r50.pth"),
    ],
)
def test_build_errors_name_the_key(config, error, message):
    with pytest.raises(error, match=message):
        build_backbone(config)


def test_backbone_table_tool(capsys):
    from tools.backbone_table import main

    assert main(["--config", json.dumps({"name": "resnet", "depth": 50})]) == 0
    out = capsys.readouterr().out
    assert "| 23.51 | 25.56 | 3.86 | res2 256/4 res3 512/8 res4 1024/16 res5 2048/32 |" in out


def test_weights_torchvision_follows_the_depth(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    built = build_backbone({"name": "resnet", "depth": 18, "weights": "torchvision"})
    assert torch.equal(built.res3[0].conv1.weight, reference.layer2[0].conv1.weight)
    with pytest.raises(UserError, match="resnet34-b627a593.pth"):
        monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
        build_backbone({"name": "resnet", "depth": 34, "weights": "torchvision"})
