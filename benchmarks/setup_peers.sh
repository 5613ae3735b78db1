#!/usr/bin/env bash
# Separate venv for the denoising-diffusion-pytorch contestant of benchmarks/quality_race.py.
#
# denoising-diffusion-pytorch needs torchvision, and PyPI's torchvision does not import beside the
# torch 2.13.0 CPU build of difflab's venv ("operator torchvision::nms does not exist"), so the
# peer runs in its own venv, outside the repository (about 5.5 GB: torch 2.14.1 from PyPI is a
# CUDA build; on this machine pip takes torch and torchvision from the local wheel store).
#
#     bash benchmarks/setup_peers.sh [VENV]        # default /work/peervenv
set -euo pipefail
VENV=${1:-/work/peervenv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# pip's "Location ... is ignored" warnings about local indexes are harmless
"$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/pip" install -q denoising-diffusion-pytorch==2.3.4
"$VENV/bin/python" -c "import importlib.metadata as m, denoising_diffusion_pytorch, torch, torchvision; \
print('peer venv ok: torch', torch.__version__, 'torchvision', torchvision.__version__, \
'denoising-diffusion-pytorch', m.version('denoising-diffusion-pytorch'))"
