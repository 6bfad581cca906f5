"""COCO detection data on real tinycoco photos and annotations; bad input gives errors that name it."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbones.errors import UserError
from tasks.data.images import read_image, shortest_edge_size
from tasks.detection.data import CocoDetection, detection_transform

TINYCOCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinycoco"
SPLITS = ["train2017", "val2017"]


def dataset(split: str, transform=None, train=False, **kwargs) -> CocoDetection:
    return CocoDetection(TINYCOCO / "annotations" / f"instances_{split}.json", TINYCOCO / "images" / split, transform,
                         train=train, **kwargs)


@pytest.mark.parametrize("split", SPLITS)
def test_every_annotation_is_accounted_for(split):
    raw = json.loads((TINYCOCO / "annotations" / f"instances_{split}.json").read_text())
    data = dataset(split)
    crowd = sum(1 for a in raw["annotations"] if a.get("iscrowd"))
    assert data.kept + data.crowd + sum(data.dropped.values()) == len(raw["annotations"])
    assert data.crowd == crowd
    assert len(data) == len(raw["images"])  # evaluation keeps every image
    train = dataset(split, train=True)
    with_objects = {a["image_id"] for a in raw["annotations"] if not a.get("iscrowd")}
    assert len(train) == len(with_objects) and len(train) + train.skipped_images == len(raw["images"])


def test_labels_map_to_and_from_category_ids():
    contiguous = dataset("val2017")
    assert sorted(contiguous.category_to_label.values()) == list(range(1, 81))
    assert all(contiguous.label_to_category[contiguous.category_to_label[c]] == c for c in contiguous.category_ids)
    coco = dataset("val2017", label_map="coco_id")
    assert coco.category_to_label[90] == 90 and coco.num_classes == 90
    record = coco.record(0)
    anns = [a for a in coco.coco.imgToAnns[record.image_id]]
    assert sorted(record.labels.tolist()) == sorted(a["category_id"] for a in anns)


def test_degenerate_boxes_are_dropped_and_counted(tmp_path):
    raw = json.loads((TINYCOCO / "annotations" / "instances_val2017.json").read_text())
    image = raw["images"][0]
    raw["annotations"].append({"id": 999001, "image_id": image["id"], "category_id": 1, "iscrowd": 0,
                               "bbox": [image["width"] + 5, 10, 20, 20], "area": 400})  # outside the image
    raw["annotations"].append({"id": 999002, "image_id": image["id"], "category_id": 1, "iscrowd": 0,
                               "bbox": [10, 10, 0, 20], "area": 0})  # zero width
    (tmp_path / "ann.json").write_text(json.dumps(raw))
    data = CocoDetection(tmp_path / "ann.json", TINYCOCO / "images" / "val2017")
    assert data.dropped == Counter({"boxes degenerate after clipping to the image": 2})
    assert data.kept + data.crowd + 2 == len(raw["annotations"])


@pytest.mark.parametrize("split", SPLITS)
def test_augmented_boxes_stay_inside_and_follow_the_objects(split):
    """Resize and flip move every box with its object: compare each augmented box with the original box
    scaled (and mirrored) by hand."""
    plain = dataset(split)
    resized = dataset(split, detection_transform(False, (320,), 480))
    flipped = dataset(split, detection_transform(True, (320,), 480, flip_prob=1.0))
    for index in range(len(plain)):
        _, original = plain[index]
        image, target = resized[index]
        flipped_image, flipped_target = flipped[index]
        h, w = original["orig_size"]
        new_h, new_w = shortest_edge_size(h, w, 320, 480)
        assert image.shape == (3, new_h, new_w) == flipped_image.shape
        scale = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h])
        assert torch.allclose(target["boxes"], original["boxes"] * scale, atol=1e-3)
        mirrored = original["boxes"] * scale
        mirrored = torch.stack([new_w - mirrored[:, 2], mirrored[:, 1], new_w - mirrored[:, 0], mirrored[:, 3]], dim=1)
        assert torch.allclose(flipped_target["boxes"], mirrored, atol=1e-3)
        assert torch.equal(flipped_target["labels"], original["labels"])
        assert torch.equal(flipped_target["iscrowd"], original["iscrowd"])
        for boxes in (target["boxes"], flipped_target["boxes"]):
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= new_w).all()
            assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= new_h).all()
        assert torch.equal(flipped_image, image.flip(-1))  # same resize, then mirrored pixels


def test_shortest_edge_size_caps_the_longer_side():
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    assert shortest_edge_size(400, 1200, 800, 1333) == (444, 1333)


def test_training_stream_batches_share_orientation_and_shard_the_data():
    from itertools import islice

    from tasks.engine import TrainingStream

    data = dataset("train2017", train=True)
    groups = data.aspect_groups()
    assert set(groups) == {0, 1}  # the tinycoco photos include portrait and landscape ones
    batches = list(islice(iter(TrainingStream(len(data), 4, seed=0, group_ids=groups)), 20))
    assert all(len({groups[i] for i, _ in b}) == 1 for b in batches)
    rank0 = [i for b in islice(iter(TrainingStream(len(data), 2, 0, 0, 2)), 7) for i, _ in b]
    rank1 = [i for b in islice(iter(TrainingStream(len(data), 2, 0, 1, 2)), 7) for i, _ in b]
    assert not set(rank0) & set(rank1) and len(set(rank0) | set(rank1)) == 28  # disjoint shards of an epoch
    again = list(islice(iter(TrainingStream(len(data), 4, seed=0, group_ids=groups)), 20))
    assert again == batches  # reproducible from the seed


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA"])
def test_grayscale_cmyk_palette_images_decode_to_rgb(tmp_path, mode):
    pixels = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    path = tmp_path / ("image.jpg" if mode in ("L", "CMYK") else "image.png")
    Image.fromarray(pixels).convert(mode).save(path)
    decoded = read_image(path)
    assert decoded.shape == (20, 30, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(path).convert("RGB")))


@pytest.mark.parametrize("suffix, mode", [(".bmp", "RGB"), (".bmp", "L"), (".tif", "RGB"), (".tiff", "CMYK")])
def test_bmp_and_tiff_decode_to_rgb(tmp_path, suffix, mode):
    """BMP and TIFF, which torchvision's decoders do not read, are read by OpenCV: the pixels Pillow reads."""
    pixels = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    path = tmp_path / f"image{suffix}"
    Image.fromarray(pixels).convert(mode).save(path)
    decoded = read_image(path)
    assert decoded.shape == (20, 30, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(path).convert("RGB")))
    path.write_bytes(b"BM not really a bitmap")
    with pytest.raises(UserError, match=f"cannot decode image {path}"):
        read_image(path)


def copy_val(tmp_path) -> Path:
    shutil.copytree(TINYCOCO / "images" / "val2017", tmp_path / "images")
    return tmp_path / "images"


def test_missing_and_corrupt_images_are_named(tmp_path):
    images = copy_val(tmp_path)
    data = CocoDetection(TINYCOCO / "annotations" / "instances_val2017.json", images)
    record = data.record(0)
    (images / record.file_name).unlink()
    with pytest.raises(FileNotFoundError, match=f"{record.file_name}.*image id {record.image_id}, listed in .*instances_val2017.json"):
        data[0]
    record = data.record(1)
    (images / record.file_name).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(UserError, match=f"cannot decode image .*{record.file_name}.*image id {record.image_id}, listed in .*instances_val2017.json"):
        data[1]


def test_bad_annotation_files_are_named(tmp_path):
    images = TINYCOCO / "images" / "val2017"
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        CocoDetection(tmp_path / "nothere.json", images)
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="list.json is not a COCO instances file"):
        CocoDetection(tmp_path / "list.json", images)
    (tmp_path / "broken.json").write_text("{\"images\": [")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        CocoDetection(tmp_path / "broken.json", images)
    raw = json.loads((TINYCOCO / "annotations" / "instances_val2017.json").read_text())
    raw["annotations"][3]["bbox"] = [1, 2, 3]
    (tmp_path / "short_bbox.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"annotation {raw['annotations'][3]['id']} of image"):
        CocoDetection(tmp_path / "short_bbox.json", images)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        CocoDetection(TINYCOCO / "annotations" / "instances_val2017.json", tmp_path / "no_images")


def _reference_records(annotation_file) -> dict:
    """Boxes, labels and crowd flags of every image as the pycocotools index gives them, clipped by hand
    (float64, then float32): what the compact table must reproduce."""
    import contextlib
    import io
    import math

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotation_file))
    label = {c: i + 1 for i, c in enumerate(sorted(coco.getCatIds()))}
    records = {}
    for image_id, info in coco.imgs.items():
        boxes, labels, crowd = [], [], []
        for ann in coco.imgToAnns.get(image_id, []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                continue
            x1, y1 = min(max(x, 0.0), info["width"]), min(max(y, 0.0), info["height"])
            x2, y2 = min(max(x + w, 0.0), info["width"]), min(max(y + h, 0.0), info["height"])
            if x2 > x1 and y2 > y1:
                boxes.append((x1, y1, x2, y2))
                labels.append(label[ann["category_id"]])
                crowd.append(bool(ann.get("iscrowd", 0)))
        records[image_id] = (info["file_name"], info["height"], info["width"],
                             np.asarray(boxes, np.float32).reshape(-1, 4), labels, crowd)
    return records


def test_compact_records_equal_the_pycocotools_index(tmp_path):
    """Every image's boxes, labels and crowd flags, in pycocotools' order, on the tinycoco splits and on a
    file with shuffled annotations, an annotation of an unlisted image, a non-finite and a border-crossing
    box."""
    raw = json.loads((TINYCOCO / "annotations" / "instances_train2017.json").read_text())
    rng = np.random.default_rng(0)
    raw["annotations"] = [raw["annotations"][i] for i in rng.permutation(len(raw["annotations"]))]
    image = raw["images"][3]
    raw["annotations"] += [
        {"id": 990001, "image_id": 123456789, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0, "area": 25},
        {"id": 990002, "image_id": image["id"], "category_id": 1, "bbox": [1, float("nan"), 5, 5], "iscrowd": 0},
        {"id": 990003, "image_id": image["id"], "category_id": 3, "bbox": [-4.5, 2.25, image["width"], 7.5],
         "iscrowd": 0, "area": 3},
    ]
    raw["images"] = raw["images"][::-1]
    (tmp_path / "shuffled.json").write_text(json.dumps(raw))
    files = [TINYCOCO / "annotations" / f"instances_{s}.json" for s in SPLITS] + [tmp_path / "shuffled.json"]
    for annotation_file in files:
        reference = _reference_records(annotation_file)
        for train in (False, True):
            data = CocoDetection(annotation_file, TINYCOCO / "images" / "train2017", train=train)
            expected = [i for i in sorted(reference) if not train or not all(reference[i][5])]
            assert [data.record(i).image_id for i in range(len(data))] == expected
            for index, image_id in enumerate(expected):
                record, (name, height, width, boxes, labels, crowd) = data.record(index), reference[image_id]
                assert (record.file_name, record.height, record.width) == (name, height, width)
                assert np.array_equal(record.boxes, boxes) and record.boxes.dtype == np.float32
                assert record.labels.tolist() == labels and record.iscrowd.tolist() == crowd


def _reachable_objects(root) -> int:
    """How many distinct Python objects can be reached from ``root`` (a numpy array counts as one; modules,
    classes and functions are not entered)."""
    import gc
    import types

    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(obj))
        if not isinstance(obj, np.ndarray):
            stack.extend(gc.get_referents(obj))
    return len(seen)


def test_a_dataset_holds_no_python_objects_per_image(tmp_path):
    """Forked DataLoader workers copy every Python object the garbage collector walks: the dataset's
    object count must not grow with the number of images and annotations (ten times more here)."""
    raw = json.loads((TINYCOCO / "annotations" / "instances_val2017.json").read_text())
    counts = []
    for copies in (1, 10):
        images, annotations = [], []
        for copy in range(copies):
            images += [{**im, "id": im["id"] * 100 + copy} for im in raw["images"]]
            annotations += [{**a, "id": a["id"] * 100 + copy, "image_id": a["image_id"] * 100 + copy}
                            for a in raw["annotations"]]
        (tmp_path / f"x{copies}.json").write_text(json.dumps({**raw, "images": images, "annotations": annotations}))
        data = CocoDetection(tmp_path / f"x{copies}.json", TINYCOCO / "images" / "val2017", detection_transform(True))
        assert len(data) >= copies * (len(raw["images"]) - 2)
        counts.append(_reachable_objects(data))
    assert counts[0] == counts[1]
