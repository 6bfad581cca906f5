"""Train a model from a config, on one process or many (accelerate).

    python tools/train.py CONFIG [key=value ...]
    accelerate launch [--multi_gpu --num_processes N] tools/train.py CONFIG [key=value ...]

The run folder (``output_dir``) ends with the resolved ``config.yaml`` (every model default written out),
checkpoints, ``metrics.jsonl`` (training scalars; TensorBoard logs beside it), ``model.safetensors``,
``metrics.json`` (final evaluation), ``coco_results.json`` and ``visualizations/``. ``resume=auto``
continues an interrupted run. SIGTERM or Ctrl-C writes a checkpoint at the current iteration and exits
(143 / 130); the same command with ``resume=auto`` continues exactly. Errors in the input are one line
(exit code 2); ``--debug`` shows their traceback.
"""

from __future__ import annotations

import argparse
import sys

from tasks.cli import DEBUG_HELP, tool
from tasks.config import load_config
from tasks.engine import train
from tasks.registry import get_task, prepare_config


@tool
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_iters=100 resume=auto")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_intermixed_args(argv)
    config = prepare_config(load_config(args.config, args.overrides))  # fails fast, before any data is read

    result = train(get_task(config.task), config)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                        if k.endswith(("/AP", "/AP50", "/AP75", "/mIoU", "/pixel_accuracy", "/top1", "/top5")))
    print(f"finished {result.iterations} iterations in {result.output_dir}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
