"""Export a trained detector or segmenter for deployment: one ONNX file, or ``torch.export`` programs.

    python tools/export.py CONFIG_OR_RUN_DIR [--weights FILE_OR_NAME] --output model.onnx [--opset N] [--logits]
        [--exporter torchscript|dynamo]
    python tools/export.py CONFIG_OR_RUN_DIR [--weights FILE_OR_NAME] --output model.pt2 --format pt2 [key=value ...]

onnx (the default): the whole model in one graph (normalization, padding, backbone, for a detector the RPN,
the RoI heads and the post-processing with NMS) for one RGB uint8 image ``(3, H, W)`` of any size, at the
test scale the metadata records (``resdet.min_size_test``, ``resdet.max_size_test``: the resize is the
caller's). Outputs ``boxes``, ``scores``, ``labels`` (detection) or ``classes`` (+ ``logits`` with
``--logits``, segmentation); the classes and the task are in its metadata too. Run it with
``tools/infer.py CONFIG --weights model.onnx`` or any ONNX Runtime. Needs ``pip install -e ".[export]"``.
``--exporter dynamo``: torch's ``torch.export``-based ONNX exporter instead of the TorchScript tracer (the
same detections; slower to export).
pt2: ``torch.export`` of the whole segmenter (image -> class map) or detector (image -> boxes, scores,
labels), height and width symbolic; see ``tasks/deploy.py: export_program``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backbones.errors import UserError
from tasks.cli import DEBUG_HELP, tool
from tasks.config import load_run
from tasks.deploy import DEFAULT_OPSET, EXPORTERS, export_metadata, export_onnx, export_program
from tasks.detection.data import label_names
from tasks.registry import get_task, prepare_config
from tasks.segmentation.data import segmentation_names


@tool
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a config file, or a run folder holding config.yaml and model.safetensors")
    parser.add_argument("--weights", help="checkpoint file or name (as tools/infer.py takes); default: the run's")
    parser.add_argument("--output", required=True, help="the file to write (.onnx, or .pt2 with --format pt2)")
    parser.add_argument("--format", choices=["onnx", "pt2"], default="onnx")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (at least 16: RoIAlign's "
                                                                         "half-pixel alignment)")
    parser.add_argument("--logits", action="store_true", help="segmentation: also output the logits (K, H, W)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                        help="ONNX: torchscript (tracing, the default) or dynamo (torch.export's program; slower to export)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_intermixed_args(argv)

    config, run_dir, weights = load_run(args.config, args.weights, args.overrides)
    config = prepare_config(config)
    task = get_task(config.task)
    model = task.build_model(config, init_weights=False)  # the checkpoint replaces the initialisation
    task.load_weights(model, weights)
    model.eval()
    output = Path(args.output)
    if args.format == "pt2":
        export_program(model, config.task, output)
        print(f"wrote {output} (torch.export.load it)")
        return 0
    if args.opset < 16:
        raise UserError(f"--opset {args.opset}: the graph needs opset 16 or later (RoIAlign with half-pixel "
                        "alignment)")
    if config.task == "detection":
        categories, names = label_names(config, run_dir, model.num_classes)  # names by category id for coco_id
        by_id = config.data.label_map == "coco_id"
        classes = {label: names.get(category if by_id else label, f"class {label}") for label, category in categories.items()}
        metadata = export_metadata(config.data.min_size_test, config.data.max_size_test, classes, categories)
    else:
        names = segmentation_names(config, run_dir, model.num_classes)
        metadata = export_metadata(config.data.min_size_test, config.data.max_size_test, dict(enumerate(names)))
    export_onnx(model, config.task, output, metadata, args.opset, args.logits, args.exporter)
    print(f"wrote {output} ({config.task}, opset {args.opset}; run it with tools/infer.py CONFIG --weights {output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
