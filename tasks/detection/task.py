"""The detection task for the training engine (Faster R-CNN, and Mask R-CNN with ``model.masks``): datasets
from the config (COCO, or PASCAL VOC's folders), sharded evaluation (COCO's boxes and masks, or the VOC
devkit's metric), drawings of validation predictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn

from backbones.errors import UserError
from tasks.config import Config, ConfigError, resolve_path
from tasks.data.images import inference_batches
from tasks.data.synthetic import prepare_data_root
from tasks.data.voc import VOC_CLASSES, default_rule
from tasks.evaluation.coco import array_to_results, coco_report, results_to_array, to_coco_results
from tasks.evaluation.reports import write_coco_report
from tasks.evaluation.voc import evaluate_voc, format_voc_report, voc_detections, voc_report_json

from .checkpoint import load_detector_weights
from .data import CocoDetection, DetectionItems, VocDetection, collate, detection_transform
from .drawing import draw_detections, side_by_side
from .model import build_detector, resolve_detector_config


class DetectionTask:
    """Faster R-CNN, or Mask R-CNN (``model.masks: true``: instance masks in the data, the losses, the
    predictions and the evaluation), on a COCO-layout dataset (``data.format: coco``) or PASCAL VOC's
    VOCdevkit folders (``data.format: voc``: ``data.train.sets`` / ``data.val.sets``, boxes only)."""

    data_formats = ("coco", "voc")  # the data.format values it reads

    @staticmethod
    def resolve_model(model: dict[str, Any]) -> dict[str, Any]:
        return resolve_detector_config(model)

    def build_model(self, config: Config, init_weights: bool = True) -> nn.Module:
        """The detector; ``init_weights`` starts it from ``model.weights`` (a file or a name such as
        ``detectron2:COCO-Detection/faster_rcnn_R_50_FPN_3x``: everything loads strictly except the class and
        box predictors where the class count differs, for fine-tuning) or, without one, from the backbone's."""
        if config.data.format == "voc":
            check_voc_config(config)
        model = build_detector(config.model, init_weights=init_weights)
        model.size_buckets = [tuple(bucket) for bucket in config.data.size_buckets]
        weights = config.model.get("weights")
        if init_weights and weights:
            load_detector_weights(model, weights, new_classes=True)
        return model

    @staticmethod
    def load_weights(model: nn.Module, path: str | Path) -> str:
        return load_detector_weights(model, path)

    def _dataset(self, config: Config, split: str, train: bool) -> DetectionItems:
        paths = getattr(config.data, split)
        data = config.data
        transform = detection_transform(
            train,
            data.min_size_train if train else [data.min_size_test],
            data.max_size_train if train else data.max_size_test,
            data.flip_prob,
        )
        if data.format == "voc":
            return VocDetection(voc_sets(config, split), transform, train=train)
        root = prepare_data_root(config)
        dataset = CocoDetection(resolve_path(root, paths.annotations), resolve_path(root, paths.images), transform,
                                train=train, label_map=data.label_map, masks=bool(config.model.get("masks")))
        num_classes = config.model.get("num_classes", 80)
        # training may see a subset of the model's classes; evaluation maps every label back to a category
        exact = not train and data.label_map == "contiguous"
        if dataset.num_classes > num_classes or (exact and dataset.num_classes != num_classes):
            raise UserError(
                f"the {split} annotations ({dataset.annotation_file}) have {dataset.num_classes} labels "
                f"(data.label_map={data.label_map}) but model.num_classes is {num_classes}: set model.num_classes "
                f"to match, or use the annotation file the model was trained with"
            )
        return dataset

    def train_dataset(self, config: Config) -> DetectionItems:
        return self._dataset(config, "train", train=True)

    def val_dataset(self, config: Config) -> DetectionItems:
        return self._dataset(config, "val", train=False)

    @staticmethod
    def collate(batch: list) -> tuple[list, list]:
        return collate(batch)

    @staticmethod
    def loss_inputs(batch: tuple[list, list]) -> tuple[list, list]:
        images, targets = batch
        keys = ("boxes", "labels", "iscrowd", "image_id", "masks")
        return images, [{k: t[k] for k in keys if k in t} for t in targets]

    def metadata(self, dataset: DetectionItems) -> dict[str, Any]:
        return {"categories": [{"id": c, "name": dataset.category_names[c]} for c in dataset.category_ids]}

    @torch.no_grad()
    def predict(self, model: nn.Module, dataset: DetectionItems, indices: list[int], batch_size: int = 1,
                num_workers: int = 0, progress: bool = False) -> list[dict]:
        """COCO results for the images ``indices`` of ``dataset`` (read by ``num_workers`` workers); with masks,
        each pasted at the image's original size and given as RLE."""
        results = []
        for items in inference_batches(dataset, indices, batch_size, num_workers, progress):
            images = [image for image, _ in items]
            detections = model(images, original_sizes=[t["orig_size"] for _, t in items]).cpu()  # one copy
            for (_, target), det in zip(items, detections):
                if model.has_masks:
                    det = model.paste_masks(det, target["orig_size"])
                results.extend(to_coco_results(det, target["image_id"], dataset.label_to_category))
        return results

    def evaluate(self, model: nn.Module, dataset: DetectionItems, accelerator: Accelerator, output_dir: Path,
                 config: Config) -> dict[str, float]:
        """Each process predicts its shard (every ``num_processes``-th image: disjoint, nothing padded);
        the main process gathers all results, writes them (``coco_results.json``) and runs the COCO
        evaluation (``eval.backend``): the summary is returned, the per-category AP printed and written
        with the precision-recall curves (``write_coco_report``); with masks the same for ``segm`` (its curves
        in ``pr_curves_segm.png``). On VOC, the devkit's metric instead (``evaluate_voc_results``). Images are
        read by ``data.num_workers`` workers, ``eval.batch_size`` at a time."""
        was_training = model.training
        model.eval()
        shard = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
        results = self.predict(model, dataset, shard, config.eval.batch_size, config.data.num_workers,
                               progress=accelerator.is_main_process)
        model.train(was_training)
        masks = model.has_masks
        # compact arrays, not lists of dicts (and the RLEs, which are strings already)
        gathered = gather_object([(results_to_array(results), [r["segmentation"] for r in results] if masks else None)])
        metrics: dict[str, float] = {}
        if accelerator.is_main_process:
            # in the images' order, as one process has them: the shards interleave, and the VOC devkit's ranking
            # of tied scores depends on the order of the results
            array = np.concatenate([array for array, _ in gathered])
            order = np.argsort(array[:, 0], kind="stable")
            rles = [rle for _, rles in gathered for rle in rles] if masks else None
            all_results = array_to_results(array[order], [rles[i] for i in order] if masks else None)
            if isinstance(dataset, VocDetection):
                metrics = evaluate_voc_results(dataset, all_results, output_dir)
            else:
                (output_dir / "coco_results.json").write_text(json.dumps(all_results))
                for iou_type in ("bbox", "segm") if masks else ("bbox",):
                    report = coco_report(dataset.coco, all_results, iou_type, config.eval.backend)
                    metrics.update({f"{iou_type}/{k}": v for k, v in report.summary.items()})
                    write_coco_report(report, iou_type, output_dir,
                                      "pr_curves.png" if iou_type == "bbox" else "pr_curves_segm.png")
        return broadcast_metrics(metrics, accelerator)

    def visualize(self, model: nn.Module, dataset: DetectionItems, output_dir: Path, config: Config) -> None:
        """The first ``eval.num_visualize`` validation images: ground truth (left) beside the predictions of
        score >= ``eval.visualize_score_thresh`` (right), one PNG each."""
        output_dir.mkdir(parents=True, exist_ok=True)
        model.eval()
        names = {label: dataset.category_names[c] for label, c in dataset.label_to_category.items()}
        with torch.no_grad():
            for index in range(min(config.eval.num_visualize, len(dataset))):
                image, target = dataset[index]
                (det,) = model([image]).cpu()
                if model.has_masks:
                    det = model.paste_masks(det, image.shape[1:])
                pixels = image.permute(1, 2, 0).numpy()
                truth = draw_detections(pixels, {k: target[k] for k in ("boxes", "labels", "masks") if k in target}, names)
                predicted = draw_detections(pixels, det, names,
                                            config.eval.visualize_score_thresh)
                side_by_side(truth, predicted).save(output_dir / f"{target['image_id']}.png")


def check_voc_config(config: Config) -> None:
    """A detector on VOC: 20 classes, boxes only, both splits' sets given as pairs."""
    if config.model.get("num_classes", 80) != len(VOC_CLASSES):
        raise ConfigError(f"data.format voc has {len(VOC_CLASSES)} classes but model.num_classes is "
                          f"{config.model.get('num_classes', 80)}: set model.num_classes={len(VOC_CLASSES)}")
    if config.model.get("masks"):
        raise ConfigError("data.format voc has boxes only: model.masks must be false (VOC's instance masks are "
                          "not read)")
    for split in ("train", "val"):
        voc_sets(config, split)


def voc_sets(config: Config, split: str) -> list[tuple[Path, str]]:
    """``data.<split>.sets`` as ``(year folder, split)`` pairs under ``data.root``, checked to be pairs."""
    sets = getattr(config.data, split).sets
    if not sets or any(len(pair) != 2 for pair in sets):
        raise ConfigError(f"data.{split}.sets must list [year folder, split] pairs of VOCdevkit folders under "
                          f"data.root for data.format voc, e.g. [[VOC2007, trainval], [VOC2012, trainval]]; got {sets}")
    return [(resolve_path(config.data.root, folder), name) for folder, name in sets]


def evaluate_voc_results(dataset: VocDetection, results: list[dict[str, Any]], output_dir: Path) -> dict[str, float]:
    """The devkit's metric of ``results`` (COCO results of ``dataset``'s items) on ``dataset``, with the rule of
    its (first) year: the results written as ``voc_results.json`` (``image_id`` the file stem: what
    ``tools/eval.py --voc`` reads), the per-class table printed and written to ``voc_report.json``; returns
    ``bbox/mAP`` (IoU 0.5) and the COCO-style ``bbox/AP``, ``bbox/AP50``, ``bbox/AP75``."""
    for result in results:
        result["image_id"] = str(dataset.image_names[result["image_id"]])
    (output_dir / "voc_results.json").write_text(json.dumps(results))
    truths = dataset.truths()
    rule = default_rule(dataset.sets[0][0])
    report = evaluate_voc(truths, voc_detections(results, list(truths), len(VOC_CLASSES), "predictions"),
                          VOC_CLASSES, rule)
    print(format_voc_report(report))
    (output_dir / "voc_report.json").write_text(json.dumps(voc_report_json(report), indent=1))
    return {f"bbox/{k}": v for k, v in report.summary.items()}


def broadcast_metrics(metrics: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """The main process's metrics, on every process."""
    if accelerator.num_processes == 1:
        return metrics
    box = [metrics]
    broadcast_object_list(box, from_process=0)
    return box[0]
