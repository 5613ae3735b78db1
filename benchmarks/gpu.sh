#!/usr/bin/env bash
# One script for a lent CUDA machine: U-Net training throughput, DDPM-CIFAR-10 preset, batch 128,
# difflab vs diffusers' UNet2DModel (same config), fp32 / bf16 autocast / bf16 + channels_last +
# torch.compile, img/s and % of the measured bf16 matmul rate. torch is on the machine; diffusers
# and its pure-Python dependencies travel as wheels in .whl/ (see the device tool's README), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 \
#     safetensors huggingface_hub
# and the call:  run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/unet_train.py --preset ddpm-cifar10 --batch 128 --device cuda --iters 20 \
  --rounds 3 --modes fp32,bf16,bf16-cl-compile --peers difflab,diffusers,diffusers-cl \
  2>&1 | tee "${OUT:-/tmp}/unet_train_gpu.txt"
cp benchmarks/out/unet_train.json "${OUT:-/tmp}/" 2>/dev/null || true
