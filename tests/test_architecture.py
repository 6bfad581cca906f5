"""The layer contract and the linter, run with the tests: import-linter checks the contracts of
pyproject.toml (imports point down the layers, the three tasks independent, no import cycle in any
package), ruff the whole tree."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tools", "tasks", "heads", "backbones")


def _run(tool: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).parent / tool  # installed by the test extra beside this interpreter
    return subprocess.run([str(executable), *args], cwd=cwd, capture_output=True, text=True)


def test_imports_point_down_the_layers_with_no_cycle():
    result = _run("lint-imports", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_and_a_cycle_are_named(tmp_path):
    """The contracts are live: a copy of the tree with a head importing a task module, and two data modules
    importing each other, fails with both imports named."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "heads" / "rpn.py", "a") as f:
        f.write("\nfrom tasks.config import Config  # noqa\n")
    with open(tmp_path / "tasks" / "data" / "images.py", "a") as f:
        f.write("\nfrom tasks.data import coco  # noqa\n")
    result = _run("lint-imports", "--no-cache", cwd=tmp_path)
    assert result.returncode != 0
    assert "heads.rpn -> tasks.config" in result.stdout
    assert "No cycles are allowed in tasks.data" in result.stdout and ".images -> .coco" in result.stdout


def test_ruff_is_clean():
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr
