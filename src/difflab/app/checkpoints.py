"""What the playground serves: the models found in the folders named on the command line.

A folder given to ``difflab serve --ckpt`` may be

* an autoencoder / VAE checkpoint folder (``config.json`` naming ``Autoencoder``, ``VAE`` or
  ``LinearAutoencoder``) or a ``difflab train ae|vae|linear-ae`` run folder (``model/`` inside);
* a pixel diffusion model folder or a ``difflab train ddpm`` run folder (``diffusion_config.json``);
* a latent diffusion folder (``difflab train ldm`` run or a diffusers-format pipeline);
* a folder that holds such folders one level down — the ``difflab demo`` output
  (``ae/``, ``vae/``, ``ddpm/``).

Only these folders are read: nothing is searched for elsewhere, nothing is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.data.dataset import recorded_spec
from difflab.errors import CheckpointError, DifflabError
from difflab.io import read_json

# Where `difflab demo` writes its models by default (DemoConfig.out), relative to the cwd.
DEMO_DIR = Path("runs/demo")
AUTOENCODER_CLASSES = ("Autoencoder", "VAE", "LinearAutoencoder")
N_TEST_IMAGES = 64  # test images kept for the interpolation and the noising picture


@dataclass
class AutoencoderEntry:
    """An AE or VAE, the image shape it decodes to, and the span of its latent space."""

    model: nn.Module
    image_shape: tuple[int, int, int]  # (C, H, W)
    is_vae: bool
    span: float  # sliders and the plane cover z_i ∈ [−span, span]
    data_name: str | None  # data set recorded in data.json, if any

    @property
    def latent_dim(self) -> int:
        return int(self.model.config.latent_dim)


@dataclass
class DiffusionEntry:
    """A pixel diffusion bundle (``kind="pixel"``) or a text-to-image pipeline (``"ldm"``)."""

    kind: str  # "pixel" or "ldm"
    model: Any  # DiffusionModelBundle or TextToImage
    class_names: list[str] = field(default_factory=list)  # conditional pixel models only
    captioner: Any = None  # LDM: the captioner whose words the model knows (or None)
    data_name: str | None = None
    # LDM: its scheduler's config as loaded; every request builds its sampler from this (a
    # request replaces ``model.scheduler``, which must not leak into the next one)
    scheduler_config: dict[str, Any] | None = None

    @property
    def conditional(self) -> bool:
        return bool(self.class_names)


@dataclass
class Playground:
    """Everything the app shows, keyed by a label (the folder it came from)."""

    autoencoders: dict[str, AutoencoderEntry]
    diffusion: dict[str, DiffusionEntry]
    test_images: Tensor | None  # (N, C, H, W) in [−1, 1], or None where no data set loads
    data_name: str | None  # where test_images came from

    def describe(self) -> str:
        parts = [f"{k} ({'VAE' if e.is_vae else 'AE'}, {e.latent_dim}-d)"
                 for k, e in self.autoencoders.items()]
        parts += [f"{k} ({e.kind} diffusion)" for k, e in self.diffusion.items()]
        return ", ".join(parts)


# ----------------------------------------------------------------------------- discovery
def _class_name(folder: Path) -> str | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    obj = read_json(cfg)
    return obj.get("_class_name") if isinstance(obj, dict) else None


def classify(folder: Path) -> tuple[str, Path] | None:
    """("autoencoder" | "pixel" | "ldm", the folder to load) for a model folder, else None."""
    from difflab.runs.ldm import is_ldm_folder, ldm_folder

    if is_ldm_folder(folder):
        return "ldm", ldm_folder(folder)
    for f in (folder / "model", folder):
        if (f / "diffusion_config.json").is_file():
            return "pixel", f
        if _class_name(f) in AUTOENCODER_CLASSES:
            return "autoencoder", f
    return None


def find_models(folder: str | Path) -> list[tuple[str, str, Path]]:
    """(label, kind, folder) of the models in ``folder`` itself or one level below it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    found = classify(folder)
    if found is not None:
        return [(folder.name or str(folder), *found)]
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        found = classify(sub)
        if found is not None:
            out.append((f"{folder.name}/{sub.name}", *found))
    if not out:
        raise CheckpointError(f"{folder}: no difflab model here (an AE/VAE, diffusion or latent "
                              "diffusion folder, or a `difflab demo` output folder)")
    return out


# ------------------------------------------------------------------------------- loading
def _data_info(folder: Path) -> dict[str, Any]:
    return read_json(folder / "data.json") if (folder / "data.json").is_file() else {}


@torch.no_grad()
def _latent_span(model: nn.Module, is_vae: bool, images: Tensor | None) -> float:
    """2 for a VAE (its prior N(0, I) puts 95% of the mass in ±2); for an AE, the 99th
    percentile of |z| over the test codes (an AE's codes have no fixed scale)."""
    if is_vae or images is None:
        return 2.0
    from difflab.runs.autoencoders import encode_codes

    z = encode_codes(model, images).abs().flatten()
    return max(float(f"{float(torch.quantile(z, 0.99)):.2g}"), 1e-3)  # 2 digits: slider ends


def load_autoencoder(folder: Path, images: Tensor | None) -> AutoencoderEntry:
    from difflab.models.base import load_model
    from difflab.models.vae import VAE

    model = load_model(folder).eval()
    c = model.config
    shape = (int(c.in_channels), int(c.image_size), int(c.image_size))
    is_vae = isinstance(model, VAE)
    usable = images if images is not None and tuple(images.shape[1:]) == shape else None
    return AutoencoderEntry(model, shape, is_vae, _latent_span(model, is_vae, usable),
                            recorded_spec(_data_info(folder)))


def load_diffusion(kind: str, folder: Path) -> DiffusionEntry:
    if kind == "ldm":
        from difflab.runs.ldm import load_ldm

        pipe, captioner = load_ldm(folder)
        return DiffusionEntry("ldm", pipe, captioner=captioner,
                              scheduler_config=dict(pipe.scheduler.config))
    from difflab.runs.diffusion import load_bundle

    bundle = load_bundle(folder)
    names = list(bundle.data.get("class_names", [])) if bundle.unet.config.num_class_embeds \
        else []
    return DiffusionEntry("pixel", bundle, class_names=names,
                          data_name=recorded_spec(bundle.data))


def load_test_images(spec: str, n: int = N_TEST_IMAGES) -> Tensor:
    """The first ``n`` test images of a data set (training images where it has no test split)."""
    from difflab.data import load_dataset
    from difflab.errors import DataError

    try:
        ds = load_dataset(spec, "test")
    except DataError:
        ds = load_dataset(spec, "train")
    return ds.images[:n]


def load_playground(folders: list[str | Path] | None = None, data: str | None = None,
                    demo_dir: Path = DEMO_DIR) -> Playground:
    """Load every model in ``folders`` (default: the demo's output folder).

    ``data`` names the data set whose test images the VAE and schedule tabs show; by default
    the one recorded next to the checkpoints (data.json).
    """
    if not folders:
        if not (demo_dir.is_dir() and any(p.is_dir() for p in demo_dir.iterdir())):
            raise CheckpointError(f"no checkpoints given and none in {demo_dir}/; make them with "
                                  "`difflab demo` (or pass --ckpt DIR)")
        folders = [demo_dir]
    found: list[tuple[str, str, Path]] = []
    for f in folders:
        found += find_models(f)
    labels = [label for label, _, _ in found]
    if len(set(labels)) != len(labels):  # two folders with the same name: use full paths
        found = [(str(path), kind, path) for _, kind, path in found]

    diffusion = {label: load_diffusion(kind, path) for label, kind, path in found
                 if kind != "autoencoder"}
    ae_folders = [(label, path) for label, kind, path in found if kind == "autoencoder"]
    spec = data or next((n for n in ([recorded_spec(_data_info(p)) for _, p in ae_folders]
                                     + [e.data_name for e in diffusion.values()]) if n), None)
    images = None
    if spec is not None:
        try:
            images = load_test_images(spec)
        except DifflabError:
            if data is not None:  # asked for explicitly: say so
                raise
    autoencoders = {label: load_autoencoder(path, images) for label, path in ae_folders}
    # VAEs first: the tab is about them; an AE is there to compare
    autoencoders = dict(sorted(autoencoders.items(), key=lambda kv: not kv[1].is_vae))
    return Playground(autoencoders, diffusion, images, spec if images is not None else None)
