"""Train a model from a config, on one process or many (accelerate).

    python tools/train.py CONFIG [key=value ...]
    accelerate launch [--multi_gpu --num_processes N] tools/train.py CONFIG [key=value ...]

The run folder (``output_dir``) ends with the resolved ``config.yaml``, checkpoints, ``metrics.jsonl``
(training scalars; TensorBoard logs beside it), ``model.safetensors``, ``metrics.json`` (final
evaluation), ``coco_results.json`` and ``visualizations/``. ``resume=auto`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tasks.config import ConfigError, load_config
from tasks.engine import train
from tasks.tasks import get_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_iters=100 resume=auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = train(get_task(config.task), config)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                        if k.endswith(("/AP", "/AP50", "/AP75", "/mIoU", "/pixel_accuracy")))
    print(f"finished {result.iterations} iterations in {result.output_dir}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
