"""Evaluate on COCO with pycocotools.

    python tools/eval.py RUN_DIR [key=value ...]                 the run's config and model.safetensors
    python tools/eval.py CONFIG --weights FILE [key=value ...]   any config and checkpoint
    python tools/eval.py --annotations ANN.json --results RES.json --iou-type bbox|segm [--output metrics.json]
    python tools/eval.py --voc VOCdevkit/VOC2007 --split test --results dets.json [--metric 11point|area] [--output F]

The first two run inference on the config's validation split (sharded over processes under
``accelerate launch``), print pycocotools' summary and write ``metrics.json`` and ``coco_results.json``
into ``--output-dir`` (default: the run folder, or the config's output_dir). The third evaluates an
existing results file. The fourth evaluates a results file (COCO's results format, ``image_id`` the file
stem, ``category_id`` 1..20 in VOC order) against a VOC split with the devkit's metric
(``tasks/evaluation/voc.py``): per-class AP and mAP at IoU 0.5, and the COCO-style AP, AP50, AP75; the
rule is VOC2007's 11-point one for a folder named ``*2007``, the area rule otherwise, unless ``--metric``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tasks.cli import DEBUG_HELP, tool
from tasks.config import load_run
from tasks.data.coco import load_coco
from tasks.data.voc import VOC_CLASSES, default_rule, read_voc_split
from tasks.engine import make_accelerator, write_json
from tasks.evaluation.coco import BACKENDS, coco_report, load_results
from tasks.evaluation.reports import write_coco_report
from tasks.evaluation.voc import RULES, evaluate_voc, format_voc_report, load_voc_detections, voc_report_json
from tasks.modeling.compiling import compile_model
from tasks.registry import get_task, prepare_config


@tool
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="a run folder or a config file")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    parser.add_argument("--weights", help="checkpoint file (with a config file): this project's, torchvision's or "
                                          "detectron2's .pkl, or a name such as "
                                          "detectron2:COCO-Detection/faster_rcnn_R_50_FPN_3x")
    parser.add_argument("--output-dir", help="where metrics.json and coco_results.json go")
    parser.add_argument("--annotations", help="COCO annotation file (with --results)")
    parser.add_argument("--results", help="COCO results file to evaluate")
    parser.add_argument("--iou-type", default="bbox", choices=["bbox", "segm"])
    parser.add_argument("--voc", help="a VOCdevkit year folder (e.g. VOCdevkit/VOC2007) to evaluate --results on")
    parser.add_argument("--split", default="test", help="with --voc: the ImageSets/Main split (default test)")
    parser.add_argument("--metric", choices=RULES, help="with --voc: the AP rule (default: 11point for VOC2007, "
                                                        "else area)")
    parser.add_argument("--output", help="metrics.json to write (with --results)")
    parser.add_argument("--backend", choices=BACKENDS, help="COCO evaluation: pycocotools (the reference, default) or "
                                                            "faster_coco_eval (same numbers, faster); overrides eval.backend")
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile "
                        "(tasks/modeling/compiling.py; the first batches of each image size compile)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_intermixed_args(argv)

    if args.voc:
        if not args.results:
            parser.error("--voc goes with --results")
        return _evaluate_voc(args)
    if args.results or args.annotations:
        if not (args.results and args.annotations):
            parser.error("--results and --annotations go together")
        report = coco_report(load_coco(args.annotations), load_results(args.results), args.iou_type,
                             args.backend or "pycocotools")
        metrics = {f"{args.iou_type}/{k}": v for k, v in report.summary.items()}
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(metrics, indent=2))
            write_coco_report(report, args.iou_type, Path(args.output).parent)
        else:
            write_coco_report(report, args.iou_type, None)
        return 0
    if not args.source:
        parser.error("give a run folder, a config file with --weights, or --annotations with --results")

    overrides = [*args.overrides, *([f"eval.backend={args.backend}"] if args.backend else [])]
    config, run_dir, weights = load_run(args.source, args.weights, overrides)
    config = prepare_config(config)
    output_dir = Path(args.output_dir or run_dir or config.output_dir)

    accelerator = make_accelerator()
    task = get_task(config.task)
    model = task.build_model(config, init_weights=False)  # the checkpoint replaces the initialisation
    task.load_weights(model, weights)
    model.to(accelerator.device)
    if args.compile:  # the weights were loaded into the plain model; the compiled one runs it
        model = compile_model(model)
    dataset = task.val_dataset(config)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    metrics = task.evaluate(model, dataset, accelerator, output_dir, config)
    if accelerator.is_main_process:
        write_json(output_dir / "metrics.json", metrics)
        print(json.dumps(metrics))
    accelerator.wait_for_everyone()  # no process tears the process group down while another still uses it
    accelerator.end_training()
    return 0


def _evaluate_voc(args: argparse.Namespace) -> int:
    images = read_voc_split(args.voc, args.split)
    truths = {image.image_id: image.truth for image in images}
    detections = load_voc_detections(args.results, list(truths), len(VOC_CLASSES))
    rule = args.metric or default_rule(args.voc)
    report = evaluate_voc(truths, detections, VOC_CLASSES, rule)
    print(format_voc_report(report))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.output), voc_report_json(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
