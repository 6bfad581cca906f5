"""Build every standard backbone variant and print its stages, channels, strides, parameters and
multiply-adds as a Markdown table (the table in the README is this command's output).

    python tools/backbone_table.py [--config '{"name": "resnet", "depth": 101}']
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from backbones.errors import UserError
from backbones.summary import STANDARD_VARIANTS, markdown_table, summarize
from tasks.cli import DEBUG_HELP, tool


@tool
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="one backbone config as JSON instead of the standard variants")
    parser.add_argument("--size", type=int, default=None, help="input side in pixels (default 224, CIFAR 32)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.config:
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as error:
            example = '{"name": "resnet", "depth": 101}'
            raise UserError(f"--config is not valid JSON ({error}): give e.g. '{example}'") from None
        if not isinstance(config, dict):
            raise UserError(f"--config must be a JSON object of backbone keys, got {args.config}")
        size = args.size or (32 if config.get("family") == "cifar" else 224)
        rows = [summarize(config, name=args.config, input_size=size)]
    else:
        rows = [
            summarize(config, name=label, input_size=args.size or size, num_classes=classes)
            for label, config, size, classes in STANDARD_VARIANTS
        ]
    print(markdown_table(rows))
    print(
        f"\nGMACs: multiply-adds of one image (the paper's 'FLOPs'), counted by torch.utils.flop_counter, "
        f"including a global-pool + fc classifier. Built in {time.perf_counter() - start:.1f} s.",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
