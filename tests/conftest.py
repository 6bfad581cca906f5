import os
import socket
from pathlib import Path

import pytest
import torch

from tasks.data.synthetic import generate

# Under pytest-xdist (the test command runs one worker per core) each worker computes on its share of the
# cores, so the workers do not oversubscribe them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# overrides that shrink configs/quickstart.yaml to a seconds-long run (tests of the engine and the tools)
TINY = [
    "model.backbone.depth=18", "model.fpn.out_channels=32", "model.roi_heads.fc_dim=64",
    "model.roi_heads.batch_size_per_image=32", "model.rpn.batch_size_per_image=64",
    "data.min_size_train=[64]", "data.max_size_train=96", "data.min_size_test=64", "data.max_size_test=96",
    "data.num_workers=0", "train.batch_size=2", "train.log_period=1", "train.warmup_iters=2",
    "train.schedule=step", "train.steps=[100]", "eval.num_visualize=1", "resume=auto",
]


def free_port() -> int:
    """A TCP port free on this machine now: each multi-process test's rendezvous gets its own, so tests run
    side by side (pytest-xdist) do not meet on accelerate's default port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A tiny synthetic shapes dataset (12 training, 5 validation images of 64 px)."""
    return generate(tmp_path_factory.mktemp("shapes"), num_train=12, num_val=5, size=64, seed=3)


def voc_layout(shapes: Path, root: Path) -> Path:
    """The shapes dataset as a VOCdevkit (``root/VOCdevkit``): its training images split between VOC2007 and
    VOC2012 ``trainval`` (stems prefixed t07_/t12_), its validation images as VOC2007 ``test`` (v_), the three
    shapes named as VOC's first three classes, boxes as the XML's 1-based integers, every third object
    difficult, and one ``trainval`` image without objects."""
    import json
    import shutil

    from tasks.data.voc import VOC_CLASSES

    devkit = root / "VOCdevkit"
    for split, annotations, images in (("train", "instances_train2017.json", "train2017"),
                                       ("test", "instances_val2017.json", "val2017")):
        data = json.loads((shapes / "annotations" / annotations).read_text())
        objects: dict[int, list] = {image["id"]: [] for image in data["images"]}
        for a in data["annotations"]:
            objects[a["image_id"]].append(a)
        for n, image in enumerate(data["images"]):
            year = "VOC2007" if split == "test" or n % 2 == 0 else "VOC2012"
            stem = f"v_{n:04d}" if split == "test" else f"t{year[-2:]}_{n:04d}"
            folder = devkit / year
            for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
                (folder / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(shapes / images / image["file_name"], folder / "JPEGImages" / f"{stem}.jpg")
            parts = [f"<annotation><folder>{year}</folder><filename>{stem}.jpg</filename><size><width>"
                     f"{image['width']}</width><height>{image['height']}</height><depth>3</depth></size>"]
            for k, a in enumerate(objects[image["id"]] if n != 1 else []):
                x, y, w, h = a["bbox"]
                box = (round(x) + 1, round(y) + 1, round(x + w), round(y + h))
                parts.append(f"<object><name>{VOC_CLASSES[a['category_id'] - 1]}</name><difficult>{int(k % 3 == 2)}"
                             "</difficult><bndbox>" + "".join(f"<{t}>{v}</{t}>" for t, v in
                                                            zip(("xmin", "ymin", "xmax", "ymax"), box))
                             + "</bndbox></object>")
            (folder / "Annotations" / f"{stem}.xml").write_text("".join(parts) + "</annotation>")
            listing = folder / "ImageSets" / "Main" / f"{'test' if split == 'test' else 'trainval'}.txt"
            with listing.open("a") as out:
                out.write(stem + "\n")
    return devkit


@pytest.fixture(scope="session")
def voc_shapes(shapes, tmp_path_factory) -> Path:
    """``voc_layout`` of the ``shapes`` dataset: a VOCdevkit folder with VOC2007 and VOC2012."""
    return voc_layout(shapes, tmp_path_factory.mktemp("voc_shapes"))


# data.format voc on ``voc_shapes`` (data.root is the VOCdevkit folder): 07+12 trainval, 07 test
VOC_DATA = ["data.format=voc", "model.num_classes=20", "data.train.sets=[[VOC2007,trainval],[VOC2012,trainval]]",
            "data.val.sets=[[VOC2007,test]]"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Random affine parameters and running statistics in every norm layer, so that equivalence tests
    exercise them (fresh BatchNorms are identities up to eps)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return module


def randomize_frozen_(module: torch.nn.Module) -> torch.nn.Module:
    """``randomize_`` for torchvision's FrozenBatchNorm2d (buffers only)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return module


# The longest tests start first, so that under pytest-xdist the other workers share out the rest while they
# run instead of one of them being left with a long test at the end.
LONG_FIRST = ("test_segmentation_quickstart_reaches_its_bar", "test_mask_quickstart_learns_masks",
              "test_sigterm_writes_a_checkpoint",
              "test_tiny_detector_overfits_a_few_real_images", "test_two_process_training_and_evaluation")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        return next((i for i, name in enumerate(LONG_FIRST) if item.name.startswith(name)), len(LONG_FIRST))

    items.sort(key=rank)  # stable: the rest keep their order
