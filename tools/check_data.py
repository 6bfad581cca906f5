"""Check a config's dataset splits before training: annotations, categories, boxes, image files.

    python tools/check_data.py CONFIG [--split train|val|all] [--decode] [--workers N] [key=value ...]

Prints a report per split: counts, then errors (what would stop a run: malformed entries, unknown ids,
missing image files, and with ``--decode`` files that cannot be decoded or whose size disagrees with the
annotation) and warnings (what a run handles: empty, outside or border-crossing boxes, images without
annotations), each with a few examples. ``--decode`` decodes every image on all cores with a progress
bar. Exit code 1 when errors are found, 0 otherwise (2: the config itself is wrong).

Other ``data.format`` values (``voc``, ``mask_folder``) are checked by the reader the run uses: every XML
or split entry and file is read when the split is built, and ``--decode`` reads every item (its image, and
its label PNG with the value rules), each problem reported with its file.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from backbones.errors import UserError
from tasks.cli import DEBUG_HELP, tool
from tasks.config import Config, load_config, resolve_path
from tasks.data.check import check_split
from tasks.data.synthetic import prepare_data_root
from tasks.registry import get_task, prepare_config


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
    splits = ["train", "val"] if args.split == "all" else [args.split]
    if config.data.format != "coco":
        return _check_with_the_reader(config, splits, args.decode)
    root = prepare_data_root(config)
    failed = False
    for split in splits:
        paths = getattr(config.data, split)
        report = check_split(resolve_path(root, paths.annotations), resolve_path(root, paths.images), args.decode,
                             args.workers)
        print(f"[{split}] " + "\n".join(report.lines()))
        failed |= bool(report.errors)
    print("errors found" if failed else "no errors found")
    return 1 if failed else 0


def _check_with_the_reader(config: Config, splits: list[str], decode: bool) -> int:
    """A split of another format, built (and with ``decode`` read item by item) by the task's own reader."""
    config = prepare_config(config)
    task = get_task(config.task)
    failed = False
    for split in splits:
        try:
            dataset = task.train_dataset(config) if split == "train" else task.val_dataset(config)
        except UserError as error:
            print(f"[{split}] error: {error}")
            failed = True
            continue
        problems = []
        if decode:
            for index in tqdm(range(len(dataset)), desc=f"decode {split}", unit="image"):
                try:
                    dataset[index]
                except UserError as error:
                    problems.append(str(error))
        print(f"[{split}] {len(dataset)} images ({config.data.format})" + (f", {len(problems)} with errors:" if problems else ""))
        for problem in problems[:10]:
            print(f"  error: {problem}")
        if len(problems) > 10:
            print(f"  ... and {len(problems) - 10} more")
        failed |= bool(problems)
    print("errors found" if failed else "no errors found")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
