"""The sampling loop shared by the two peer contestants of ``quality_race.py``.

Imports only torch and safetensors, so it works in the peer venv (torch 2.14 + torchvision)
as well as in difflab's. ``draw(batch_size, chunk_index)`` returns (B, 1, 32, 32) images in
[0, 1]; they are cropped back to 28×28, rounded to 8 bits and written to
``out/samples.safetensors``; ``out/sample.json`` records the cost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

PAD = 2  # Fashion-MNIST's 28 px padded to 32 for the peers' U-Nets


def sample_to_file(draw: Callable[[int, int], torch.Tensor], out: Path, n: int, batch: int,
                   name: str, sampler: str) -> dict:
    from safetensors.torch import save_file

    chunks = []
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, n, batch)):
        b = min(batch, n - start)
        x = draw(b, i)[:, :, PAD:-PAD, PAD:-PAD]
        chunks.append(torch.round(x.clamp(0, 1) * 255).to(torch.uint8))
        print(f"{name}: {start + b}/{n} samples, {time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    save_file({"images": torch.cat(chunks).contiguous()}, str(out / "samples.safetensors"))
    res = {"n": n, "sampler": sampler, "sampling_seconds": seconds,
           "threads": torch.get_num_threads()}
    (out / "sample.json").write_text(json.dumps(res, indent=2) + "\n")
    return res
