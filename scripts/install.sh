#!/usr/bin/env bash
# Create a virtual environment and install difflab into it.
#   bash scripts/install.sh [VENV] [EXTRAS]      e.g.  bash scripts/install.sh .venv dev
# torch is installed first so that the project's "torch>=2.4" is already satisfied: on machines
# with a local CPU build (pip finds torch==2.13.0 there) that avoids a multi-GB CUDA download;
# elsewhere the normal PyPI build is used.
set -euo pipefail
VENV="${1:-.venv}"
EXTRAS="${2:-}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $PIP install -q "torch==2.13.0" || $PIP install -q "torch>=2.4"
fi
if [ -n "$EXTRAS" ]; then
  $PIP install -q -e ".[${EXTRAS}]"
else
  $PIP install -q -e .
fi
