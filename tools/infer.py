"""Run a model on images and draw its predictions.

    python tools/infer.py CONFIG_OR_RUN_DIR [--weights FILE_OR_NAME] --input IMAGE_OR_FOLDER --output DIR [key=value ...]

Detection writes ``DIR/<image stem>.png`` (boxes, class names, scores; a Mask R-CNN's masks filled
translucent in the class colour) and ``DIR/predictions.json``: a list of ``{"file_name", "image_id",
"category_id", "bbox": [x, y, w, h], "score"}`` (with masks also ``"segmentation"``: COCO RLE) in the
original image's pixels (``image_id``: the file's numeric stem, as COCO names files, else its index).
Segmentation writes ``DIR/<image stem>.png`` (the class map as a coloured overlay with a legend) and
``DIR/<image stem>_labels.png`` (8-bit, one channel: the class index of every pixel, at the image's size).

Images are decoded and resized by ``data.num_workers`` DataLoader workers while the model runs, in batches
of ``eval.batch_size`` (both config keys: ``data.num_workers=8 eval.batch_size=4`` on the command line).

``--weights model.onnx`` (a file written by tools/export.py) runs the exported model on ONNX Runtime
instead, through the same resize, post-processing and writing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backbones.errors import UserError
from tasks.cli import DEBUG_HELP, tool
from tasks.config import load_run
from tasks.data.images import ImageFiles, inference_batches, list_images
from tasks.deploy import is_onnx, load_onnx
from tasks.detection.data import label_names
from tasks.detection.drawing import draw_detections
from tasks.evaluation.coco import to_coco_results
from tasks.modeling.compiling import compile_model
from tasks.registry import get_task, prepare_config
from tasks.segmentation.data import segmentation_names
from tasks.segmentation.drawing import draw_segmentation
from tasks.segmentation.task import SegmentationTask


def load_model(config, weights: Path):
    """The config's model with ``weights``; an exported ``.onnx`` file runs on ONNX Runtime instead."""
    if is_onnx(weights):
        return load_onnx(weights, config.task)
    task = get_task(config.task)
    model = task.build_model(config, init_weights=False)  # the checkpoint replaces the initialisation
    task.load_weights(model, weights)
    return model


def compiled_if_asked(model, compile: bool, weights: Path):
    """``model`` through ``torch.compile`` with ``--compile`` (an ONNX file cannot be: it is an error)."""
    if not compile:
        return model
    if is_onnx(weights):
        raise UserError(f"--compile runs a PyTorch model through torch.compile; {weights} runs on ONNX Runtime")
    return compile_model(model)


def image_batches(config, files: list[Path], progress_name: str):
    """The files decoded and resized to the config's test scale by ``data.num_workers`` DataLoader workers,
    in ``eval.batch_size`` batches of ``(index, image, resized)``, with a progress bar."""
    dataset = ImageFiles(files, config.data.min_size_test, config.data.max_size_test)
    return inference_batches(dataset, range(len(files)), config.eval.batch_size, config.data.num_workers,
                             progress=True, desc=progress_name)


def segment(config, run_dir: Path | None, weights: Path, files: list[Path], args: argparse.Namespace, output: Path) -> int:
    """The segmentation branch of ``main``."""
    task = SegmentationTask()
    model = load_model(config, weights)
    model = compiled_if_asked(model.to(args.device).eval(), args.compile, weights)
    names = segmentation_names(config, run_dir, model.num_classes)
    for batch in image_batches(config, files, "segment"):
        for index, image, resized in batch:
            with torch.no_grad():
                classes = task.predict(model, resized, tuple(image.shape[:2])).cpu().numpy().astype(np.uint8)
            path = files[index]
            Image.fromarray(classes, mode="L").save(output / f"{path.stem}_labels.png")
            draw_segmentation(image.numpy(), classes, names).save(output / f"{path.stem}.png")
    print(f"wrote class maps of {len(files)} images to {output}")
    return 0


@tool
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a config file, or a run folder holding config.yaml and model.safetensors")
    parser.add_argument("--weights", help="checkpoint file (this project's, torchvision's or detectron2's .pkl) or a "
                                          "name such as detectron2:COCO-Detection/faster_rcnn_R_50_FPN_3x; "
                                          "default: the run's")
    parser.add_argument("--input", required=True, help="an image file or a folder of images")
    parser.add_argument("--output", required=True, help="folder for the drawings and predictions.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--draw-threshold", type=float, default=0.5, help="smallest score drawn")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile "
                        "(tasks/modeling/compiling.py; the first batches of each image size compile)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_intermixed_args(argv)

    config, run_dir, weights = load_run(args.config, args.weights, args.overrides)
    config = prepare_config(config)
    if config.task not in ("detection", "segmentation"):
        raise UserError(f"tools/infer.py runs detection and segmentation models, not {config.task} ones "
                        "(tools/eval.py evaluates a classifier)")
    files = list_images(args.input)  # before any model is built

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if config.task == "segmentation":
        return segment(config, run_dir, weights, files, args, output)
    model = load_model(config, weights)
    label_to_category, names = label_names(config, run_dir, model.num_classes)
    model = compiled_if_asked(model.to(args.device).eval(), args.compile, weights)

    predictions = []
    for batch in image_batches(config, files, "detect"):
        indices, images, resized = zip(*batch)
        with torch.no_grad():
            detections = model(list(resized), original_sizes=[tuple(image.shape[:2]) for image in images]).cpu()
        for index, image, found in zip(indices, images, detections):
            if getattr(model, "has_masks", False):
                found = model.paste_masks(found, image.shape[:2])
            path = files[index]
            image_id = int(path.stem) if path.stem.isdigit() else index
            for entry in to_coco_results(found, image_id, label_to_category):
                predictions.append({"file_name": path.name, **entry})
            draw_detections(image.numpy(), found, names, args.draw_threshold).save(output / f"{path.stem}.png")
    (output / "predictions.json").write_text(json.dumps(predictions))
    print(f"wrote {len(predictions)} predictions for {len(files)} images to {output / 'predictions.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
