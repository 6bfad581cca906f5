"""Classification: image folders (against torchvision's ImageFolder), the CIFAR pickle format (written here
by hand), option A's two paddings, the fine-tuning head swap, top-k over two processes, the hand-over of
a classifier's backbone to detection, and short CIFAR and quickstart runs through the tools."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, randomize_
from PIL import Image

from backbones.errors import UserError, UserFileNotFoundError
from backbones.resnet import ZeroPadShortcut
from tasks.classification.data import read_cifar, scan_image_folder
from tasks.classification.model import build_classifier
from tasks.classification.task import ClassificationTask, topk_correct
from tasks.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
PYTHON_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CIFAR20 = {"name": "resnet", "family": "cifar", "depth": 20, "shortcut": "A"}


def test_image_folder_order_is_torchvisions_and_bad_folders_are_named(tmp_path):
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(0)
    for split, classes in (("train", ["zebra", "Ant", "cat", "bee"]), ("val", ["cat", "zebra"])):
        for name in classes:
            (tmp_path / split / name / "sub").mkdir(parents=True)
            for file in ("b.png", "a.jpg", "sub/c.png", "10.png", "9.png"):
                Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)).save(tmp_path / split / name / file)
        (tmp_path / split / classes[0] / "notes.txt").write_text("not an image")
    for split in ("train", "val"):
        reference = ImageFolder(tmp_path / split, is_valid_file=lambda p: not p.endswith(".txt"))
        train_classes = None if split == "train" else scan_image_folder(tmp_path / "train")[0]
        classes, samples = scan_image_folder(tmp_path / split, train_classes)
        names = [reference.classes[label] for _, label in reference.samples]
        assert [str(path) for path, _ in samples] == [path for path, _ in reference.samples]
        assert [classes[label] for _, label in samples] == names
    assert classes == ["Ant", "bee", "cat", "zebra"] == ImageFolder(tmp_path / "train").classes

    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(UserError, match=r"class folder .*train/empty has no images"):
        scan_image_folder(tmp_path / "train")
    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(UserError, match=r"val has class folders the training split lacks: dog"):
        scan_image_folder(tmp_path / "val", classes)
    with pytest.raises(UserFileNotFoundError, match=r"image folder .*nowhere not found"):
        scan_image_folder(tmp_path / "nowhere")


def write_cifar_by_hand(root, images, labels, test_images, test_labels, names):
    """The published CIFAR-10 python layout: rows of 3072 bytes, the red plane, then green, then blue."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def rows(x):
        return np.stack([np.concatenate([img[..., c].ravel() for c in range(3)]) for img in x]).astype(np.uint8)

    for i, (x, y) in enumerate(zip(np.array_split(images, 5), np.array_split(labels, 5)), 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {i} of 5", "labels": list(map(int, y)), "data": rows(x),
                         "filenames": [f"{j}.png" for j in range(len(y))]}, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"labels": list(map(int, test_labels)), "data": rows(test_images)}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(names), "num_cases_per_batch": 2}, f, protocol=2)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """A CIFAR-10-format set of synthetic shape crops: 40 training and 12 test images (3 classes, labels
    0..2 of 10 names)."""
    from tasks.data.synthetic import generate_crops

    crops = generate_crops(tmp_path_factory.mktemp("crops"), num_train=16, num_val=6, size=64, seed=5)
    split = {}
    for name in ("train", "val"):
        classes, samples = scan_image_folder(crops / name)
        split[name] = (np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in samples]),
                       np.array([label for _, label in samples]))
    root = tmp_path_factory.mktemp("cifar")
    names = classes + [f"unused{i}" for i in range(7)]
    write_cifar_by_hand(root, *split["train"], *split["val"], names)
    return root, split, names


def test_cifar_pickles_read_as_published_and_missing_files_are_named(cifar_root, tmp_path):
    root, split, names = cifar_root
    images, labels, got_names = read_cifar(root, "cifar10", "train")
    assert np.array_equal(images, split["train"][0]) and np.array_equal(labels, split["train"][1])
    assert got_names == names
    test_images, _, _ = read_cifar(root, "cifar10", "test")
    assert np.array_equal(test_images, split["val"][0])
    with pytest.raises(UserFileNotFoundError, match=r"cifar10 file .*cifar-10-batches-py/data_batch_1 not found.*"
                                                    r"under data.root=.*data.download=true"):
        read_cifar(tmp_path, "cifar10", "train")
    (tmp_path / "cifar-100-python").mkdir()
    for file in ("train", "meta"):
        (tmp_path / "cifar-100-python" / file).write_bytes(pickle.dumps(print))  # pickled code: refused
    with pytest.raises(UserError, match=r"cifar-100-python/train is not a cifar100 batch file"):
        read_cifar(tmp_path, "cifar100", "train")


def test_cifar_download_offline_says_where_to_put_the_files(tmp_path, monkeypatch):
    import torchvision.datasets.utils as utils

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(utils, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as error:
        read_cifar(tmp_path, "cifar10", "train", download=True)
    message = str(error.value)
    assert "\n" not in message and "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert f"unpack it into {tmp_path} (giving {tmp_path}/cifar-10-batches-py/)" in message


def test_topk_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.1, 0.2, 0.7]])
    assert topk_correct(logits, torch.tensor([1, 2, 0]), (1, 2, 5)).tolist() == [1, 2, 3]


def _permute_both_to_end(state, model):
    """A ``both`` checkpoint in the ``end`` layout: every tensor touching a stage's channels reordered so
    that the channels option A carries forward come first (the independent check of the padding)."""
    state = dict(state)
    order = torch.arange(16)  # end-layout channel i holds both-layout channel order[i]
    for stage in model.backbone.stage_names:
        for index, block in enumerate(getattr(model.backbone, stage)):
            prefix = f"backbone.{stage}.{index}."
            state[prefix + "conv1.weight"] = state[prefix + "conv1.weight"][:, order]
            if isinstance(block.shortcut, ZeroPadShortcut):
                extra, before = block.shortcut.extra_channels, block.shortcut.extra_channels // 2
                cin = len(order)
                order = torch.cat([before + order, torch.arange(before), before + cin + torch.arange(extra - before)])
            state[prefix + "conv2.weight"] = state[prefix + "conv2.weight"][order]
            for p in ("weight", "bias", "running_mean", "running_var"):
                state[prefix + f"norm2.{p}"] = state[prefix + f"norm2.{p}"][order]
    state["fc.weight"] = state["fc.weight"][:, order]
    return state


def test_option_a_padding_both_and_end_give_identical_logits_after_conversion():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    y = ZeroPadShortcut(4, 10, 2, "both")(x)  # 6 zero channels: 3 before, 3 after
    assert torch.equal(y[:, 3:7], x[:, :, ::2, ::2]) and not y[:, :3].any() and not y[:, 7:].any()

    both = randomize_(build_classifier({"num_classes": 10, "backbone": {**CIFAR20, "shortcut_a_padding": "both"}})).eval()
    end = build_classifier({"num_classes": 10, "backbone": CIFAR20}).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        reference = both(images)
        end.load_state_dict(both.state_dict())  # the same tensors, the other padding: another function
        assert (end(images) - reference).abs().max() > 1e-2
        end.load_state_dict(_permute_both_to_end(both.state_dict(), both))
        torch.testing.assert_close(end(images), reference, rtol=1e-5, atol=1e-5)


def started_from(model: dict):
    """The classifier ``model`` describes, started from its ``weights`` as training starts it (the task
    builds, then loads)."""
    return ClassificationTask().build_model(Config(task="classification", model=model))


def test_finetune_head_swap_and_torchvision_classifier(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    backbone = {"name": "resnet", "depth": 18, "stride_in_1x1": False}
    tv = randomize_(torchvision.models.resnet18(num_classes=7)).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    ours = started_from({"num_classes": 7, "weights": str(tmp_path / "tv.pth"), "backbone": backbone}).eval()
    images = torch.rand(2, 3, 64, 80)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), tv((images - mean) / std), rtol=1e-4, atol=1e-4)

    save_file(ours.state_dict(), tmp_path / "run.safetensors")
    torch.manual_seed(1)
    fresh = build_classifier({"num_classes": 3, "backbone": backbone}).state_dict()
    torch.manual_seed(1)
    tuned = started_from({"num_classes": 3, "weights": str(tmp_path / "run.safetensors"), "backbone": backbone})
    for key, value in tuned.state_dict().items():
        expected = fresh[key] if key.startswith("fc.") else ours.state_dict()[key]  # a new head, all else loaded
        assert torch.equal(value, expected), key
    with pytest.raises(UserError, match=r"do not match ImageClassifier: missing from the checkpoint \(80\): backbone.res2.2"):  # strict but the head
        started_from({"num_classes": 3, "weights": str(tmp_path / "run.safetensors"),
                      "backbone": {**backbone, "depth": 34}})
    with pytest.raises(UserError, match="set stride_in_1x1: false"):
        started_from({"num_classes": 7, "weights": str(tmp_path / "tv.pth"),
                      "backbone": {"name": "resnet", "depth": 50, "stride_in_1x1": True}})


def test_classifier_backbone_feeds_detection_and_segmentation(tmp_path):
    from safetensors.torch import save_file

    from tasks.registry import get_task

    classifier = randomize_(build_classifier({"num_classes": 5, "backbone": {"name": "resnet", "depth": 18,
                                                                             "stride_in_1x1": False}}))
    save_file(classifier.state_dict(), tmp_path / "model.safetensors")
    weights = f"model.backbone.weights={tmp_path / 'model.safetensors'}"
    for config_file, prefix in (("quickstart.yaml", "backbone.bottom_up."), ("quickstart_fcn.yaml", "backbone.")):
        config = load_config(ROOT / "configs" / config_file, [weights])
        model = get_task(config.task).build_model(config)
        state = model.state_dict()
        for key, value in classifier.backbone.state_dict().items():
            if f"{prefix}{key}" in state:  # stages the layout builds (FCN-8s: up to res5)
                assert torch.equal(state[f"{prefix}{key}"], value), key
        assert sum(k.startswith(prefix + "res5.") for k in state) > 0


TOPK_SCRIPT = """
import sys, json, torch
from pathlib import Path
from tasks.classification.data import ClassificationDataset
from tasks.classification.task import ClassificationTask
from tasks.config import Config
from tasks.engine import make_accelerator

LOGITS = torch.tensor(json.loads(sys.argv[1]))
LABELS = json.loads(sys.argv[2])

class Fixed(ClassificationDataset):
    class_names = [str(i) for i in range(LOGITS.shape[1])]
    def __len__(self): return len(LABELS)
    def load(self, index):  # the image carries its index: the model looks its logits up
        return torch.full((2, 2, 3), index, dtype=torch.uint8).numpy()
    def label(self, index): return LABELS[index]

class Lookup(torch.nn.Module):
    def forward(self, images): return LOGITS[images[:, 0, 0, 0].long()]

accelerator = make_accelerator()
config = Config()
config.eval.batch_size, config.data.num_workers = 2, 0
metrics = ClassificationTask().evaluate(Lookup(), Fixed(), accelerator, Path("."), config)
if accelerator.is_main_process:
    print("METRICS " + json.dumps(metrics))
accelerator.end_training()  # the gloo process group closes before the interpreter does
"""


def test_topk_accuracy_over_two_processes_counts_every_image_once(tmp_path):
    """7 images on 2 processes (a padded sharding would count one twice); top-1 and top-5 by hand."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 8, generator=generator)
    order = logits.argsort(1, descending=True)  # rank of each class in each row
    labels = [int(order[0, 0]), int(order[1, 3]), int(order[2, 6]), int(order[3, 0]), int(order[4, 4]),
              int(order[5, 5]), int(order[6, 1])]
    # by hand: ranks 0, 3, 6, 0, 4, 5, 1 -> top-1 hits 2 (rows 0, 3), top-5 hits 5 (ranks < 5)
    script = tmp_path / "topk.py"
    script.write_text(TOPK_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
                             json.dumps(logits.tolist()), json.dumps(labels)],
                            cwd=ROOT, env={**PYTHON_ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("METRICS ")]
    metrics = json.loads(line[len("METRICS "):])
    assert metrics["cls/top1"] == pytest.approx(2 / 7) and metrics["cls/top5"] == pytest.approx(5 / 7)
    assert metrics["cls/top1_error"] == pytest.approx(5 / 7) and metrics["cls/top5_error"] == pytest.approx(2 / 7)


def train_run(config_file, *overrides):
    from tasks.engine import train
    from tasks.registry import get_task

    config = load_config(ROOT / "configs" / config_file, list(overrides))
    return train(get_task(config.task), config)


def test_cifar_plain_and_residual_runs_and_their_figure6_curves(cifar_root, tmp_path, capsys):
    """The paper's CIFAR configs run end to end on the CIFAR-format synthetic set (tiny depth and
    schedule), evaluation reloads the run, and tools/plot.py overlays their train and val errors."""
    from safetensors.torch import load_file

    from tools.eval import main as eval_main
    from tools.plot import main as plot_main

    root, _, _ = cifar_root
    tiny = [f"data.root={root}", "data.num_workers=0", "train.batch_size=8", "train.max_iters=4", "train.eval_period=2",
            "train.log_period=2", "train.checkpoint_period=0", "eval.batch_size=16", "eval.num_visualize=4",
            "model.backbone.depth=8", "data.val_split=8"]
    runs = []
    for config in ("cifar10_plain20", "cifar10_resnet20"):
        out = tmp_path / config
        result = train_run(f"{config}.yaml", *tiny, f"output_dir={out}")
        assert result.iterations == 4 and set(result.metrics) == {"cls/top1", "cls/top1_error", "cls/top5", "cls/top5_error"}
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in records if "top1_error" in r] == [2, 4]
        assert [r["iteration"] for r in records if "val/cls/top1_error" in r] == [2, 4]
        assert all(r["loss"] == r["loss_cls"] for r in records if "loss" in r)  # the logged error is not a loss
        runs.append(out)
    state = load_file(runs[1] / "model.safetensors")
    assert state["mean_image"].abs().sum() > 0  # the training images' per-pixel mean, kept with the weights
    assert (runs[1] / "visualizations" / "predictions.png").is_file()
    metrics = json.loads((runs[1] / "metrics.json").read_text())
    assert eval_main([str(runs[1]), "--output-dir", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["cls/top1"] == metrics["cls/top1"]
    capsys.readouterr()
    assert plot_main([*map(str, runs), "--output", str(tmp_path / "fig6.png"), "--names", "plain", "resnet"]) == 0
    assert "top-1 error (train dashed, val solid)" in capsys.readouterr().out
    assert (tmp_path / "fig6.png").stat().st_size > 10_000


def test_quickstart_config_runs_on_folders_and_bad_input_is_one_line(tmp_path, capsys):
    from tools.train import main

    out = tmp_path / "qs"
    train_run("quickstart_cls.yaml", f"data.root={tmp_path / 'crops'}", f"output_dir={out}", "data.synthetic.num_train=6",
              "data.synthetic.num_val=3", "data.synthetic.size=64", "data.num_workers=0", "train.max_iters=2",
              "train.batch_size=4", "train.eval_period=0", "eval.num_visualize=2")
    assert json.loads((out / "categories.json").read_text()) == [{"id": 0, "name": "circle"}, {"id": 1, "name": "square"},
                                                                 {"id": 2, "name": "triangle"}]
    assert (out / "metrics.json").is_file()
    from tasks.registry import prepare_config  # a config check reads no data: the class count can wait for it

    prepare_config(load_config(ROOT / "configs" / "finetune_folder.yaml", [f"data.root={tmp_path / 'nothing'}",
                                                                          "model.backbone.weights=null"]))
    assert not (tmp_path / "nothing").exists()
    capsys.readouterr()
    assert main([str(ROOT / "configs" / "quickstart_cls.yaml"), "data.augmnt=cifar"]) == 2
    assert "did you mean 'data.augment'" in capsys.readouterr().err
    assert main([str(ROOT / "configs" / "quickstart_cls.yaml"), "data.format=cifar"]) == 2
    assert "data.format must be one of folder, cifar10, cifar100 for task classification, got 'cifar'" in capsys.readouterr().err
    from tools.infer import main as infer

    assert infer([str(out), "--input", str(tmp_path), "--output", str(tmp_path / "infer")]) == 2
    assert "tools/infer.py runs detection and segmentation models, not classification" in capsys.readouterr().err
    assert main([str(ROOT / "configs" / "cifar10_resnet20.yaml"), f"data.root={tmp_path / 'none'}",
                 f"output_dir={tmp_path / 'none_run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cifar10 file") and "cifar-10-batches-py" in err


def test_backbone_learning_rate_multiplier_and_constant_warmup():
    from tasks.config import TrainConfig
    from tasks.engine import lr_lambda, param_groups

    model = build_classifier({"num_classes": 3, "backbone": {**CIFAR20, "depth": 8}})
    groups = param_groups(model, 1e-4, False, 0.1, backbone_lr_mult=0.1)
    assert [g["lr"] for g in groups] == [0.1, pytest.approx(0.01)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.backbone.parameters()}
    factor = lr_lambda(TrainConfig(warmup_iters=400, warmup_factor=0.1, warmup_method="constant", steps=[32000, 48000]))
    assert [factor(i) for i in (0, 399, 400, 32000, 48000)] == pytest.approx([0.1, 0.1, 1.0, 0.1, 0.01])
