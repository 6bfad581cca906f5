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
from tasks.data import read_image, shortest_edge_size
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
    record = coco.records[0]
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


def copy_val(tmp_path) -> Path:
    shutil.copytree(TINYCOCO / "images" / "val2017", tmp_path / "images")
    return tmp_path / "images"


def test_missing_and_corrupt_images_are_named(tmp_path):
    images = copy_val(tmp_path)
    data = CocoDetection(TINYCOCO / "annotations" / "instances_val2017.json", images)
    record = data.records[0]
    (images / record.file_name).unlink()
    with pytest.raises(FileNotFoundError, match=f"{record.file_name}.*image id {record.image_id}, listed in .*instances_val2017.json"):
        data[0]
    record = data.records[1]
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
