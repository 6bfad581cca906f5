"""Config files: _base_ inheritance, key=value overrides, and errors that name the key."""

from pathlib import Path

import pytest

from tasks.config import ConfigError, load_config, to_yaml
from tasks.registry import prepare_config


def write(path, text):
    path.write_text(text)
    return path


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  backbone: {name: resnet, depth: 50, norm: FrozenBN}\ndata:\n  root: /data/coco\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel:\n  backbone: {depth: 101}\n")
    config = load_config(child, ["model.backbone.depth=152", "data.val.images=val", "seed=7"])
    assert config.model["backbone"] == {"name": "resnet", "depth": 152, "norm": "FrozenBN"}
    assert config.data.root == "/data/coco" and config.data.val.images == "val" and config.seed == 7
    assert config.data.val.annotations == "annotations/instances_val2017.json"  # schema default
    assert "depth: 152" in to_yaml(config)


def test_resume_false_or_null_starts_anew(tmp_path):
    auto = write(tmp_path / "auto.yaml", "resume: auto\n")
    assert load_config(auto).resume == "auto"
    for value in ("false", "False", "null", "no", ""):
        assert load_config(auto, [f"resume={value}"]).resume is None, value
    assert load_config(write(tmp_path / "off.yaml", "resume: false\n")).resume is None
    assert load_config(auto, ["resume=runs/x/checkpoints/iter_0000010"]).resume == "runs/x/checkpoints/iter_0000010"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.rot=/x"], "'data.rot'; did you mean 'data.root'"),
        (["data.train.annotatons=a.json"], "did you mean 'data.train.annotations'"),
        (["outptu_dir=x"], "did you mean 'output_dir'"),
        (["data.min_size_test=big"], "wrong value for 'data.min_size_test'"),
        (["seed"], "key=value"),
    ],
)
def test_bad_keys_and_values_are_named(tmp_path, overrides, message):
    config = write(tmp_path / "c.yaml", "model: {}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(config, overrides)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    child = write(tmp_path / "child.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml.*named by _base_ in .*child.yaml"):
        load_config(child)
    loop = write(tmp_path / "loop.yaml", "_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(loop)
    bad = write(tmp_path / "bad.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo_in_file = write(tmp_path / "typo.yaml", "dta:\n  root: x\n")
    with pytest.raises(ConfigError, match="'dta'; did you mean 'data'"):
        load_config(typo_in_file)


CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                 if p.name not in ("base_frcnn.yaml", "schedule_3x.yaml"))
PROTOCOLS = sorted((Path(__file__).resolve().parents[1] / "configs" / "protocols").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS + PROTOCOLS, ids=[p.stem for p in CONFIGS + PROTOCOLS])
def test_every_shipped_config_loads_and_builds(path):
    import torch

    from tasks.registry import get_task

    config = load_config(path, ["model.backbone.weights=null"])
    if config.task == "classification" and not config.model["num_classes"]:  # from the data folders: none here
        config = load_config(path, ["model.backbone.weights=null", "model.num_classes=5"])
    with torch.device("meta"):
        model = get_task(config.task).build_model(config)
    depth = config.model["backbone"].get("depth")
    if "r101" in path.stem:
        assert depth == 101
    if "_3x" in path.stem:
        assert config.train.max_iters == 270000 and config.train.steps == [210000, 250000]
    if "_2x" in path.stem:
        assert config.train.max_iters == 180000 and config.train.steps == [120000, 160000]
    if path in PROTOCOLS and "moco" in path.stem:  # SyncBN in the backbone (and so in C4's res5 head), nothing frozen
        assert config.model["backbone"]["norm"] == "SyncBN" and config.model["backbone"]["freeze_at"] == 0
        if "_fpn_" in path.stem:  # and in the FPN; MoCo's R50-FPN heads have no norm (facebookresearch/moco#34)
            assert config.model["fpn"]["norm"] == "SyncBN" and config.model["masks"] is True
            assert not config.model.get("roi_heads", {}).get("norm") and not config.model.get("mask_head", {}).get("norm")
    assert model.num_classes == config.model["num_classes"]


def test_depth_swap_is_one_key():
    config = load_config(CONFIGS[0].parent / "frcnn_r50.yaml", ["model.backbone.depth=152", "model.backbone.weights=null"])
    assert config.model["backbone"]["depth"] == 152


def test_train_check_period_defaults_to_1_and_is_at_least_1():
    from tasks.config import check_config
    from tasks.registry import get_task

    quickstart = CONFIGS[0].parent / "quickstart.yaml"
    assert load_config(quickstart).train.check_period == 1
    assert load_config(quickstart, ["train.check_period=8"]).train.check_period == 8
    config = load_config(quickstart, ["train.check_period=0", "model.backbone.weights=null"])
    with pytest.raises(ConfigError, match="train.check_period must be at least 1, got 0"):
        check_config(config, get_task(config.task))


@pytest.mark.parametrize("overrides, message", [
    (["data.size_buckets=[[800]]"], r"data.size_buckets must be a list of \[height, width\] pairs"),
    (["data.size_buckets=[[800, 0]]"], r"data.size_buckets must be a list of \[height, width\] pairs"),
    (["train.cuda_graphs=true", "train.compile=true"], "train.cuda_graphs and train.compile: choose one"),
])
def test_compile_settings_that_cannot_work_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        prepare_config(load_config("configs/quickstart.yaml", overrides))
    assert prepare_config(load_config("configs/quickstart.yaml", ["data.size_buckets=[[160, 192]]"])).data.size_buckets
