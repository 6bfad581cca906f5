"""Semantic segmentation from image + label-PNG folders (data.format mask_folder): the three protocol configs
(VOC aug, Cityscapes, ADE20K) each read a small tree of their layout written here with known label values,
and the training ids come out as computed by hand from each dataset's definition; wrong values, missing files
and inconsistent keys are one-line errors naming what and where; a tiny FCN trains and evaluates end to end
with the configured class names."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from backbones.errors import UserError, UserFileNotFoundError
from tasks.config import ConfigError, load_config
from tasks.data.synthetic import make_image
from tasks.registry import get_task, prepare_config
from tasks.segmentation.data import IGNORE
from tasks.segmentation.mask_folder import LabelMapping, MaskFolderSegmentation, read_label

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ROOT / "configs" / "protocols"


def voc_palette() -> list[int]:
    """PASCAL VOC's colour map (the devkit's bit-interleaving), flat RGB for 256 indices."""
    colours = []
    for k in range(256):
        r = g = b = 0
        c = k
        for i in range(8):
            r |= ((c >> 0) & 1) << (7 - i)
            g |= ((c >> 1) & 1) << (7 - i)
            b |= ((c >> 2) & 1) << (7 - i)
            c >>= 3
        colours += [r, g, b]
    return colours


def write_image(path: Path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    cv2.imwrite(str(path), pixels)


def write_label(path: Path, values: np.ndarray, palette: bool = False) -> None:
    """``values`` as a PNG: a palette PNG (VOC's colours) or 8-/16-bit grayscale, by their dtype."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        image = Image.fromarray(values.astype(np.uint8), mode="P")
        image.putpalette(voc_palette())
    else:
        image = Image.fromarray(values)  # uint8 -> L, uint16 -> I;16
    image.save(path)


def datasets(config_name: str, root: Path, *overrides: str):
    """The protocol config's train and val datasets on ``root`` (checked as every tool checks a config)."""
    config = prepare_config(load_config(PROTOCOLS / f"{config_name}.yaml",
                                        [f"data.root={root}", "model.backbone.weights=null", *overrides]))
    task = get_task(config.task)
    return task.train_dataset(config), task.val_dataset(config)


def test_voc_aug_reads_the_palette_pngs_as_class_indices(tmp_path):
    """VOC aug: the split files' stems in order (extra columns ignored), SBD's grayscale PNGs for training and
    VOC's palette PNGs for val, read as their indices (OpenCV would give the palette's colours: 15, person, is
    (192, 128, 128)), 255 (borders) ignored; the names are VOC's."""
    root = tmp_path / "VOC2012"
    for n, stem in enumerate(["2007_000032", "2007_000039", "2008_000123"]):
        values = np.array([[0, 1, 15, 255], [20, 20, 7, n]], np.uint8)  # the last pixel tells the images apart
        write_image(root / "JPEGImages" / f"{stem}.jpg", 2, 4, seed=n)
        write_label(root / "SegmentationClassAug" / f"{stem}.png", values)
        write_label(root / "SegmentationClass" / f"{stem}.png", values, palette=True)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "trainaug.txt").write_text("2008_000123\n2007_000032 extra column\n\n")
    (sets / "val.txt").write_text("2007_000039\n")
    assert Image.open(root / "SegmentationClass" / "2007_000039.png").mode == "P"
    assert cv2.imread(str(root / "SegmentationClass" / "2007_000039.png"), cv2.IMREAD_UNCHANGED)[0, 2].tolist() == [128, 128, 192]

    train, val = datasets("seg_voc_aug_fcn_r50", root)
    assert train.items == ["2008_000123", "2007_000032"] and val.items == ["2007_000039"]
    assert Image.open(root / "SegmentationClassAug" / "2008_000123.png").mode == "L"
    assert train.mask(0).tolist() == [[0, 1, 15, IGNORE], [20, 20, 7, 2]]
    assert train.mask(1).tolist() == [[0, 1, 15, IGNORE], [20, 20, 7, 0]]
    image, target = val[0]
    assert target["mask"].tolist() == [[0, 1, 15, IGNORE], [20, 20, 7, 1]] and target["mask"].dtype == torch.int64
    assert target["orig_size"] == (2, 4) and image.dtype == torch.uint8 and image.shape[0] == 3
    assert min(image.shape[1:]) == 512  # the test scale, the mask at the original resolution
    assert val.num_classes == 21 and val.class_names[15] == "person" and val.class_names[0] == "background"
    assert val.describe(0) == str(root / "JPEGImages" / "2007_000039.jpg")


def test_cityscapes_label_ids_become_the_19_train_ids(tmp_path):
    """Cityscapes: the city folders searched recursively for *_leftImg8bit.png, each matched to its
    *_gtFine_labelIds.png (the colour and instance PNGs beside it untouched); labelIds mapped as
    cityscapesScripts' labels.py gives them: car 26 -> 13, road 7 -> 0, sidewalk 8 -> 1, bicycle 33 -> 18,
    person 24 -> 11, sky 23 -> 10, and unlabeled 0, parking 9, polegroup 18, trailer 30 ignored."""
    root = tmp_path / "cityscapes"
    ids = np.array([[26, 7, 8, 33, 24, 23, 0, 9, 18, 30]], np.uint8)
    expected = [[13, 0, 1, 18, 11, 10, IGNORE, IGNORE, IGNORE, IGNORE]]
    for split, city in (("train", "aachen"), ("train", "bremen"), ("val", "frankfurt")):
        stem = f"{city}_000000_000019"
        write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 1, 10)
        write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
        write_label(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", ids.astype(np.uint16) * 1000)
        write_image(root / "gtFine" / split / city / f"{stem}_gtFine_color.png", 1, 10)
    train, val = datasets("seg_cityscapes_fcn_r50", root)
    assert train.items == ["aachen/aachen_000000_000019", "bremen/bremen_000000_000019"]
    assert val.items == ["frankfurt/frankfurt_000000_000019"]
    assert train.mask(0).tolist() == expected and val[0][1]["mask"].tolist() == expected
    assert val.class_names[13] == "car" and val.class_names[18] == "bicycle" and val.num_classes == 19

    # a value the config does not account for (lane marking 34 of a modified labels.py, or a labelTrainIds file)
    write_label(root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelIds.png",
                np.array([[26, 34, 34, 40]], np.uint8))
    with pytest.raises(UserError, match=r"label file .*frankfurt_000000_000019_gtFine_labelIds.png has value\(s\) 34, 40, "
                                        r"not in data.value_map and not in data.ignore_values"):
        val[0]


def test_ade20k_reduces_the_zero_label(tmp_path):
    """ADE20K: reduce_zero_label makes 0 (other) ignored and v the training id v - 1: 1 (wall) -> 0, 75 -> 74,
    150 (flag) -> 149; a value above 150 is an error naming the file, the value and the rule."""
    root = tmp_path / "ADEChallengeData2016"
    for split, name in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        write_image(root / "images" / split / f"{name}.jpg", 2, 2)
        write_label(root / "annotations" / split / f"{name}.png", np.array([[0, 1], [150, 75]], np.uint8))
    train, val = datasets("seg_ade20k_fcn_r50", root)
    assert train.items == ["ADE_train_00000001"] and val.items == ["ADE_val_00000001"]
    assert train.mask(0).tolist() == [[IGNORE, 0], [149, 74]]
    assert val.class_names[0] == "wall" and val.class_names[149] == "flag" and val.num_classes == 150
    write_label(root / "annotations" / "validation" / "ADE_val_00000001.png", np.array([[0, 151], [1, 2]], np.uint8))
    with pytest.raises(UserError, match=r"ADE_val_00000001.png has value\(s\) 151, outside 1..150 \(data.reduce_zero_label"):
        val.mask(0)


def test_value_rules_on_16_bit_labels():
    """The lookup table over 16-bit values: ignore_values are the file's own values (255 stays ignored under
    reduce_zero_label, as mmsegmentation keeps it), value_map keys are values after reduce_zero_label, a map
    target 255 ignores, and an empty map keeps the value as the id."""
    label = np.array([[0, 1, 1000, 255, 3]], np.uint16)
    plain = LabelMapping(4, {}, [1000])
    with pytest.raises(UserError, match=r"has value\(s\) 255, not training ids 0..3 \(model.num_classes=4"):
        plain(label, "x.png")
    assert plain(np.array([[0, 1, 1000, 3]], np.uint16), "x.png").tolist() == [[0, 1, IGNORE, 3]]
    reduced = LabelMapping(3, {999: 2, 0: 0, 2: IGNORE}, [255], reduce_zero_label=True)
    assert reduced(label, "x.png").tolist() == [[IGNORE, 0, 2, IGNORE, IGNORE]]
    assert reduced.lut.dtype == np.int16 and len(reduced.lut) == 65536


def test_a_colour_label_and_a_size_mismatch_are_named(tmp_path):
    """A colour PNG is not a label (the file and its mode named); an image and label of different sizes name both."""
    write_image(tmp_path / "img" / "a.jpg", 4, 4)
    write_image(tmp_path / "ann" / "a.png", 4, 4)  # RGB
    with pytest.raises(UserError, match=r"label file .*ann/a.png has mode RGB \(3 channels\)"):
        read_label(tmp_path / "ann" / "a.png")
    write_label(tmp_path / "ann" / "a.png", np.zeros((3, 4), np.uint8))
    data = MaskFolderSegmentation(tmp_path / "img", tmp_path / "ann", ["a", "b"])
    with pytest.raises(UserError, match=r"image .*img/a.jpg is 4x4 but its label .*ann/a.png is 4x3"):
        data[0]


def test_missing_files_are_one_line_errors(tmp_path):
    """A listed image or label that does not exist names the file, the split file and its line; an image
    without label (no split file) names both paths; a missing folder names its key."""
    write_image(tmp_path / "img" / "a.jpg", 2, 2)
    write_label(tmp_path / "ann" / "a.png", np.zeros((2, 2), np.uint8))
    write_image(tmp_path / "img" / "sub" / "b.jpg", 2, 2)
    (tmp_path / "list.txt").write_text("a\nsub/c\n")
    with pytest.raises(UserFileNotFoundError, match=r"image file not found: .*img/sub/c.jpg, listed at line 2 of "
                                                    r".*list.txt; 1 of its 2 entries have no image"):
        MaskFolderSegmentation(tmp_path / "img", tmp_path / "ann", ["x"], split_file=tmp_path / "list.txt")
    (tmp_path / "list.txt").write_text("a\nsub/b\n")
    with pytest.raises(UserFileNotFoundError, match=r"label file not found: .*ann/sub/b.png, listed at line 2"):
        MaskFolderSegmentation(tmp_path / "img", tmp_path / "ann", ["x"], split_file=tmp_path / "list.txt")
    (tmp_path / "list.txt").write_text("a.jpg\n")
    with pytest.raises(UserFileNotFoundError, match=r"img/a.jpg.jpg, .*\(entries are paths without the suffix\)"):
        MaskFolderSegmentation(tmp_path / "img", tmp_path / "ann", ["x"], split_file=tmp_path / "list.txt")
    with pytest.raises(UserFileNotFoundError, match=r"image .*img/sub/b.jpg has no label file .*ann/sub/b.png \(1 of "
                                                    r"the 2 images"):
        MaskFolderSegmentation(tmp_path / "img", tmp_path / "ann", ["x"])
    with pytest.raises(UserFileNotFoundError, match=r"labels folder not found: .*nowhere \(data.val.labels"):
        MaskFolderSegmentation(tmp_path / "img", tmp_path / "nowhere", ["x"], where="data.val")
    with pytest.raises(UserFileNotFoundError, match=r"split file not found: .*none.txt \(data.train.split_file"):
        MaskFolderSegmentation(tmp_path / "img", tmp_path / "ann", ["x"], split_file=tmp_path / "none.txt")


@pytest.mark.parametrize("overrides, message", [
    (["data.class_names=[a,b,c]"], r"data.class_names has 3 names but model.num_classes is 21"),
    (["data.value_map={3: 21}"], r"data.value_map maps to training ids 0..20 \(model.num_classes=21\) or 255 \(ignored\); "
                                 r"got 3: 21"),
    (["model.num_classes=300", "data.class_names=[]"], r"takes 1..255 classes"),
    (["data.train.labels=''", "data.label_suffix=.jpg"], r"data.train.labels is empty .* equals data.image_suffix"),
])
def test_inconsistent_keys_are_config_errors(overrides, message):
    """Checked with the config, before any file is read: class names against model.num_classes, map targets."""
    config = load_config(PROTOCOLS / "seg_voc_aug_fcn_r50.yaml", ["model.backbone.weights=null", *overrides])
    with pytest.raises(ConfigError, match=message):
        prepare_config(config)


def shapes_tree(root: Path, count: int, seed: int) -> None:
    """``count`` synthetic shapes images (64 px) as ``root/img/<n>.jpg`` with labels ``root/ann/<n>.png`` whose
    file values are 10 x the class (circle 10, square 20, triangle 30), and a 255 border row (ignored)."""
    rng = np.random.default_rng(seed)
    for n in range(count):
        image, _, semantic = make_image(rng, 64)
        (root / "img").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "img" / f"{n:03d}.jpg"), image[..., ::-1])
        values = semantic * 10
        values[0] = 255
        write_label(root / "ann" / f"{n:03d}.png", values)


def test_a_tiny_fcn_trains_and_evaluates_on_label_folders(tmp_path):
    """The segmentation quickstart (FCN-8s, ResNet-18) on a mask_folder tree for 4 iterations: the run folder's
    categories.json and the validation metrics carry the configured class names, mIoU is a fraction; the run
    folder's config.yaml (with its value map) evaluates again through tools/eval.py to the same metrics."""
    from tasks.engine import train
    from tools.eval import main as evaluate

    shapes_tree(tmp_path / "data" / "train", 6, seed=1)
    shapes_tree(tmp_path / "data" / "val", 3, seed=2)
    names = ["background", "circle", "square", "triangle"]
    config = load_config(ROOT / "configs" / "quickstart_fcn.yaml", [
        "data.format=mask_folder", "data.synthetic=null", f"data.root={tmp_path / 'data'}",
        "data.train.images=train/img", "data.train.labels=train/ann", "data.val.images=val/img",
        "data.val.labels=val/ann", "data.image_suffix=.jpg", "data.label_suffix=.png",
        f"data.class_names=[{','.join(names)}]", "data.value_map={0: 0, 10: 1, 20: 2, 30: 3}",
        "data.min_size_train=[64]", "data.crop_size=64", "data.min_size_test=64", "data.num_workers=0",
        "train.max_iters=4", "train.batch_size=2", "train.warmup_iters=1", "train.log_period=2", "train.log_with=[]",
        "eval.num_visualize=1", f"output_dir={tmp_path / 'run'}"])
    result = train(get_task(config.task), config)
    run = tmp_path / "run"
    assert result.iterations == 4
    assert [c["name"] for c in json.loads((run / "categories.json").read_text())] == names
    per_class = {k[len("segm/IoU/"):] for k in result.metrics if k.startswith("segm/IoU/")}
    assert "background" in per_class and per_class <= set(names)
    assert 0.0 <= result.metrics["segm/mIoU"] <= 1.0 and 0.0 <= result.metrics["segm/pixel_accuracy"] <= 1.0
    assert (run / "visualizations" / "000.png").is_file()  # named after the item

    assert evaluate([str(run), "--output-dir", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again == pytest.approx({k: v for k, v in result.metrics.items()})


def protocol_tree(config, root: Path, count: int = 4) -> None:
    """A tiny tree in the layout ``config`` (a mask_folder protocol) reads: ``count`` 64 px images a split under
    a sub-folder (``city/``), each label drawn from the file values the config accounts for (its value map's
    keys, or the ids; and its ignored values), and the split files it names."""
    data = config.data
    classes = int(config.model["num_classes"])
    if data.value_map:
        values = sorted(data.value_map)
    else:
        values = list(range(1, classes + 1)) if data.reduce_zero_label else list(range(classes))
    values += list(data.ignore_values) + ([0] if data.reduce_zero_label else [])
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        paths = getattr(data, split)
        labels = paths.labels or paths.images
        stems = [f"city/{split}_{n}" for n in range(count)]
        for n, stem in enumerate(stems):
            write_image(root / paths.images / f"{stem}{data.image_suffix}", 64, 64, seed=n)
            write_label(root / labels / f"{stem}{data.label_suffix}",
                        rng.choice(np.asarray(values, np.uint8), size=(64, 64)))
        if paths.split_file:
            (root / paths.split_file).parent.mkdir(parents=True, exist_ok=True)
            (root / paths.split_file).write_text("\n".join(stems) + "\n")


@pytest.mark.parametrize("name", ["seg_voc_aug_fcn_r50", "seg_cityscapes_fcn_r50", "seg_ade20k_fcn_r50"])
def test_each_segmentation_protocol_runs_end_to_end(tmp_path, name):
    """Two iterations and an evaluation of each FCN protocol (its own layout, suffixes and value rules; a
    dilated ResNet-18 at 64 px instead of the ResNet-50 at its crop size): mIoU over its classes, named as its
    data.class_names."""
    from tasks.engine import train

    small = ["model.backbone.depth=18", "model.backbone.weights=null", "data.min_size_train=[64]", "data.crop_size=64",
             "data.max_size_train=128", "data.min_size_test=64", "data.max_size_test=128", "data.num_workers=0",
             "train.batch_size=2", "train.max_iters=2", "train.warmup_iters=0", "train.log_period=1",
             "train.log_with=[]", "eval.num_visualize=0"]
    config = load_config(PROTOCOLS / f"{name}.yaml", [*small, f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}"])
    protocol_tree(config, tmp_path / "data")
    result = train(get_task(config.task), config)
    assert result.iterations == 2 and 0.0 <= result.metrics["segm/mIoU"] <= 1.0
    per_class = {k[len("segm/IoU/"):] for k in result.metrics if k.startswith("segm/IoU/")}
    assert per_class and per_class <= set(config.data.class_names)


def test_check_data_decodes_every_label_with_the_value_rules(tmp_path, capsys):
    """tools/check_data.py --decode on a mask_folder protocol: every item read, a label with a value the
    config does not account for reported with its file, exit code 1."""
    from tools.check_data import main as check

    name = "seg_ade20k_fcn_r50"
    overrides = [f"data.root={tmp_path / 'data'}", "model.backbone.weights=null", "data.min_size_test=64"]
    protocol_tree(load_config(PROTOCOLS / f"{name}.yaml", overrides), tmp_path / "data", count=2)
    assert check([str(PROTOCOLS / f"{name}.yaml"), *overrides, "--decode"]) == 0
    assert "[val] 2 images (mask_folder)" in capsys.readouterr().out
    bad = tmp_path / "data" / "annotations" / "validation" / "city" / "val_1.png"
    write_label(bad, np.full((64, 64), 151, np.uint8))
    assert check([str(PROTOCOLS / f"{name}.yaml"), *overrides, "--decode", "--split", "val"]) == 1
    printed = capsys.readouterr().out
    assert "[val] 2 images (mask_folder), 1 with errors:" in printed and f"label file {bad} has value(s) 151" in printed
