"""Equivalence with torchvision and timm given the same weights, and strict, explained weight loading."""

import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from conftest import randomize_
from safetensors.torch import save_file

from backbones import FPN, ResNet, TimmBackbone, load_pretrained
from backbones.errors import UserError

STAGES = ["res2", "res3", "res4", "res5"]


def torchvision_features(model: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for i in range(1, 5):
        h = getattr(model, f"layer{i}")(h)
        out.append(h)
    return out


def save(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("depth, dilation", [(18, None), (50, None), (101, None), (50, [False, True, True]), (50, [False, False, True])])
def test_torchvision_resnet_equivalence(tmp_path, depth, dilation):
    reference = getattr(torchvision.models, f"resnet{depth}")(replace_stride_with_dilation=dilation)
    randomize_(reference).eval()
    output_stride = {None: 32, (False, False, True): 16, (False, True, True): 8}[tuple(dilation) if dilation else None]
    ours = ResNet(depth, stride_in_1x1=False, output_stride=output_stride).eval()
    report = load_pretrained(ours, save(reference.state_dict(), tmp_path / "tv.pth"))
    assert report.format == "torchvision-resnet"
    assert set(report.skipped) == {"fc.weight", "fc.bias"}
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = torchvision_features(reference, x)
        got = ours(x)
    for name, feature in zip(STAGES, expected):
        assert (got[name] - feature).abs().max().item() <= 1e-4, name


@pytest.mark.parametrize("model_name", ["resnet34", "resnet50"])
def test_timm_resnet_equivalence(tmp_path, model_name):
    reference = randomize_(timm.create_model(model_name)).eval()
    path = tmp_path / "timm.safetensors"
    save_file(reference.state_dict(), str(path))
    ours = ResNet(int(model_name[6:]), stride_in_1x1=False).eval()
    load_pretrained(ours, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        got = ours(x)
    for name, feature in zip(STAGES, expected):
        assert (got[name] - feature).abs().max().item() <= 1e-4, name


@pytest.mark.parametrize("model_name", ["resnet50d", "convnext_atto"])
def test_timm_backbone_loads_a_timm_checkpoint(tmp_path, model_name):
    """A whole timm model's checkpoint (classifier included) loads strictly into the feature backbone,
    whose declared shapes match its outputs and whose features equal timm's own."""
    reference = randomize_(timm.create_model(model_name)).eval()
    ours = TimmBackbone(model_name).eval()
    report = load_pretrained(ours, save(reference.state_dict(), tmp_path / "timm.pth"))
    assert report.format == "timm" and report.skipped
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=4, intermediates_only=True)
        got = ours(x)
    assert list(got) == STAGES
    for (name, feature), reference_feature in zip(got.items(), expected[-4:]):
        channels, stride = ours.output_shape()[name]
        assert feature.shape == (1, channels, 64 // stride, 64 // stride)
        assert (feature - reference_feature).abs().max().item() <= 1e-4


def test_timm_backbone_dilation_and_freezing():
    model = TimmBackbone("resnet18", output_stride=16, freeze_at=2, norm="FrozenBN")
    assert model.output_shape() == {"res2": (64, 4), "res3": (128, 8), "res4": (256, 16), "res5": (512, 16)}
    assert [name for name, p in model.body.named_parameters() if p.requires_grad][0].startswith("layer2.")
    out = model(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape == (1, 512, 4, 4)
    with pytest.raises(ValueError, match="closest names"):
        TimmBackbone("resnet5O")


def test_unbuilt_stages_are_set_aside_and_reported(tmp_path):
    reference = torchvision.models.resnet50()
    ours = ResNet(50, stride_in_1x1=False, out_features=["res4"])
    report = load_pretrained(ours, save(reference.state_dict(), tmp_path / "tv.pth"))
    assert any(k.startswith("layer4.") for k in report.skipped)
    assert "stages not built" in str(report)
    assert torch.equal(ours.res4[0].conv2.weight, reference.layer3[0].conv2.weight)


def test_fpn_takes_a_resnet_checkpoint_into_its_bottom_up(tmp_path):
    reference = torchvision.models.resnet18()
    fpn = FPN(ResNet(18))
    load_pretrained(fpn, save(reference.state_dict(), tmp_path / "tv.pth"))
    assert torch.equal(fpn.bottom_up.stem.conv.weight, reference.conv1.weight)


def test_own_checkpoint_round_trip(tmp_path):
    a, b = ResNet(18, preact=True, norm="GN"), ResNet(18, preact=True, norm="GN")
    path = tmp_path / "ours.safetensors"
    save_file(a.state_dict(), str(path))
    assert load_pretrained(b, path).format == "native"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # wrapped the way training checkpoints and DistributedDataParallel leave it
    torch.save({"model": {f"module.{k}": v for k, v in a.state_dict().items()}}, tmp_path / "wrapped.pth")
    assert load_pretrained(ResNet(18, preact=True, norm="GN"), tmp_path / "wrapped.pth").format == "native"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depth=50), "stride_in_1x1: false"),
        (dict(depth=50, stride_in_1x1=False, norm="GN"), "not GN"),
    ],
)
def test_layout_implied_by_weights_is_checked(tmp_path, kwargs, message):
    path = save(torchvision.models.resnet50().state_dict(), tmp_path / "tv.pth")
    with pytest.raises(ValueError, match=message):
        load_pretrained(ResNet(**kwargs), path)


def test_strict_errors_list_missing_unexpected_and_mis_shaped(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    del state["layer2.0.conv1.weight"]
    state["layer2.0.conv9.weight"] = torch.zeros(1)
    state["layer3.0.conv2.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(ValueError) as error:
        load_pretrained(ResNet(18), save(state, tmp_path / "bad.pth"))
    text = str(error.value)
    assert "res3.0.conv1.weight" in text and "missing" in text
    assert "layer2.0.conv9.weight" in text and "unexpected" in text
    assert "res4.0.conv2.weight: checkpoint (3, 3, 3, 3) vs model (256, 256, 3, 3)" in text
    # a ResNet-34 checkpoint for a ResNet-18: the extra blocks are unexpected
    with pytest.raises(ValueError, match=r"unexpected in the checkpoint \(80\): layer1.2.conv1.weight"):
        load_pretrained(ResNet(18), save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth"))


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pretrained(ResNet(18), tmp_path / "nowhere.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_pretrained(ResNet(18), corrupt)
    with pytest.raises(ValueError, match="unknown weights source"):
        load_pretrained(ResNet(18), "imagenet:resnet18")


def test_torchvision_name_uses_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = randomize_(torchvision.models.resnet18())
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    ours = ResNet(18)
    load_pretrained(ours, "torchvision:resnet18.IMAGENET1K_V1")
    assert torch.equal(ours.res5[1].norm2.running_var, reference.layer4[1].bn2.running_var)


def test_torchvision_name_offline_says_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as error:
        load_pretrained(ResNet(101, stride_in_1x1=False), "torchvision:resnet101.IMAGENET1K_V2")
    assert "resnet101-cd907fc2.pth" in str(error.value)
    assert str(tmp_path / "hub" / "checkpoints") in str(error.value)


def test_timm_name_offline_says_where_to_get_the_file():
    code = (
        "from backbones import ResNet, load_pretrained\n"
        "try:\n    load_pretrained(ResNet(50, stride_in_1x1=False), 'timm:resnet50.a1_in1k')\n"
        "except Exception as e:\n    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert "timm/resnet50.a1_in1k" in result.stdout and "model.safetensors" in result.stdout


class _RunsCode:
    """A pickle payload that would call os.system if unpickled by pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_load_as_arrays_and_code_is_refused(tmp_path):
    import pickle

    import numpy as np

    from backbones.weights import read_checkpoint

    arrays = {"conv1_w": np.random.rand(4, 3, 3, 3).astype(np.float32), "conv1_b": np.arange(4, dtype=np.float32)}
    for protocol in (2, 5):  # Python 2-era files (MSRA's) and today's
        path = tmp_path / f"weights_{protocol}.pkl"
        path.write_bytes(pickle.dumps({"model": arrays, "__author__": "someone", "matching_heuristics": True},
                                      protocol=protocol))
        state = read_checkpoint(path)
        assert sorted(state) == sorted(arrays)
        for name, array in arrays.items():
            assert torch.equal(state[name], torch.from_numpy(array))

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"w": _RunsCode(marker)}}))
    with pytest.raises(UserError, match=r"cannot read weights file .*evil.pkl .*system.*only numpy arrays"):
        read_checkpoint(evil)
    assert not marker.exists()
    evil_pth = tmp_path / "evil.pth"
    evil_pth.write_bytes(pickle.dumps({"w": _RunsCode(marker)}))
    with pytest.raises(UserError, match="cannot read weights file .*evil.pth"):
        read_checkpoint(evil_pth)
    assert not marker.exists()


# --- self-supervised checkpoints, in the layouts their official code saves ---------------------------------

def _ssl_files(tv: dict) -> dict:
    """A ResNet-18's torchvision tensors ``tv`` saved as each method's own training code saves its model."""
    head = {"fc.0.weight": torch.randn(512, 512), "fc.0.bias": torch.randn(512), "fc.2.weight": torch.randn(128, 512)}
    body = {k: v for k, v in tv.items() if not k.startswith("fc.")}
    return {
        # MoCo v1/v2: DDP's module., the query and key encoders (an MLP head in fc), the queue; in "state_dict"
        "moco": ({"epoch": 200, "arch": "resnet18", "optimizer": {"state": {}, "param_groups": []}, "state_dict": {
            **{f"module.encoder_q.{k}": v for k, v in {**body, **head}.items()},
            **{f"module.encoder_k.{k}": v.clone() for k, v in {**body, **head}.items()},
            "module.queue": torch.randn(128, 4096), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}},
            None, {"encoder_q.fc.0.weight": "the projection head", "encoder_k.conv1.weight": "the momentum (key) encoder",
                   "queue": "the queue of keys"}),
        # MoCo v3: base and momentum encoders, the predictor
        "mocov3": ({"state_dict": {**{f"module.base_encoder.{k}": v for k, v in {**body, **head}.items()},
                                   **{f"module.momentum_encoder.{k}": v.clone() for k, v in body.items()},
                                   "module.predictor.0.weight": torch.randn(256, 128)}},
                   None, {"base_encoder.fc.2.weight": "the projection head", "predictor.0.weight": "the predictor"}),
        # DINO: teacher and student side by side (the student DDP-wrapped), the loss's centre
        "dino": ({"teacher": {**{f"backbone.{k}": v for k, v in body.items()}, "head.mlp.0.weight": torch.randn(8, 512)},
                  "student": {**{f"module.backbone.{k}": v.clone() + 1 for k, v in body.items()},
                              "module.head.mlp.0.weight": torch.randn(8, 512)},
                  "epoch": 100, "dino_loss": {"center": torch.randn(1, 8)}},
                 None, {"teacher.head.mlp.0.weight": "the teacher's projection head", "student.backbone.conv1.weight": "the student",
                        "dino_loss.center": "the loss's centre"}),
        # SwAV: the backbone at the top, its projection head and prototypes beside it
        "swav": ({"epoch": 800, "state_dict": {**{f"module.{k}": v for k, v in body.items()},
                                               "module.projection_head.0.weight": torch.randn(64, 512),
                                               "module.prototypes.weight": torch.randn(30, 64)}},
                 None, {"projection_head.0.weight": "the projection head", "prototypes.weight": "the prototypes"}),
        # any other layout: a prefix named in the config (here a BYOL-style online/target pair)
        "prefix": ({**{f"online_network.encoder.{k}": v for k, v in body.items()},
                    **{f"target_network.encoder.{k}": v.clone() for k, v in body.items()},
                    "online_network.projector.0.weight": torch.randn(64, 512)},
                   "online_network.encoder.", {"target_network.encoder.conv1.weight": "not under the backbone's prefix "
                                                                                      "'online_network.encoder.'"}),
    }


@pytest.mark.parametrize("layout", ["moco", "mocov3", "dino", "swav", "prefix"])
def test_self_supervised_checkpoints_give_their_backbone_strictly_and_report_the_rest(tmp_path, layout, caplog):
    """Each layout's backbone gives torchvision's ResNet-18 features of the same tensors; every tensor left out is
    in the report (and the log) with its reason; the layout is detected from the keys (or the prefix given)."""
    from backbones import build_backbone

    reference = randomize_(torchvision.models.resnet18()).eval()
    content, prefix, expected_aside = _ssl_files(reference.state_dict())[layout]
    path = save(content, tmp_path / f"{layout}.pth.tar")
    config = {"name": "resnet", "depth": 18, "stride_in_1x1": False, "weights": path,
              **({"weights_prefix": prefix} if prefix else {})}
    with caplog.at_level("INFO"):
        ours = build_backbone(config).eval()
    report_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded "))
    assert (f"prefix:{prefix}" if prefix else f"{layout} layout") in report_line and "set aside:" in report_line
    report = load_pretrained(ResNet(18, stride_in_1x1=False), path, prefix=prefix)
    assert report.loaded == len(ResNet(18, stride_in_1x1=False).state_dict())
    for key, reason in expected_aside.items():
        assert report.skipped[key] == reason, key
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = torchvision_features(reference, x), ours(x)
    for name, feature in zip(STAGES, expected):
        assert (got[name] - feature).abs().max().item() <= 1e-4, name


def test_a_prefix_that_holds_no_tensor_is_an_error(tmp_path):
    path = save({"encoder.conv1.weight": torch.randn(64, 3, 7, 7)}, tmp_path / "x.pth")
    with pytest.raises(UserError, match=r"no tensor under the prefix 'backbone\.' .*set model.backbone.weights_prefix"):
        load_pretrained(ResNet(18), path, prefix="backbone.")


def test_a_detector_config_starts_from_a_self_supervised_backbone(tmp_path):
    """``model.backbone.weights`` a MoCo file (detected), or a file under ``model.backbone.weights_prefix``: the
    detector's ResNet holds the query encoder's tensors, and the run's config keeps the prefix."""
    from pathlib import Path

    from tasks.config import check_config, load_config
    from tasks.registry import get_task

    reference = randomize_(torchvision.models.resnet18())
    content, _, _ = _ssl_files(reference.state_dict())["moco"]
    moco = save(content, tmp_path / "moco.pth.tar")
    byol_like, prefix, _ = _ssl_files(reference.state_dict())["prefix"]
    byol = save(byol_like, tmp_path / "byol.pth")
    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    task = get_task("detection")
    for weights, extra in ((moco, []), (byol, [f"model.backbone.weights_prefix={prefix}"])):
        config = load_config(quickstart, ["model.backbone.depth=18", f"model.backbone.weights={weights}", *extra])
        detector = task.build_model(config)
        torch.testing.assert_close(detector.state_dict()["backbone.bottom_up.stem.conv.weight"], reference.conv1.weight)
        if extra:
            assert check_config(config, task).model["backbone"]["weights_prefix"] == prefix
