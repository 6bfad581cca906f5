"""ResNet: the paper's numbers, declared shapes against real outputs, every variant, freezing, errors."""

import math

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from backbones import ResNet, ShapeSpec
from backbones.resnet import Projection, ResidualBlock, ZeroPadShortcut
from backbones.summary import summarize

IMAGENET_DEPTHS = (18, 34, 50, 101, 152)
CIFAR_DEPTHS = (20, 32, 44, 56, 110)

# Paper, Table 1 (ImageNet, with a 1000-class fc) and Section 4.2 / Table 6 (CIFAR, option A, 10-class fc).
PAPER_PARAMS_M = {18: 11.7, 34: 21.8, 50: 25.6, 101: 44.5, 152: 60.2}
PAPER_CIFAR_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}
PAPER_GMACS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}


def assert_declared_shapes(model: ResNet, height: int, width: int) -> dict[str, torch.Tensor]:
    outputs = model(torch.randn(2, 3, height, width))
    declared = model.output_shape()
    assert list(outputs) == list(declared)
    for name, feature in outputs.items():
        channels, stride = declared[name]
        assert feature.shape == (2, channels, math.ceil(height / stride), math.ceil(width / stride)), name
    return outputs


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_imagenet_params_and_flops_match_paper(depth):
    summary = summarize({"name": "resnet", "depth": depth})  # the paper's layout: stride in the 1x1
    assert summary.params_with_fc / 1e6 == pytest.approx(PAPER_PARAMS_M[depth], rel=0.01)
    assert summary.gmacs_with_fc == pytest.approx(PAPER_GMACS[depth], rel=0.02)


@pytest.mark.parametrize("depth", (50, 101, 152))
def test_stride_in_3x3_costs_exactly_the_hand_computed_extra(depth):
    """Moving a downsampling bottleneck's stride from the 1x1 to the 3x3 runs that 1x1 at 4x the pixels:
    3 extra copies of its multiply-adds in the first block of res3, res4, res5."""
    v1 = summarize({"name": "resnet", "depth": depth, "stride_in_1x1": True})
    v15 = summarize({"name": "resnet", "depth": depth, "stride_in_1x1": False})
    extra = 0
    for in_channels, width, out_side in ((256, 128, 28), (512, 256, 14), (1024, 512, 7)):
        extra += 3 * out_side * out_side * in_channels * width
    assert (v15.gmacs_with_fc - v1.gmacs_with_fc) * 1e9 == pytest.approx(extra, rel=1e-9)
    assert v15.params == v1.params


@pytest.mark.parametrize("depth", [*CIFAR_DEPTHS, 1202])
def test_cifar_params_match_paper(depth):
    summary = summarize(
        {"name": "resnet", "depth": depth, "family": "cifar", "shortcut": "A"}, input_size=32, num_classes=10
    )
    assert summary.params_with_fc / 1e6 == pytest.approx(PAPER_CIFAR_PARAMS_M[depth], rel=0.03)


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
@pytest.mark.parametrize("size", [(64, 96), (67, 45)])
def test_declared_shapes_every_depth(depth, size):
    model = ResNet(depth, out_features=["stem", "res2", "res3", "res4", "res5"]).eval()
    assert model.output_shape() == {
        "stem": ShapeSpec(64, 4),
        **{f"res{i + 2}": ShapeSpec(w * (4 if depth >= 50 else 1), 4 * 2**i) for i, w in enumerate((64, 128, 256, 512))},
    }
    assert_declared_shapes(model, *size)


VARIANTS = {
    "shortcut_A": dict(shortcut="A"),
    "shortcut_C": dict(shortcut="C"),
    "plain": dict(residual=False),
    "preact": dict(preact=True),
    "preact_plain": dict(preact=True, residual=False),
    "stride_in_3x3": dict(stride_in_1x1=False),
    "os16": dict(output_stride=16),
    "os8": dict(output_stride=8),
    "frozen_bn": dict(norm="FrozenBN"),
    "sync_bn": dict(norm="SyncBN"),
    "group_norm": dict(norm="GN"),
    "freeze_at_3": dict(freeze_at=3),
    "zero_init": dict(zero_init_residual=True),
}


@pytest.mark.parametrize("depth", (18, 50))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_declared_shapes_every_variant(depth, variant):
    model = ResNet(depth, **VARIANTS[variant])
    model.train()
    outputs = assert_declared_shapes(model, 64, 64)
    outputs["res5"].mean().backward()  # every variant trains
    strides = [s.stride for s in model.output_shape().values()]
    expected = {"os16": [4, 8, 16, 16], "os8": [4, 8, 8, 8]}.get(variant, [4, 8, 16, 32])
    assert strides == expected


@pytest.mark.parametrize("depth", CIFAR_DEPTHS)
@pytest.mark.parametrize("shortcut", ("A", "B"))
def test_cifar_declared_shapes(depth, shortcut):
    model = ResNet(depth, family="cifar", shortcut=shortcut, out_features=["stem", "res2", "res3", "res4"])
    assert [s for s in model.output_shape().values()] == [(16, 1), (16, 1), (32, 2), (64, 4)]
    assert_declared_shapes(model, 32, 32)


def test_cifar_output_stride_dilates():
    model = ResNet(20, family="cifar", output_stride=1)
    assert [s.stride for s in model.output_shape().values()] == [1, 1, 1]
    assert_declared_shapes(model, 16, 16)


def test_stages_after_the_last_requested_are_not_built():
    model = ResNet(50, out_features=["res3"])
    assert list(model.output_shape()) == ["res3"]
    assert not hasattr(model, "res4") and not hasattr(model, "res5")
    assert model.unbuilt_modules == ("res4", "res5")
    assert_declared_shapes(model, 64, 64)


def test_shortcut_options_are_the_papers():
    a, b, c = (ResNet(34, shortcut=s) for s in "ABC")
    blocks = {s: [blk for blk in m.modules() if isinstance(blk, ResidualBlock)] for s, m in zip("ABC", (a, b, c))}
    # A: zero-padding shortcuts where shapes change (res3..res5 first blocks), identities elsewhere, no parameters
    assert sum(isinstance(blk.shortcut, ZeroPadShortcut) for blk in blocks["A"]) == 3
    assert not any(isinstance(blk.shortcut, Projection) for blk in blocks["A"])
    # B: projections exactly where shapes change; C: everywhere
    assert sum(isinstance(blk.shortcut, Projection) for blk in blocks["B"]) == 3
    assert all(isinstance(blk.shortcut, Projection) for blk in blocks["C"])
    params = [sum(p.numel() for p in m.parameters()) for m in (a, b, c)]
    assert params[0] < params[1] < params[2]


def test_zero_pad_shortcut_by_hand():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    y = ZeroPadShortcut(3, 5, 2)(x)
    assert y.shape == (2, 5, 2, 2)
    assert torch.equal(y[:, :3], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 3:]) == 0


def test_zero_init_starts_each_block_as_its_shortcut_and_plain_has_none():
    residual = ResNet(18, zero_init_residual=True).eval()
    plain = ResNet(18, zero_init_residual=True, residual=False).eval()
    x = torch.rand(1, 64, 8, 8)  # non-negative, as after a ReLU
    block = residual.res2[1]  # identity shortcut
    assert torch.equal(block(x), x)
    assert torch.count_nonzero(plain.res2[1](x)) == 0
    assert all(blk.shortcut is None for blk in plain.modules() if isinstance(blk, ResidualBlock))


def test_preact_block_by_hand():
    model = ResNet(18, preact=True).eval()
    block = model.res3[1]  # identity shortcut, pre-activated input
    x = torch.randn(1, 128, 6, 6)
    expected = block.conv2(torch.relu(block.norm2(block.conv1(torch.relu(block.norm1(x)))))) + x
    assert torch.allclose(block(x), expected)
    assert not hasattr(model.res2[0], "norm1")  # the stem already activated its input
    assert model.res3[0].shortcut.norm.__class__ is nn.Identity  # projection without norm in preact nets


def test_post_activation_bottleneck_by_hand():
    block = ResNet(50).eval().res3[0]  # stride 2 in the 1x1, projection
    x = torch.relu(torch.randn(1, 256, 8, 8))
    h = torch.relu(block.norm1(block.conv1(x)))
    h = torch.relu(block.norm2(block.conv2(h)))
    expected = torch.relu(block.norm3(block.conv3(h)) + block.shortcut.norm(block.shortcut.conv(x)))
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert torch.allclose(block(x), expected)


def test_dilation_follows_torchvision_rule():
    model = ResNet(50, output_stride=8)
    assert [blk.conv2.dilation[0] for blk in model.res4] == [1] + [2] * 5
    assert [blk.conv2.dilation[0] for blk in model.res5] == [2, 4, 4]
    assert all(blk.conv2.stride == (1, 1) and blk.conv1.stride == (1, 1) for blk in model.res5)


@pytest.mark.parametrize("freeze_at", (1, 2, 4))
def test_freeze_at_fixes_parameters_and_statistics(freeze_at):
    model = ResNet(18, freeze_at=freeze_at)
    names = ["stem", "res2", "res3", "res4", "res5"]
    frozen, trainable = names[:freeze_at], names[freeze_at:]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = sum(f.square().mean() for f in model(torch.randn(2, 3, 64, 64)).values())
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    for name in frozen:
        part = getattr(model, name)
        assert all(not p.requires_grad and p.grad is None for p in part.parameters())
        assert not any(isinstance(m, nn.BatchNorm2d) for m in part.modules())
        assert any(isinstance(m, FrozenBatchNorm2d) for m in part.modules())
        for key in before:
            if key.startswith(name + "."):
                assert torch.equal(before[key], after[key]), key
    for name in trainable:
        assert all(p.grad is not None for p in getattr(model, name).parameters())
        assert not torch.equal(before[f"{name}.0.norm1.running_mean"], after[f"{name}.0.norm1.running_mean"])
        assert not torch.equal(before[f"{name}.0.conv1.weight"], after[f"{name}.0.conv1.weight"])


def test_he_init_fan_out():
    conv = ResNet(50).res4[2].conv2  # 3x3, 256 -> 256
    expected_std = math.sqrt(2.0 / (256 * 9))
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depth=20), "set family: cifar"),
        (dict(depth=21, family="cifar"), r"6n\+2"),
        (dict(depth=50, shortcut="D"), "shortcut"),
        (dict(depth=50, norm="LN"), "norm"),
        (dict(depth=50, out_features=["res6"]), "out_features"),
        (dict(depth=50, output_stride=4), "output_stride"),
        (dict(depth=50, freeze_at=6), "freeze_at"),
        (dict(depth=50, family="mobile"), "family"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResNet(**kwargs)


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_frozen_bn_computes_the_same_outputs_and_gradients(depth, channels_last):
    """fold_frozen_bn runs conv+FrozenBN as one convolution: the same outputs and the same gradients for
    the trainable conv weights as the conv followed by torchvision's FrozenBatchNorm2d (in float64, where
    rounding does not hide a wrong formula)."""
    from tests.conftest import randomize_frozen_

    torch.manual_seed(0)
    plain = randomize_frozen_(ResNet(depth, ["res3", "res4"], norm="FrozenBN", freeze_at=2, stride_in_1x1=False))
    folded = ResNet(depth, ["res3", "res4"], norm="FrozenBN", freeze_at=2, stride_in_1x1=False, fold_frozen_bn=True)
    folded.load_state_dict(plain.state_dict())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    plain, folded = (m.to(torch.float64, memory_format=memory_format) for m in (plain, folded))
    images = torch.randn(2, 3, 96, 128, dtype=torch.float64).contiguous(memory_format=memory_format)
    grads = []
    for model in (plain, folded):
        outputs = model(images)
        (outputs["res3"].square().mean() + outputs["res4"].mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in outputs:
        expected, got = plain(images)[name], folded(images)[name]
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
    assert grads[0].keys() == grads[1].keys() and "res3.0.conv1.weight" in grads[0]
    assert "stem.conv.weight" not in grads[0]  # frozen stem: no gradient either way
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-7, atol=1e-9 * expected.abs().max().item())
