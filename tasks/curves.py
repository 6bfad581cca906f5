"""Training curves of one or several runs as one picture, from their ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from backbones.errors import UserError, UserFileNotFoundError

# validation metrics worth a panel, in this order, when a run logged them
VALIDATION_KEYS = ("bbox/AP", "bbox/AP50", "segm/mIoU", "segm/pixel_accuracy")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl`` (training logs and validation results, by iteration)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserFileNotFoundError(f"{path} not found: give run folders of tools/train.py")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {number}: not JSON ({error})") from error
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["iteration"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))
              and math.isfinite(r[key]) and r[key] >= 0]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path, names: Sequence[str] | None = None) -> list[str]:
    """Draw the losses, the learning rate and the validation metrics of the runs side by side into
    ``output`` (PNG), one panel per quantity, one line per run (overlaid, so two backbones or two depths
    compare at a glance). Returns the panel titles."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise UserError("tools/plot.py needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from error
    runs = {name: read_metrics(d) for name, d in zip(names or [Path(d).resolve().name for d in run_dirs], run_dirs)}
    losses = sorted({k for records in runs.values() for r in records for k in r if k.startswith("loss")},
                    key=lambda k: (k != "loss", k))
    validation = [k for k in VALIDATION_KEYS if any(f"val/{k}" in r for records in runs.values() for r in records)]
    panels = [*losses, "lr", *(f"val/{k}" for k in validation)]
    if not any(_series(records, key)[0] for records in runs.values() for key in panels):
        raise UserError(f"no logged losses or metrics in {', '.join(map(str, run_dirs))}: has training started?")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for axis, key in zip(axes.flat, panels):
        for index, (name, records) in enumerate(runs.items()):  # a run keeps its colour in every panel
            x, y = _series(records, key)
            if x:
                axis.plot(x, y, label=name, color=f"C{index % 10}", marker="o" if key.startswith("val/") else None,
                          markersize=3)
        axis.set_title(key)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        if key.startswith("loss") and key != "loss":
            axis.set_yscale("log")
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    handles = [plt.Line2D([], [], color=f"C{i % 10}", label=name) for i, name in enumerate(runs)]
    figure.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / figure.get_figheight()))  # room for the legend on top
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return panels
