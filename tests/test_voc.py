"""PASCAL VOC detection: the VOCdevkit reader (detectron2's 0-based coordinates, difficult objects, XML edge
cases) and the metric, checked against the official devkit's algorithm (VOCevaldet as py-faster-rcnn and
detectron2 port it, written out below in its own loop form: the XML's raw 1-based boxes, detections moved
back by +1, inclusive IoU) on a generated VOC folder with difficult objects, duplicates and tied scores, for
both AP rules; and a hand-computed curve. Training on VOC (``data.format: voc``, 07+12) and its evaluation,
in one process and sharded over two."""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, VOC_DATA, free_port

from backbones.errors import UserError
from tasks.config import ConfigError, load_config
from tasks.data.voc import VOC_CLASSES, read_voc_annotation, read_voc_split
from tasks.detection.data import VocDetection
from tasks.engine import train
from tasks.evaluation.voc import IOU_THRESHOLDS, VocDetections, VocTruth, average_precision, evaluate_voc, load_voc_detections
from tasks.registry import get_task, prepare_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _xml(filename, width, height, objects, with_flags=True) -> str:
    parts = [f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (xmin, ymin, xmax, ymax), difficult in objects:
        flags = f"<truncated>0</truncated><difficult>{int(difficult)}</difficult>" if with_flags or difficult else ""
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose>{flags}<bndbox><xmin>{xmin}</xmin>"
                     f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """A VOC2007-layout folder of 40 annotated images (a few without objects, a fifth of the objects difficult,
    some XML without difficult/truncated tags) and a results file: jittered copies of most objects, duplicates,
    false positives, scores on a 0.05 grid (ties)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("voc") / "VOCdevkit" / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    ids, results = [], []
    for n in range(40):
        image_id = f"{n:06d}"
        ids.append(image_id)
        width, height = int(rng.integers(200, 500)), int(rng.integers(200, 500))
        objects = []
        for _ in range(0 if n % 9 == 0 else int(rng.integers(1, 6))):
            xmin, ymin = int(rng.integers(1, width - 60)), int(rng.integers(1, height - 60))
            xmax, ymax = int(rng.integers(xmin + 10, width)), int(rng.integers(ymin + 10, height))
            objects.append((VOC_CLASSES[int(rng.integers(0, 5)) if n % 2 else int(rng.integers(0, 20))],
                            (xmin, ymin, xmax, ymax), bool(rng.random() < 0.2)))
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(f"{image_id}.jpg", width, height, objects,
                                                                   with_flags=n % 3 != 0))
        for name, (xmin, ymin, xmax, ymax), _ in objects:
            for _ in range(int(rng.integers(0, 3))):  # 0: missed, 2: a duplicate
                x1, y1 = xmin - 1 + rng.normal(0, 4), ymin - 1 + rng.normal(0, 4)  # detectron2's 0-based pixels
                x2, y2 = xmax + rng.normal(0, 4), ymax + rng.normal(0, 4)
                label = VOC_CLASSES.index(name) if rng.random() < 0.9 else int(rng.integers(0, 20))
                results.append({"image_id": image_id, "category_id": label + 1, "score": round(rng.random() * 20) / 20,
                                "bbox": [x1, y1, x2 - x1, y2 - y1]})
        for _ in range(int(rng.integers(0, 3))):  # false positives
            x1, y1 = rng.uniform(0, width - 50), rng.uniform(0, height - 50)
            results.append({"image_id": image_id, "category_id": int(rng.integers(1, 21)),
                            "score": round(rng.random() * 20) / 20, "bbox": [x1, y1, 40.0, 40.0]})
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    (root.parent / "results.json").write_text(json.dumps(results))
    return root, root.parent / "results.json"


def devkit_ap(annotations: Path, ids, results, class_name, threshold, use_07):
    """The devkit's per-class AP, in its own form: the XML read raw, detections back to 1-based."""
    recs = {}
    for image_id in ids:
        objects = ET.parse(annotations / f"{image_id}.xml").findall("object")
        recs[image_id] = [{"name": o.find("name").text, "difficult": int(o.find("difficult").text)
                           if o.find("difficult") is not None else 0,
                           "bbox": [int(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]}
                          for o in objects]
    class_recs, npos = {}, 0
    for image_id in ids:
        R = [o for o in recs[image_id] if o["name"] == class_name]
        bbox = np.array([x["bbox"] for x in R]).reshape(-1, 4).astype(float)
        difficult = np.array([x["difficult"] for x in R]).astype(bool)
        npos += int(np.sum(~difficult))
        class_recs[image_id] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(R)}
    label = VOC_CLASSES.index(class_name) + 1
    mine = [r for r in results if r["category_id"] == label]
    image_ids = [r["image_id"] for r in mine]
    confidence = np.array([r["score"] for r in mine])
    BB = np.array([[r["bbox"][0] + 1, r["bbox"][1] + 1, r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]
                   for r in mine]).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence)
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin, iymin = np.maximum(BBGT[:, 0], bb[0]), np.maximum(BBGT[:, 1], bb[1])
            ixmax, iymax = np.minimum(BBGT[:, 2], bb[2]), np.minimum(BBGT[:, 3], bb[3])
            iw, ih = np.maximum(ixmax - ixmin + 1.0, 0.0), np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0) + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax, jmax = np.max(overlaps), np.argmax(overlaps)
        if ovmax > threshold:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d], R["det"][jmax] = 1.0, True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec, mpre = np.concatenate(([0.0], rec, [1.0])), np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


@pytest.mark.parametrize("rule", ["11point", "area"])
def test_the_metric_equals_the_devkit_per_class_at_every_threshold(voc, rule):
    root, results_file = voc
    images = read_voc_split(root, "test")
    truths = {image.image_id: image.truth for image in images}
    results = json.loads(results_file.read_text())
    report = evaluate_voc(truths, load_voc_detections(results_file, list(truths), 20), VOC_CLASSES, rule)
    ids = [image.image_id for image in images]
    present = 0
    for t, threshold in enumerate(IOU_THRESHOLDS):
        for c, name in enumerate(VOC_CLASSES):
            positives = sum(int(np.sum((tr.labels == c) & ~tr.difficult)) for tr in truths.values())
            if positives == 0:
                assert report.per_class[t][c] is None
                continue
            present += 1
            expected = devkit_ap(root / "Annotations", ids, results, name, threshold, rule == "11point")
            assert report.per_class[t][c] == pytest.approx(expected, abs=1e-6), (name, threshold)
    assert present > 10 * 15  # most classes have positives at every threshold
    ap50 = [ap for ap in report.per_class[0] if ap is not None]
    assert report.summary["mAP"] == report.summary["AP50"] == pytest.approx(np.mean(ap50))
    assert report.summary["AP"] == pytest.approx(np.mean([np.mean([a for a in row if a is not None])
                                                          for row in report.per_class]))
    assert 0.05 < report.summary["AP75"] < report.summary["AP50"] < 0.95  # the case is neither trivial nor empty


def test_a_hand_computed_curve():
    """Two objects; detections hit (0.9), miss (0.8), hit (0.7): recall 0.5, 0.5, 1 at precision 1, 1/2, 2/3.
    11-point: (6 x 1 + 5 x 2/3) / 11; area: 0.5 x 1 + 0.5 x 2/3."""
    truth = {"a": VocTruth(np.array([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), np.array([0, 0]),
                           np.array([False, False]))}
    detections = VocDetections(["a"] * 3, np.array([0, 0, 0]), np.array([0.9, 0.8, 0.7]),
                               np.array([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [20.0, 20.0, 30.0, 30.0]]))
    assert evaluate_voc(truth, detections, ["x"], "11point").summary["mAP"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert evaluate_voc(truth, detections, ["x"], "area").summary["mAP"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(np.array([1.0]), np.array([1.0]), "11point") == pytest.approx(1.0)
    # the second object difficult: one positive; the detection on the difficult object counts for nothing,
    # the miss (0.8) comes after the hit: recall 1 at precision 1, AP 1 with or without that detection
    truth["a"].difficult = np.array([False, True])
    assert evaluate_voc(truth, detections, ["x"], "area").summary["mAP"] == pytest.approx(1.0)
    without = VocDetections(["a"] * 2, detections.labels[:2], detections.scores[:2], detections.boxes[:2])
    assert evaluate_voc(truth, without, ["x"], "11point").summary["mAP"] == pytest.approx(1.0)


def test_the_reader_gives_detectron2s_coordinates_and_handles_the_xml_edge_cases(tmp_path):
    xml = tmp_path / "Annotations" / "000001.xml"
    xml.parent.mkdir()
    xml.write_text(_xml("000001.jpg", 353, 500, [("dog", (48, 240, 195, 371), False), ("person", (8, 12, 352, 498), True)],
                        with_flags=False))
    image = read_voc_annotation(xml)
    assert (image.image_id, image.width, image.height) == ("000001", 353, 500)
    assert image.file == tmp_path / "JPEGImages" / "000001.jpg"
    np.testing.assert_array_equal(image.truth.boxes, [[47, 239, 195, 371], [7, 11, 352, 498]])
    assert image.truth.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert image.truth.difficult.tolist() == [False, True]  # no <difficult> tag: 0
    empty = tmp_path / "Annotations" / "000002.xml"
    empty.write_text(_xml("000002.jpg", 100, 80, []))
    assert read_voc_annotation(empty).truth.boxes.shape == (0, 4)

    not_voc = tmp_path / "Annotations" / "000003.xml"
    not_voc.write_text("<images><image id='1'/></images>")
    with pytest.raises(UserError, match=rf"^{not_voc}: not a VOC annotation file \(it needs an <annotation> root"):
        read_voc_annotation(not_voc)
    not_voc.write_text("<annotation><size>")
    with pytest.raises(UserError, match=rf"^{not_voc}: not a VOC annotation file \("):
        read_voc_annotation(not_voc)
    unknown = tmp_path / "Annotations" / "000004.xml"
    unknown.write_text(_xml("000004.jpg", 100, 80, [("unicorn", (1, 1, 10, 10), False)]))
    with pytest.raises(UserError, match=rf"^{unknown}: object of unknown class 'unicorn'"):
        read_voc_annotation(unknown)


def test_eval_tool_on_a_voc_folder(voc, tmp_path, capsys):
    from tools.eval import main as evaluate

    root, results_file = voc
    out = tmp_path / "voc_metrics.json"
    assert evaluate(["--voc", str(root), "--split", "test", "--results", str(results_file), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["rule"] == "11point"  # the VOC2007 folder's rule
    images = read_voc_split(root, "test")
    truths = {image.image_id: image.truth for image in images}
    report = evaluate_voc(truths, load_voc_detections(results_file, list(truths), 20), VOC_CLASSES, "11point")
    assert written["mAP"] == pytest.approx(report.summary["mAP"]) and written["per_class"] == report.class_ap(0.5)
    assert f"mAP {100 * report.summary['mAP']:.2f}" in printed and "aeroplane" in printed
    assert evaluate(["--voc", str(root), "--results", str(results_file), "--metric", "area", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["rule"] == "area"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": "nope", "category_id": 1, "score": 0.5, "bbox": [0, 0, 1, 1]}]))
    assert evaluate(["--voc", str(root), "--results", str(bad)]) == 2
    assert f"results file {bad}, entry 0: image_id 'nope' is not an image of the split" in capsys.readouterr().err


# --- training and evaluating on VOC (data.format: voc) ----------------------------------------------------

def _xml_objects(path: Path) -> list[tuple[str, list[int], int]]:
    return [(o.findtext("name"), [int(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")],
             int(o.findtext("difficult"))) for o in ET.parse(path).findall("object")]


def test_the_voc_dataset_joins_07_and_12_in_detectron2s_coordinates(voc_shapes, tmp_path):
    """07+12 trainval: VOC2007's images, then VOC2012's; boxes the XML's minus 1 at the top left; labels 1..20
    in VOC order; difficult objects trained on (detectron2's reader keeps them) but flagged for the metric,
    whose boxes stay the XML's; the image without objects skipped for training only."""
    sets = [(voc_shapes / "VOC2007", "trainval"), (voc_shapes / "VOC2012", "trainval")]
    listed = [(year, stem) for year in ("VOC2007", "VOC2012")
              for stem in (voc_shapes / year / "ImageSets/Main/trainval.txt").read_text().split()]
    evaluation, training = VocDetection(sets), VocDetection(sets, train=True)
    assert list(evaluation.image_names) == [stem for _, stem in listed] and len(evaluation) == 12
    empty = [stem for year, stem in listed if not _xml_objects(voc_shapes / year / "Annotations" / f"{stem}.xml")]
    assert len(empty) == 1 and len(training) == 11 and empty[0] not in [training.image_names[r] for r in training.image_rows]
    truths = evaluation.truths()
    difficult = 0
    for index, (year, stem) in enumerate(listed):
        objects = _xml_objects(voc_shapes / year / "Annotations" / f"{stem}.xml")
        _, target = evaluation[index]
        expected = [[x1 - 1, y1 - 1, x2, y2] for _, (x1, y1, x2, y2), _ in objects]
        assert target["boxes"].tolist() == expected and target["image_id"] == index
        assert target["labels"].tolist() == [VOC_CLASSES.index(name) + 1 for name, _, _ in objects]
        assert not target["iscrowd"].any()
        assert truths[stem].difficult.tolist() == [bool(d) for _, _, d in objects]
        assert truths[stem].boxes.tolist() == expected and truths[stem].labels.tolist() == [label - 1 for label in target["labels"].tolist()]
        difficult += sum(d for _, _, d in objects)
    assert difficult > 0

    # an image whose size is not the XML's
    shutil.copytree(voc_shapes / "VOC2007", tmp_path / "VOC2007")
    stem = listed[0][1]
    xml = tmp_path / "VOC2007" / "Annotations" / f"{stem}.xml"
    xml.write_text(xml.read_text().replace("<width>64</width>", "<width>65</width>"))
    image = tmp_path / "VOC2007" / "JPEGImages" / f"{stem}.jpg"
    with pytest.raises(UserError, match=rf"^image {image} is 64x64 but {xml} says 65x64$"):
        VocDetection([(tmp_path / "VOC2007", "trainval")])[0]


def test_voc_config_errors_name_the_key(voc_shapes):
    task = get_task("detection")
    base = [*VOC_DATA, f"data.root={voc_shapes}"]
    with pytest.raises(ConfigError, match="^data.format voc has 20 classes but model.num_classes is 3: set model.num_classes=20$"):
        prepare_config(load_config(QUICKSTART, [*base, "model.num_classes=3"]))
    with pytest.raises(ConfigError, match=r"^data.val.sets must list \[year folder, split\] pairs .* got \[\['VOC2007'\]\]$"):
        prepare_config(load_config(QUICKSTART, [*base, "data.val.sets=[[VOC2007]]"]))
    with pytest.raises(ConfigError, match="^data.format voc has boxes only: model.masks must be false"):
        prepare_config(load_config(QUICKSTART, [*base, "model.masks=true"]))
    assert task.data_formats == ("coco", "voc")


@pytest.fixture(scope="module")
def voc_run(voc_shapes, tmp_path_factory):
    """A tiny detector trained for 4 iterations on the shapes' 07+12 trainval and evaluated on 07 test, every
    detection kept (score threshold 0), so that every class has a curve."""
    out = tmp_path_factory.mktemp("voc_run") / "run"
    config = load_config(QUICKSTART, [*TINY, *VOC_DATA, f"data.root={voc_shapes}", f"output_dir={out}",
                                      "train.max_iters=4", "model.roi_heads.score_thresh=0.0", "train.log_with=[]"])
    result = train(get_task("detection"), config)
    assert result.iterations == 4
    return out, result.metrics


def test_training_on_voc_evaluates_with_the_devkits_metric(voc_run, voc_shapes):
    """The run's VOC evaluation (07 test: the 11-point rule) equals the devkit's loop, per class at IoU 0.5 and
    0.75, on the results file it wrote (file stems as image ids); the classes are VOC's in the run folder."""
    out, metrics = voc_run
    assert set(metrics) == {"bbox/mAP", "bbox/AP", "bbox/AP50", "bbox/AP75"}
    report = json.loads((out / "voc_report.json").read_text())
    assert report["rule"] == "11point" and report["mAP"] == pytest.approx(metrics["bbox/mAP"])
    results = json.loads((out / "voc_results.json").read_text())
    test_ids = (voc_shapes / "VOC2007/ImageSets/Main/test.txt").read_text().split()
    assert results and {r["image_id"] for r in results} <= set(test_ids)
    annotations = voc_shapes / "VOC2007" / "Annotations"
    checked = 0
    for threshold in (0.5, 0.75):
        for name, ap in report["per_class_by_iou"][f"{threshold:.2f}"].items():
            if ap is not None:
                assert ap == pytest.approx(devkit_ap(annotations, test_ids, results, name, threshold, True), abs=1e-6)
                checked += 1
    assert checked >= 4  # three shapes' classes at two thresholds (a class may have only difficult objects)
    categories = json.loads((out / "categories.json").read_text())
    assert [c["name"] for c in categories] == list(VOC_CLASSES) and [c["id"] for c in categories] == list(range(1, 21))


def test_voc_evaluation_sharded_over_two_processes_equals_one(voc_run, tmp_path):
    """tools/eval.py on the run folder under accelerate launch with two processes: each predicts every other
    image, the main process gathers them; the metrics and the results equal the run's own evaluation."""
    out, metrics = voc_run
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "tools/eval.py", str(out), "--output-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics, abs=1e-9)
    key = lambda r: (r["image_id"], r["category_id"], r["score"], r["bbox"])  # noqa: E731
    assert sorted(json.loads((tmp_path / "voc_results.json").read_text()), key=key) == sorted(
        json.loads((out / "voc_results.json").read_text()), key=key)


def test_check_data_reads_a_voc_config_with_the_runs_reader(voc_shapes, tmp_path, capsys):
    """tools/check_data.py on a VOC config: each split built as the run builds it (07+12 trainval less the image
    without objects, 07 test) and, with --decode, every item read; a listed image whose XML is missing is an
    error of its split naming the file, exit code 1."""
    from tools.check_data import main as check

    base = [str(QUICKSTART), *VOC_DATA, f"data.root={voc_shapes}"]
    assert check([*base, "--decode"]) == 0
    printed = capsys.readouterr().out
    assert "[train] 11 images (voc)" in printed and "[val] 5 images (voc)" in printed and "no errors found" in printed

    shutil.copytree(voc_shapes, tmp_path / "VOCdevkit")
    listing = tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    listing.write_text(listing.read_text() + "v_9999\n")
    assert check([str(QUICKSTART), *VOC_DATA, f"data.root={tmp_path / 'VOCdevkit'}", "--split", "val"]) == 1
    printed = capsys.readouterr().out
    assert f"[val] error: {listing} lists v_9999, but {listing.parents[2] / 'Annotations' / 'v_9999.xml'} does not exist" in printed
