"""The synthetic dataset's command line: ``python -m tasks.data.synthetic ROOT [--num-train N ...]``
(see the package docstring)."""

from __future__ import annotations

import argparse
import sys

from backbones.errors import UserError
from tasks.cli import DEBUG_HELP, tool

from . import generate, generate_crops


@tool
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.data.synthetic",
                                     description="Generate the synthetic shapes dataset in COCO layout.")
    parser.add_argument("root")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crops", type=int, default=0, metavar="SIZE",
                        help="write SIZE x SIZE crops of the shapes in class folders (classification) instead")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_val < 1 or args.size < 32:
        raise UserError(f"--num-train and --num-val must be at least 1 and --size at least 32, got "
                        f"{args.num_train}, {args.num_val}, {args.size}")
    try:
        if args.crops:
            generate_crops(args.root, args.num_train, args.num_val, args.size, args.seed, args.crops)
        else:
            generate(args.root, args.num_train, args.num_val, args.size, args.seed)
    except OSError as error:
        raise UserError(f"cannot write the dataset under {args.root}: {error.strerror or error}") from error
    print(f"wrote {args.num_train} + {args.num_val} images to {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
