"""Compare backbones under one protocol: train and evaluate each, then one table and one picture.

    python tools/compare.py PROTOCOL_CONFIG --backbones NAME=WEIGHTS [NAME=WEIGHTS ...] [--seeds N]
                            [--output DIR] [--launch "ACCELERATE LAUNCH OPTIONS"] [key=value ...]
    python tools/compare.py RUN_DIR [RUN_DIR ...] [--output DIR]

The first form runs ``tools/train.py PROTOCOL_CONFIG model.backbone.weights=WEIGHTS seed=S`` for every
backbone and seed, one after the other, each in its own folder ``DIR/NAME/seed_S`` (default DIR:
``runs/compare/<config name>``), through ``accelerate launch`` as it is configured (its default config file,
or ``--launch`` options such as ``"--multi_gpu --num_processes 8"``); a run whose folder has its final
``metrics.json`` is skipped, and an unfinished one resumes from its checkpoint, so the same command continues
a comparison that was stopped. WEIGHTS is anything ``model.backbone.weights`` takes (a file in any of the
layouts load_pretrained reads, ``torchvision``, ``timm:<name>``). Run this tool itself with plain ``python``.

The second form collects finished runs: the folders of a comparison (``DIR``, holding ``NAME/seed_S``) or
run folders themselves (each one backbone, named after its folder). Both forms end by writing, into
``--output`` (default: DIR, or the first RUN_DIR), ``comparison.md`` and ``comparison.csv`` (each backbone's
final metrics, mean ± std over the seeds), ``comparison.png`` (a bar chart per metric) and ``curves.png``
(every run's training curves overlaid, as tools/plot.py draws them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from backbones.errors import UserError
from tasks.cli import DEBUG_HELP, tool
from tasks.config import load_config
from tasks.evaluation.reports import compare_runs, plot_runs

ROOT = Path(__file__).resolve().parents[1]


@tool
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="a protocol config (with --backbones) or finished run folders; "
                                                   "then key=value overrides for the protocol")
    parser.add_argument("--backbones", nargs="+", metavar="NAME=WEIGHTS", help="the backbones to train and compare")
    parser.add_argument("--seeds", type=int, default=1, help="runs per backbone, seeds config seed + 0..N-1")
    parser.add_argument("--output", help="the comparison's folder")
    parser.add_argument("--launch", default="", help="options for accelerate launch, e.g. '--multi_gpu --num_processes 8'")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_intermixed_args(argv)
    if args.backbones:
        config_file, overrides = args.sources[0], args.sources[1:]
        output = Path(args.output or Path("runs") / "compare" / Path(config_file).stem)
        run_all(config_file, overrides, _backbones(args.backbones), args.seeds, output, shlex.split(args.launch))
        groups, runs = collect([output])
    else:
        groups, runs = collect([Path(s) for s in args.sources])
        output = Path(args.output or args.sources[0])
    print("\n".join(compare_runs(groups, output)))
    plot_runs(list(runs.values()), output / "curves.png", list(runs))
    print(f"wrote {output / 'comparison.md'}, {output / 'comparison.csv'}, {output / 'comparison.png'} and "
          f"{output / 'curves.png'}")
    return 0


def _backbones(pairs: list[str]) -> dict[str, str]:
    backbones = {}
    for pair in pairs:
        name, sep, weights = pair.partition("=")
        if not sep or not name or not weights or "/" in name:
            raise UserError(f"--backbones {pair!r}: give NAME=WEIGHTS (a name without '/', then a file or a weights name)")
        if name in backbones:
            raise UserError(f"--backbones: the name {name!r} is given twice")
        backbones[name] = weights
    return backbones


def run_all(config_file: str, overrides: list[str], backbones: dict[str, str], seeds: int, output: Path,
            launch: list[str]) -> None:
    """Each backbone's runs, one after the other; finished ones skipped, unfinished ones resumed."""
    base_seed = load_config(config_file, overrides).seed  # the protocol (and its overrides) checked before any run
    for name, weights in backbones.items():
        for offset in range(seeds):
            folder = output / name / f"seed_{offset}"
            if (folder / "metrics.json").is_file():
                print(f"{name} seed {offset}: finished in {folder}, skipped", flush=True)
                continue
            command = [sys.executable, "-m", "accelerate.commands.launch", *launch, str(ROOT / "tools" / "train.py"),
                       config_file, *overrides, f"model.backbone.weights={weights}", f"seed={base_seed + offset}",
                       f"output_dir={folder}", "resume=auto"]
            print(f"{name} seed {offset}: training in {folder}", flush=True)
            done = subprocess.run(command)
            if done.returncode != 0:
                raise UserError(f"{name} seed {offset} stopped (exit code {done.returncode}) in {folder}: its output is "
                                "above; the same command resumes the comparison from its checkpoint")


def collect(sources: list[Path]) -> tuple[dict[str, list[dict]], dict[str, Path]]:
    """The finished runs under ``sources``: backbone name → their metrics, and run name → folder."""
    groups: dict[str, list[dict]] = {}
    runs: dict[str, Path] = {}
    for source in sources:
        if (source / "metrics.json").is_file():
            folders = [source]
        else:
            folders = sorted(p.parent for p in source.glob("*/seed_*/metrics.json"))
        if not folders:
            raise UserError(f"{source}: no finished run (a metrics.json) in it, nor in its NAME/seed_N folders")
        for folder in folders:
            name = folder.parent.name if folder.name.startswith("seed_") else folder.name
            groups.setdefault(name, []).append(json.loads((folder / "metrics.json").read_text()))
            runs[f"{name}/{folder.name}" if folder.name.startswith("seed_") else name] = folder
    return groups, runs


if __name__ == "__main__":
    sys.exit(main())
