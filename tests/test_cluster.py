"""Runs that survive the cluster, each fault injected for real: checkpoints damaged on disk (truncated, a
flipped byte) and saves that fail (a full disk, a read-only folder); a process stopped (SIGSTOP) or killed
(kill -9) in a two-process run; a stalled read; two machines joined by a network (two network namespaces).
The tests that mount file systems or create namespaces need root and skip, saying so, without it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from tasks.config import load_config
from tasks.engine import train
from tasks.engine.checkpoints import CheckpointDir, CheckpointWriteError, verify
from tasks.registry import get_task

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def run(shapes, out, *overrides, task=None):
    config = load_config(QUICKSTART, [*TINY, f"data.root={shapes}", f"output_dir={out}", *overrides])
    return train(task or get_task(config.task), config)


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in rows if "loss" in r}


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # one flipped bit in the middle of the file: the size is right, the bytes are not
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_latest_checkpoint_is_found_and_the_run_resumes_from_the_one_before(shapes, tmp_path, how, caplog):
    reference = run(shapes, tmp_path / "reference", "train.max_iters=6")
    run(shapes, tmp_path / "run", "train.max_iters=4", "train.checkpoint_period=2")  # iter_2, iter_4 (final)
    checkpoints = CheckpointDir(tmp_path / "run", keep=2)
    latest = checkpoints.latest()
    assert latest.name == "iter_0000004" and verify(latest) is None
    manifest = json.loads((latest / "manifest.json").read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(manifest)
    damage(latest / "model.safetensors", how)
    problem = verify(latest)
    assert problem.startswith("model.safetensors ") and ("truncated" if how == "truncated" else "SHA-256") in problem

    resumed = run(shapes, tmp_path / "run", "train.max_iters=6")  # resume=auto skips iter_4, takes iter_2
    assert f"checkpoint {latest} is damaged (model.safetensors" in caplog.text
    assert "falling back to the one before it" in caplog.text
    expected, got = losses(tmp_path / "reference"), losses(tmp_path / "run")
    for iteration in (3, 4, 5, 6):  # iterations 3 and 4 trained again, from iter_2: the same losses
        assert got[iteration] == pytest.approx(expected[iteration], rel=1e-5), iteration
    assert resumed.metrics == pytest.approx(reference.metrics, abs=1e-6)


def test_resume_from_a_named_damaged_checkpoint_is_an_error(shapes, tmp_path):
    from backbones.errors import UserError

    run(shapes, tmp_path / "run", "train.max_iters=2")
    folder = tmp_path / "run" / "checkpoints" / "iter_0000002"
    damage(folder / "optimizer.bin", "truncated")
    with pytest.raises(UserError, match=r"the checkpoint is damaged \(optimizer.bin is \d+ bytes, the manifest says"):
        run(shapes, tmp_path / "run", "train.max_iters=4", f"resume={folder}")


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mount {' '.join(args)} failed (needs root): {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 MB tmpfs: a disk of its own, filled or made read-only by the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk))
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` bytes free."""
    free = shutil.disk_usage(disk).free - leave
    with open(disk / "filler", "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(free, 0))


@pytest.mark.parametrize("fault", ["ENOSPC", "EROFS"])
def test_a_save_that_fails_is_one_line_the_previous_checkpoint_intact(shapes, tmp_path, small_disk, fault):
    """The second checkpoint's save fails mid-write (the disk full with 100 kB left, or the folder made
    read-only): a one-line error naming the fault; the first checkpoint intact and still the latest; no
    temporary folder left; the run resumes from it elsewhere."""
    from test_engine import with_training_hook

    out = small_disk / "run"

    def fault_at_call_4(n, losses):
        if n == 4:
            if fault == "ENOSPC":
                _fill(small_disk, leave=100_000)
            else:
                _mount("--bind", str(out / "checkpoints"), str(out / "checkpoints"))
                _mount("-o", "remount,bind,ro", str(out / "checkpoints"))

    try:
        with pytest.raises(CheckpointWriteError) as failed:
            run(shapes, out, "train.max_iters=6", "train.checkpoint_period=2", task=with_training_hook(fault_at_call_4))
    finally:
        if fault == "EROFS":
            subprocess.run(["umount", str(out / "checkpoints")], check=False)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write checkpoint {out / 'checkpoints' / 'iter_0000004'}: ")
    assert ("No space left on device" if fault == "ENOSPC" else "Read-only file system") in message
    assert f"the previous checkpoint {out / 'checkpoints' / 'iter_0000002'} is intact" in message
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["iter_0000002", "latest"]  # no temporary folder left behind
    assert verify(out / "checkpoints" / "iter_0000002") is None
    (small_disk / "filler").unlink(missing_ok=True)
    resumed = run(shapes, out, "train.max_iters=6")
    assert resumed.iterations == 6 and 3 in losses(out)
