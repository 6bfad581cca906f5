"""The classification task for the training engine: image-folder or CIFAR datasets, top-1/top-5 accuracy
over all processes, a picture of predictions."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from backbones.errors import UserError
from tasks.config import Config
from tasks.data.images import inference_batches
from tasks.data.synthetic import CATEGORIES, ensure_crops
from tasks.modeling.batching import batch_images

from .checkpoint import load_classifier_weights
from .data import (
    CIFAR_FORMATS,
    CifarDataset,
    ClassificationDataset,
    ImageFolderDataset,
    classification_transform,
    collate,
    read_cifar,
    scan_image_folder,
)
from .drawing import prediction_grid
from .model import ImageClassifier, build_classifier, resolve_classifier_config

logger = logging.getLogger(__name__)

TOP_K = (1, 5)


@lru_cache(maxsize=4)
def _cifar_split(root: str, name: str, split: str, download: bool):
    """``read_cifar``, read once per process (the model's per-pixel mean and the datasets share it)."""
    return read_cifar(root, name, split, download)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = TOP_K) -> torch.Tensor:
    """For each k of ``ks``: how many of the ``(N, K)`` ``logits`` rank the true label among their k highest
    (k capped at K). Returns ``(len(ks),)`` counts."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k_max)
    hits = ranked == labels[:, None]
    return torch.stack([hits[:, :k].any(1).sum() for k in ks])


class ClassificationTask:
    """A backbone + global average pooling + fc on class folders or CIFAR-10/100."""

    data_formats = ("folder", *CIFAR_FORMATS)  # the data.format values it reads

    @staticmethod
    def resolve_model(model: dict[str, Any]) -> dict[str, Any]:
        return resolve_classifier_config(model)

    def build_model(self, config: Config, init_weights: bool = True) -> nn.Module:
        """The classifier; ``model.num_classes: 0`` takes the data's class count (on the meta device, where
        ``prepare_config`` checks a config without reading data, one class stands in). When the model subtracts a
        per-pixel mean (``model.mean_image_size``), it is computed from the training split here (not when
        a checkpoint is loaded next: ``init_weights=False``). ``init_weights`` starts it from ``model.weights``
        (this project's run or a torchvision ImageNet classifier: everything loads strictly except the ``fc``
        layer when its shape differs, a new set of classes) or, without one, from the backbone's."""
        num_classes = config.model.get("num_classes")
        if not num_classes:  # from the data; a config check (built on the meta device) reads no data
            num_classes = 1 if torch.empty(()).is_meta else self.data_num_classes(config)
        model = build_classifier(config.model, num_classes, init_weights=init_weights)
        weights = config.model.get("weights")
        if init_weights and weights:  # a whole trained classifier; a new fc where the classes differ
            load_classifier_weights(model, weights, new_classes=True)
        if init_weights and model.mean_image is not None and not model.pixel_mean.is_meta:
            dataset = self.train_dataset(config)
            if not hasattr(dataset, "mean_image"):
                raise UserError("model.mean_image_size needs data in memory (data.format cifar10/cifar100); "
                                "for image folders set it to 0 and use model.pixel_mean")
            model.set_mean_image(_normalize(model, dataset.mean_image()))
            logger.info("per-pixel mean of %d training images subtracted by the model", len(dataset))
        return model

    @staticmethod
    def load_weights(model: nn.Module, path: str | Path) -> str:
        return load_classifier_weights(model, path)

    @staticmethod
    def data_num_classes(config: Config) -> int:
        """The class count of the configured data, without reading images (folder names only); ``data.format``
        is one of ``data_formats`` (``prepare_config`` checks it)."""
        data = config.data
        if data.format in CIFAR_FORMATS:
            return 10 if data.format == "cifar10" else 100
        if data.synthetic is not None:
            return len(CATEGORIES)
        classes, _ = scan_image_folder(Path(data.root) / "train")
        return len(classes)

    def _dataset(self, config: Config, train: bool) -> ClassificationDataset:
        data = config.data
        if data.augment != "none" and data.crop_size < 1:
            raise UserError(f"data.crop_size must be the network's input side (32 for CIFAR, 224 for ImageNet-style "
                            f"data) with data.augment {data.augment}, got {data.crop_size}")
        transform = classification_transform(train, data.augment, data.crop_size, data.min_size_test, data.pad,
                                              data.flip_prob)
        image_size = data.crop_size if data.augment == "cifar" else None
        if data.format in CIFAR_FORMATS:
            held_out = data.val_split > 0
            split = "train" if train or held_out else "test"
            images, labels, names = _cifar_split(str(data.root), data.format, split, data.download)
            indices = None
            if held_out:
                if data.val_split >= len(images):
                    raise UserError(f"data.val_split={data.val_split} holds out all {len(images)} training images")
                cut = len(images) - data.val_split
                indices = np.arange(cut) if train else np.arange(cut, len(images))
            if image_size and images.shape[1] != image_size:
                raise UserError(f"data.crop_size is {image_size}, CIFAR images are {images.shape[1]} pixels")
            source = f"{data.format} {split}"
            return CifarDataset(images, labels, names, indices, transform, source)
        root = Path(data.root)
        if data.synthetic is not None:
            s = data.synthetic
            ensure_crops(root, s.num_train, s.num_val, s.size, s.seed, data.crop_size or 32)
        classes = None if train else scan_image_folder(root / "train")[0]
        if data.val_split:
            raise UserError("data.val_split applies to CIFAR; an image folder's validation split is its val/ folder")
        return ImageFolderDataset(root / ("train" if train else "val"), classes, transform, image_size)

    def train_dataset(self, config: Config) -> ClassificationDataset:
        return self._dataset(config, train=True)

    def val_dataset(self, config: Config) -> ClassificationDataset:
        return self._dataset(config, train=False)

    @staticmethod
    def collate(batch: list) -> tuple[torch.Tensor, list]:
        return collate(batch)

    @staticmethod
    def loss_inputs(batch: tuple[torch.Tensor, list]) -> tuple[torch.Tensor, list]:
        return batch

    def metadata(self, dataset: ClassificationDataset) -> dict[str, Any]:
        return {"categories": [{"id": i, "name": n} for i, n in enumerate(dataset.class_names)]}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: ClassificationDataset, accelerator: Accelerator, output_dir: Path,
                 config: Config) -> dict[str, float]:
        """Each process classifies its shard (every ``num_processes``-th image: disjoint, none padded or
        repeated), ``eval.batch_size`` images at a time read by ``data.num_workers`` workers; the counts of
        top-1 and top-5 hits and of images are summed over the processes. Returns accuracies and errors
        (``cls/top1``, ``cls/top1_error``, ``cls/top5``, ``cls/top5_error``; top-5 only with more than 5
        classes)."""
        was_training = model.training
        model.eval()
        counts = torch.zeros(len(TOP_K) + 1, dtype=torch.int64, device=accelerator.device)  # hits per k, images
        shard = range(accelerator.process_index, len(dataset), accelerator.num_processes)
        for items in inference_batches(dataset, shard, config.eval.batch_size, config.data.num_workers,
                                       accelerator.is_main_process):
            images, targets = collate(items)
            labels = torch.tensor([t["label"] for t in targets], device=accelerator.device)
            counts[:-1] += topk_correct(model(images).to(accelerator.device), labels)
            counts[-1] += len(targets)
        model.train(was_training)
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, reduction="sum")
        hits, total = counts[:-1].tolist(), int(counts[-1])
        if total != len(dataset):
            raise RuntimeError(f"evaluated {total} images of {len(dataset)}")  # a bug: shards must cover the set once
        metrics: dict[str, float] = {}
        for k, hit in zip(TOP_K, hits):
            if k == 1 or dataset.num_classes > k:
                metrics[f"cls/top{k}"] = hit / max(total, 1)
                metrics[f"cls/top{k}_error"] = 1 - hit / max(total, 1)
        if accelerator.is_main_process:
            print("accuracy over {} images: {}".format(
                total, ", ".join(f"top-{k} {100 * metrics[f'cls/top{k}']:.2f}%" for k in TOP_K if f"cls/top{k}" in metrics)))
        return metrics

    def visualize(self, model: nn.Module, dataset: ClassificationDataset, output_dir: Path, config: Config) -> None:
        """The first ``eval.num_visualize`` validation images in one PNG, each captioned with its true class
        and the predicted one (with its probability)."""
        count = min(config.eval.num_visualize, len(dataset))
        if not count:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        model.eval()
        items = [dataset[i] for i in range(count)]
        images, targets = collate(items)
        with torch.no_grad():
            probabilities = model(images).softmax(1).cpu()
        confidence, predicted = probabilities.max(1)
        captions = [(dataset.class_names[t["label"]], dataset.class_names[p], float(c))
                    for t, p, c in zip(targets, predicted.tolist(), confidence)]
        prediction_grid([image.permute(1, 2, 0).numpy() for image in images], captions).save(output_dir / "predictions.png")


def _normalize(model: ImageClassifier, image: torch.Tensor) -> torch.Tensor:
    """``image`` (3, H, W) in 0..1 as the model normalizes its inputs (before the per-pixel mean): the mean
    of normalized images is the normalized mean image (the normalization is affine)."""
    batch, _ = batch_images(image[None].to(model.pixel_mean.device), model.pixel_mean, model.pixel_std, 0,
                            input_format=model.input_format, input_range=model.input_range)
    return batch[0]
