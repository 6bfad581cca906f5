"""Check a config's dataset splits before training: annotations, categories, boxes, image files.

    python tools/check_data.py CONFIG [--split train|val|all] [--decode] [--workers N] [key=value ...]

Prints a report per split: counts, then errors (what would stop a run: malformed entries, unknown ids,
missing image files, and with ``--decode`` files that cannot be decoded or whose size disagrees with the
annotation) and warnings (what a run handles: empty, outside or border-crossing boxes, images without
annotations), each with a few examples. ``--decode`` decodes every image on all cores with a progress
bar. Exit code 1 when errors are found, 0 otherwise (2: the config itself is wrong).
"""

from __future__ import annotations

import argparse
import sys

from tasks.cli import DEBUG_HELP, tool
from tasks.config import load_config, resolve_path
from tasks.data.check import check_split
from tasks.data.synthetic import prepare_data_root


@tool
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config file (its data section names the splits)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    parser.add_argument("--split", choices=["train", "val", "all"], default="all")
    parser.add_argument("--decode", action="store_true", help="decode every image (slow on big datasets)")
    parser.add_argument("--workers", type=int, help="processes decoding images (default: every core)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_intermixed_args(argv)
    config = load_config(args.config, args.overrides)
    root = prepare_data_root(config)
    failed = False
    for split in (["train", "val"] if args.split == "all" else [args.split]):
        paths = getattr(config.data, split)
        report = check_split(resolve_path(root, paths.annotations), resolve_path(root, paths.images), args.decode,
                             args.workers)
        print(f"[{split}] " + "\n".join(report.lines()))
        failed |= bool(report.errors)
    print("errors found" if failed else "no errors found")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
