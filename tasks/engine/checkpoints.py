"""Checkpoints and run-folder files that cannot lie: written into a temporary folder or file and renamed when
complete, each checkpoint folder with a manifest of its files (sizes and SHA-256) written last, verified before
a resume, and a failed save (a full disk, a read-only folder) reported in one line with the previous
checkpoint intact."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import SafetensorError

from backbones.errors import UserError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (no space left, a read-only or vanished folder): the run stops, the
    temporary folder removed and the previous checkpoint intact."""


class CheckpointDir:
    """``<output_dir>/checkpoints/iter_NNNNNNN`` folders written by ``accelerator.save_state`` into a
    temporary folder, given a manifest of their files and renamed when complete, plus a ``latest`` file
    naming the newest; a crash or a failed write leaves the previous checkpoint and ``latest`` intact, and a
    checkpoint damaged afterwards (a truncated copy, a flipped byte) is found by ``latest_good`` before any
    of it is read into the model."""

    def __init__(self, output_dir: Path, keep: int):
        self.root = output_dir / "checkpoints"
        self.keep = max(keep, 1)

    def latest(self) -> Path | None:
        """The newest checkpoint as written (``latest``), unverified: what messages name."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def latest_good(self, report: bool = True) -> Path | None:
        """The newest checkpoint whose files match its manifest; each newer one that does not is skipped with a
        warning (``report``) naming what is wrong with it. ``None``: no checkpoint at all, or none intact."""
        for folder in sorted(self.root.glob("iter_*"), reverse=True):
            if not (folder / MANIFEST).exists():  # written before checkpoints had manifests: taken as it is
                if report:
                    logger.warning("checkpoint %s has no %s (written by an older version): not verified", folder,
                                   MANIFEST)
                return folder
            problem = verify(folder)
            if problem is None:
                return folder
            if report:
                logger.warning("checkpoint %s is damaged (%s): falling back to the one before it", folder, problem)
        return None

    def save(self, accelerator: Accelerator, iteration: int) -> Path:
        """Write this iteration's checkpoint on every process; a failure on any process (an ``OSError``:
        ``ENOSPC``, ``EROFS``, ...) is agreed on by all of them and raised as ``CheckpointWriteError`` on each,
        after the temporary folder is removed."""
        final = self.root / f"iter_{iteration:07d}"
        partial = self.root / f".partial_iter_{iteration:07d}"
        main = accelerator.is_main_process
        steps: list[Callable[[], Any]] = [
            lambda: main and _fresh_folder(partial),
            lambda: accelerator.save_state(str(partial)),
            lambda: main and self._complete(partial, final),
        ]
        for step in steps:  # every process takes each step, then all learn whether any of them failed
            failures = [f for f in gather_object([_attempt(step)]) if f]
            if failures:
                if main:
                    shutil.rmtree(partial, ignore_errors=True)
                previous = self.latest()
                raise CheckpointWriteError(
                    f"cannot write checkpoint {final}: {failures[0]}; the previous checkpoint "
                    f"{previous or '(none yet)'} is intact: free space or make {self.root} writable (or set "
                    f"output_dir elsewhere) and resume")
        if main:
            for old in sorted(self.root.glob("iter_*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def _complete(self, partial: Path, final: Path) -> None:
        """The manifest, written last into the complete folder, then the rename and the ``latest`` pointer."""
        write_json(partial / MANIFEST, manifest(partial))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        tmp = self.root / ".latest.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, self.root / "latest")


def _fresh_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _attempt(step: Callable[[], Any]) -> str | None:
    """``None`` if ``step`` ran, else the ``OSError`` it raised (or safetensors' report of one) in words: the
    other processes get it too."""
    try:
        step()
    except OSError as error:
        return f"{error.strerror or error} ({error.filename})" if error.filename else str(error)
    except SafetensorError as error:  # safetensors' writer reports the OSError in its own words
        return str(error)
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, Any]:
    """Every file under ``folder`` (relative path → size in bytes and SHA-256)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"files": {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}


def verify(folder: Path) -> str | None:
    """What is wrong with the checkpoint ``folder`` (its manifest missing or unreadable, a file missing,
    truncated or with other bytes than when written), or ``None`` if every file matches its manifest."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} unreadable: {error}"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} is {size} bytes, the manifest says {expected['bytes']} (truncated or overwritten)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupt)"
    return None


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a temporary file renamed over the target)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
