"""Checkpoints and run-folder files written so that a crash never leaves a broken one: a temporary
folder or file, renamed when complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator


class CheckpointDir:
    """``<output_dir>/checkpoints/iter_NNNNNNN`` folders written by ``accelerator.save_state`` into a
    temporary folder first and renamed when complete, plus a ``latest`` file naming the newest; a crash
    while writing leaves the previous checkpoint and ``latest`` intact."""

    def __init__(self, output_dir: Path, keep: int):
        self.root = output_dir / "checkpoints"
        self.keep = max(keep, 1)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, accelerator: Accelerator, iteration: int) -> Path:
        final = self.root / f"iter_{iteration:07d}"
        partial = self.root / f".partial_iter_{iteration:07d}"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            tmp = self.root / ".latest.tmp"
            tmp.write_text(final.name)
            os.replace(tmp, self.root / "latest")
            for old in sorted(self.root.glob("iter_*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a temporary file renamed over the target)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
