"""The segmentation task for the training engine: datasets, a confusion matrix reduced over processes,
drawings of validation predictions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from backbones.errors import UserError
from tasks.config import Config, resolve_path
from tasks.data.images import inference_batches
from tasks.data.synthetic import prepare_data_root
from tasks.evaluation.miou import confusion_matrix, segmentation_metrics
from tasks.evaluation.reports import plot_per_class_iou

from .checkpoint import load_segmenter_weights
from .data import CocoSegmentation, SemanticSegmentationSplit, segmentation_transform
from .drawing import draw_segmentation
from .mask_folder import MaskFolderSegmentation, check_mask_folder_config
from .model import build_segmenter, resolve_segmenter_config

logger = logging.getLogger(__name__)


class SegmentationTask:
    """FCN on COCO (or the synthetic shapes) semantic masks (``data.format: coco``), or on image and label-PNG
    folders (``data.format: mask_folder``: VOC, Cityscapes, ADE20K, ...; tasks/segmentation/mask_folder.py)."""

    data_formats = ("coco", "mask_folder")  # the data.format values it reads

    @staticmethod
    def resolve_model(model: dict[str, Any]) -> dict[str, Any]:
        return resolve_segmenter_config(model)

    def build_model(self, config: Config, init_weights: bool = True) -> nn.Module:
        if config.data.format == "mask_folder":  # its class names and value rules against model.num_classes
            check_mask_folder_config(config)
        return build_segmenter(config.model, init_weights=init_weights)

    @staticmethod
    def load_weights(model: nn.Module, path: str | Path) -> str:
        return load_segmenter_weights(model, path)

    def _dataset(self, config: Config, split: str, train: bool) -> SemanticSegmentationSplit:
        data, paths = config.data, getattr(config.data, split)
        transform = segmentation_transform(
            train,
            data.min_size_train if train else [data.min_size_test],
            data.max_size_train if train else data.max_size_test,
            data.crop_size,
            data.flip_prob,
        )
        if data.format == "mask_folder":
            return MaskFolderSegmentation.from_config(config, split, transform, train=train)
        root = prepare_data_root(config)
        dataset = CocoSegmentation(resolve_path(root, paths.annotations), resolve_path(root, paths.images),
                                   data.class_set, transform, train=train, min_pixels=data.min_pixels)
        num_classes = config.model.get("num_classes", 21)
        if dataset.num_classes != num_classes:
            raise UserError(f"data.class_set={data.class_set} gives {dataset.num_classes} classes with background "
                             f"but model.num_classes is {num_classes}")
        return dataset

    def train_dataset(self, config: Config) -> SemanticSegmentationSplit:
        return self._dataset(config, "train", train=True)

    def val_dataset(self, config: Config) -> SemanticSegmentationSplit:
        return self._dataset(config, "val", train=False)

    @staticmethod
    def collate(batch: list) -> tuple[list, list]:
        images, targets = zip(*batch)
        return list(images), list(targets)

    @staticmethod
    def loss_inputs(batch: tuple[list, list]) -> tuple[list, list]:
        images, targets = batch
        return images, [{"mask": t["mask"], "image_id": t["image_id"]} for t in targets]

    def metadata(self, dataset: SemanticSegmentationSplit) -> dict[str, Any]:
        return {"categories": [{"id": i, "name": n} for i, n in enumerate(dataset.class_names)]}

    @torch.no_grad()
    def predict(self, model: nn.Module, image: torch.Tensor, orig_size: tuple[int, int]) -> torch.Tensor:
        """(H, W) class map at ``orig_size``: logits upsampled bilinearly to it, then argmax."""
        (logits,) = model([image])
        logits = F.interpolate(logits[None], size=orig_size, mode="bilinear", align_corners=False)[0]
        return logits.argmax(0)

    def evaluate(self, model: nn.Module, dataset: SemanticSegmentationSplit, accelerator: Accelerator, output_dir: Path,
                 config: Config) -> dict[str, float]:
        """Each process accumulates a confusion matrix over its shard at original resolution (images read by
        ``data.num_workers`` workers); the matrices are summed over processes, then reduced to mIoU, pixel
        accuracy and per-class IoU."""
        was_training = model.training
        model.eval()
        confusion = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64, device=accelerator.device)
        shard = range(accelerator.process_index, len(dataset), accelerator.num_processes)
        for items in inference_batches(dataset, shard, 1, config.data.num_workers, accelerator.is_main_process):
            ((image, target),) = items
            prediction = self.predict(model, image, target["orig_size"])
            confusion += confusion_matrix(prediction, target["mask"].to(prediction.device), dataset.num_classes)
        model.train(was_training)
        if accelerator.num_processes > 1:
            confusion = accelerator.reduce(confusion, reduction="sum")
        metrics = segmentation_metrics(confusion.cpu(), dataset.class_names)
        if accelerator.is_main_process:
            print(f"mIoU {metrics['mIoU']:.4f}, pixel accuracy {metrics['pixel_accuracy']:.4f} over {len(dataset)} images")
            try:
                plot_per_class_iou(metrics, output_dir / "per_class_iou.png")
                print(f"wrote {output_dir / 'per_class_iou.png'}")
            except UserError as missing:  # matplotlib is optional
                logger.info("no per_class_iou.png: %s", missing)
        return {f"segm/{k}": v for k, v in metrics.items()}

    def visualize(self, model: nn.Module, dataset: SemanticSegmentationSplit, output_dir: Path, config: Config) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        model.eval()
        for index in range(min(config.eval.num_visualize, len(dataset))):
            image, _ = dataset[index]
            classes = self.predict(model, image, tuple(image.shape[-2:])).cpu().numpy().astype(np.uint8)
            draw_segmentation(image.permute(1, 2, 0).numpy(), classes, dataset.class_names).save(
                output_dir / f"{dataset.item_name(index)}.png")
