#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating or updating it first.
#
#   bash tools/env.sh python tools/backbone_table.py
#   bash tools/env.sh python -m pytest
#
# The environment lives in .venv (override with VENV=path). It is (re)installed from pyproject.toml,
# with the test extra, whenever that file changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed-from"

want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[env] creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "[env] installing the project and its dependencies into $VENV (log: $VENV/install.log)" >&2
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$ROOT[test]" >"$VENV/install.log" 2>&1; then
        grep -v "^WARNING: Location" "$VENV/install.log" | tail -40 >&2
        echo "[env] installation failed; full log in $VENV/install.log" >&2
        exit 1
    fi
    echo "$want" >"$STAMP"
fi
cd "$ROOT"
export PATH="$VENV/bin:$PATH"
exec "$@"
