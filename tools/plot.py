"""Training curves as a picture: losses, learning rate and validation metrics of one or several runs.

    python tools/plot.py RUN_DIR [RUN_DIR ...] [--output FILE.png] [--names A B ...]

Reads each run folder's ``metrics.jsonl`` and draws one panel per quantity with one line per run, so runs
compare at a glance (e.g. two backbone depths, or a plain network against a residual one). Default
output: ``curves.png`` in the first run folder (``--output`` for several runs is advisable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.cli import DEBUG_HELP, tool
from tasks.evaluation.reports import plot_runs


@tool
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with a metrics.jsonl)")
    parser.add_argument("--output", help="PNG to write (default: RUN_DIR/curves.png of the first run)")
    parser.add_argument("--names", nargs="+", help="legend names, one per run (default: the folder names)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        parser.error(f"--names gives {len(args.names)} names for {len(args.runs)} runs")
    output = Path(args.output or Path(args.runs[0]) / "curves.png")
    panels = plot_runs(args.runs, output, args.names)
    print(f"wrote {output} ({len(panels)} panels: {', '.join(panels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
