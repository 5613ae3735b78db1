"""Foreign weights in: Stable Diffusion as diffusers folders or original single files.

``load_pipeline(path)`` is the one entry point (DESIGN.md, "Contracts"):

    pipe = load_pipeline("stable-diffusion-v1-5")                 # diffusers-format folder
    pipe = load_pipeline("v1-5-pruned-emaonly.safetensors", tokenizer="sd15/tokenizer")
    images = pipe(["a watercolor fox"], num_inference_steps=25,
                  generator=torch.Generator().manual_seed(0))        # (1, 3, 512, 512) in [0, 1]

Both adapters map names, assert every tensor's shape and refuse partial loads;
``diffusers_format`` and ``sd_single_file`` say how. ``save_pipeline`` / ``save_single_file``
(``writer``) write a difflab :class:`TextToImage` in the same two formats.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.errors import CheckpointError
from difflab.interop.diffusers_format import is_diffusers_folder, load_diffusers_folder
from difflab.interop.sd_single_file import SD15, config_counts_sd15, load_single_file
from difflab.interop.writer import save_pipeline, save_single_file
from difflab.pipelines.text_to_image import TextToImage
from difflab.schedulers import Scheduler


def load_pipeline(path: str | Path, dtype: torch.dtype | None = None, *,
                  device: torch.device | str | None = None,
                  scheduler: str | Scheduler | None = None,
                  tokenizer: str | Path | None = None) -> TextToImage:
    """A :class:`TextToImage` from a diffusers-format folder or an SD v1.x single file.

    ``dtype`` (default float32) and ``device`` (default CPU) say where the weights go;
    ``scheduler`` is a name of ``difflab.schedulers.SCHEDULERS`` or an instance (default: the
    folder's own scheduler, or DPM-Solver++ where difflab lacks it or the file names none);
    ``tokenizer`` is the folder of CLIP's vocab.json + merges.txt a single file needs (default:
    ``tokenizer/`` beside it).
    """
    path = Path(path)
    if is_diffusers_folder(path):
        if tokenizer is not None:
            raise CheckpointError(f"{path}: a diffusers folder brings its own tokenizer/; "
                                  "tokenizer= is for single-file checkpoints")
        return load_diffusers_folder(path, dtype=dtype, device=device, scheduler=scheduler)
    if path.is_file():
        return load_single_file(path, dtype=dtype, device=device, scheduler=scheduler,
                                tokenizer=tokenizer)
    if path.is_dir():
        raise CheckpointError(f"{path}: not a diffusers pipeline folder (no model_index.json, "
                              "no unet/)")
    raise CheckpointError(f"{path}: no such file or folder")


__all__ = ["SD15", "config_counts_sd15", "load_diffusers_folder", "load_pipeline",
           "load_single_file", "save_pipeline", "save_single_file"]
