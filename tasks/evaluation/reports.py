"""Pictures and reports of runs: training curves of one or several runs (from their ``metrics.jsonl``), and
what a COCO evaluation writes beside its numbers (per-category table and JSON, precision-recall curves)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

from backbones.errors import UserError, UserFileNotFoundError

from .coco import CocoReport, format_per_category

logger = logging.getLogger(__name__)

# validation metrics worth a panel, in this order, when a run logged them
VALIDATION_KEYS = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/mIoU", "segm/pixel_accuracy", "cls/top5_error")
# classification: the training error (of the training batches, logged as they pass) and the validation
# error of each run share one panel, dashed and solid in the run's colour (the paper's Figure 6)
ERROR_PANEL = "top-1 error (train dashed, val solid)"
ERROR_KEYS = ("top1_error", "val/cls/top1_error")


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


def _pyplot():
    """matplotlib's pyplot on the file-only backend, or a UserError saying how to install it."""
    try:
        import matplotlib  # noqa: PLC0415  optional (the plot extra), and slow to import

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as error:
        raise UserError("pictures need matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from error
    return plt


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path, names: Sequence[str] | None = None) -> list[str]:
    """Draw the losses, the learning rate and the validation metrics of the runs side by side into
    ``output`` (PNG), one panel per quantity, one line per run (overlaid, so two backbones or two depths
    compare at a glance). Returns the panel titles."""
    plt = _pyplot()
    runs = {name: read_metrics(d) for name, d in zip(names or [Path(d).resolve().name for d in run_dirs], run_dirs)}
    losses = sorted({k for records in runs.values() for r in records for k in r if k.startswith("loss")},
                    key=lambda k: (k != "loss", k))
    validation = [k for k in VALIDATION_KEYS if any(f"val/{k}" in r for records in runs.values() for r in records)]
    errors = [ERROR_PANEL] if any(k in r for records in runs.values() for r in records for k in ERROR_KEYS) else []
    panels = [*losses, "lr", *errors, *(f"val/{k}" for k in validation)]
    if not any(_series(records, key)[0] for records in runs.values() for key in [*panels, *ERROR_KEYS]):
        raise UserError(f"no logged losses or metrics in {', '.join(map(str, run_dirs))}: has training started?")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for axis, key in zip(axes.flat, panels):
        if key == ERROR_PANEL:
            for index, records in enumerate(runs.values()):
                for series, style in zip(ERROR_KEYS, ("--", "-")):
                    x, y = _series(records, series)
                    if x:
                        axis.plot(x, [100 * v for v in y], style, color=f"C{index % 10}", linewidth=1.2 if style == "--" else 2)
            axis.set(title=key, xlabel="iteration", ylabel="error (%)")
            axis.grid(alpha=0.3)
            continue
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


def plot_pr_curves(report: CocoReport, output: str | Path, iou_type: str = "bbox", extremes: int = 3) -> None:
    """Precision-recall curves at IoU 0.5 and 0.75 (all areas, 100 detections an image): the mean over the
    categories with ground truth (the curve whose area is AP50 / AP75) and the ``extremes`` best and worst
    categories by AP, named, in ``output`` (PNG)."""
    plt = _pyplot()
    rows = [(i, r) for i, r in enumerate(report.per_category) if r["AP"] is not None]
    ranked = sorted(rows, key=lambda item: item[1]["AP"])
    shown = ranked[-extremes:][::-1] + (ranked[:extremes] if len(ranked) > extremes else [])
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for axis, iou in zip(axes, (0.5, 0.75)):
        precision = report.precision[iou][[i for i, _ in rows]]  # (K with ground truth, R)
        key = "AP50" if iou == 0.5 else "AP75"
        axis.plot(report.recall, precision.mean(0), color="black", linewidth=2.5,
                  label=f"all {len(rows)} categories ({key} {100 * report.summary[key]:.1f})")
        for rank, (index, row) in enumerate(shown):
            style = "-" if rank < min(extremes, len(ranked)) else "--"
            axis.plot(report.recall, report.precision[iou][index], style, linewidth=1.2, color=f"C{rank % 10}",
                      label=f"{row['name']} ({key} {100 * row[key]:.1f})")
        axis.set(title=f"{iou_type}, IoU {iou}", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower left")
    figure.suptitle("precision-recall: mean, best (solid) and worst (dashed) categories by AP")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)


def write_coco_report(report: CocoReport, iou_type: str, output_dir: str | Path | None,
                      curves_name: str = "pr_curves.png") -> None:
    """Print the per-category table; in ``output_dir`` (when given) write ``per_category.json`` (its
    ``iou_type`` entry, beside those of other IoU types already there) and, where matplotlib is installed,
    the curves (``curves_name``), and say where they are."""
    if not report.per_category:
        return
    print(format_per_category(report.per_category, iou_type))
    if output_dir is None:
        return
    output_dir = Path(output_dir)
    table = output_dir / "per_category.json"
    tables = json.loads(table.read_text()) if table.is_file() else {}
    table.write_text(json.dumps({**tables, iou_type: report.per_category}, indent=1))
    written = [table]
    try:
        plot_pr_curves(report, output_dir / curves_name, iou_type)
        written.append(output_dir / curves_name)
    except UserError as missing:
        logger.info("no pr_curves.png: %s", missing)
    print("wrote " + ", ".join(map(str, written)))


def plot_per_class_iou(metrics: dict[str, float], output: str | Path) -> None:
    """A bar chart of the per-class IoU (``IoU/<class>`` entries of ``metrics``), worst first, with the mIoU
    as a line, in ``output`` (PNG)."""
    plt = _pyplot()
    values = sorted(((k.split("/", 1)[1], v) for k, v in metrics.items() if k.startswith("IoU/")), key=lambda kv: kv[1])
    figure, axis = plt.subplots(figsize=(max(5.0, 0.32 * len(values) + 2), 4.2))
    axis.bar(range(len(values)), [v for _, v in values], color="C0")
    axis.axhline(metrics["mIoU"], color="black", linestyle="--", label=f"mIoU {100 * metrics['mIoU']:.1f}")
    axis.set_xticks(range(len(values)), [name for name, _ in values], rotation=60 if len(values) > 8 else 0,
                    ha="right" if len(values) > 8 else "center", fontsize=8)
    axis.set(ylabel="IoU", ylim=(0, 1), title="per-class IoU")
    axis.grid(axis="y", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)


# the final metrics a comparison of backbones tabulates (the keys of metrics.json ending so)
SUMMARY_SUFFIXES = ("/AP", "/AP50", "/AP75", "/mAP", "/mIoU", "/pixel_accuracy", "/top1", "/top5")


def compare_runs(groups: dict[str, list[dict]], output_dir: str | Path) -> list[str]:
    """One table and one picture of several backbones' final metrics: ``groups`` maps each backbone's name
    to the ``metrics.json`` of its runs (one per seed). Writes ``comparison.md`` and ``comparison.csv``
    (mean ± sample standard deviation over the seeds, and their number) and ``comparison.png`` (a bar chart
    per metric, the seeds' spread as error bars) into ``output_dir``; returns the Markdown table's lines."""
    plt = _pyplot()
    metrics = sorted({k for runs in groups.values() for m in runs for k in m if k.endswith(SUMMARY_SUFFIXES)})
    if not metrics:
        raise UserError("no final metrics (metrics.json with AP, mAP, mIoU or top-1) in the runs to compare")

    def stats(values: list[float]) -> tuple[float, float]:
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return mean, std

    table = {name: {k: stats([m[k] for m in runs if k in m]) for k in metrics if any(k in m for m in runs)}
             for name, runs in groups.items()}
    lines = ["| backbone | seeds | " + " | ".join(metrics) + " |", "| --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    csv = ["backbone,seeds," + ",".join(f"{k},{k} std" for k in metrics)]
    for name, row in table.items():
        seeds = len(groups[name])
        cells = [f"{100 * row[k][0]:.2f} ± {100 * row[k][1]:.2f}" if k in row else "—" for k in metrics]
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
        csv.append(f"{name},{seeds}," + ",".join(f"{row[k][0]:.6f},{row[k][1]:.6f}" if k in row else "," for k in metrics))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    (output_dir / "comparison.csv").write_text("\n".join(csv) + "\n")
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    names = list(table)
    for axis, key in zip(axes.flat, metrics):
        means = [100 * table[n][key][0] if key in table[n] else 0.0 for n in names]
        spreads = [100 * table[n][key][1] if key in table[n] else 0.0 for n in names]
        axis.bar(range(len(names)), means, yerr=spreads, capsize=4, color=[f"C{i % 10}" for i in range(len(names))])
        axis.set_xticks(range(len(names)), names, rotation=20, ha="right")
        axis.set_title(key)
        axis.grid(axis="y", alpha=0.3)
    for axis in list(axes.flat)[len(metrics):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(output_dir / "comparison.png", dpi=100)
    plt.close(figure)
    return lines
