"""Train and look inside autoencoders and VAEs: ``difflab train ae|vae|linear-ae`` (the
experiments ``ae-vs-vae`` and ``pca-vs-linear-ae`` build on this, in ``difflab.experiments``).

A run folder ``OUT/`` holds ``model/`` (checkpoint folder: ``config.json``, ``model.safetensors``,
``data.json`` naming the data set it was trained on), ``checkpoint/`` (training state for
``--resume``), ``metrics.json``, ``report.html`` and the PNG figures the report embeds.

Every model trains through :func:`difflab.training.train` (its ``training_loss``); this module
only builds configs from the data, writes the pictures and measures.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.config import Config
from difflab.data import (
    ImageDataset,
    dataset_record,
    folder_without_test_split,
    load_dataset,
    recorded_spec,
)
from difflab.errors import CheckpointError, ConfigError, DataError, a_or_an
from difflab.io import atomic_write_json, model_dir, read_json
from difflab.metrics.likelihood import evaluate_likelihood
from difflab.models.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    LinearAutoencoder,
    LinearAutoencoderConfig,
)
from difflab.models.base import ModelMixin, load_model
from difflab.models.vae import VAE, VAEConfig
from difflab.training import TrainConfig, train
from difflab.viz import Report, make_grid, plot_latent_scatter, plot_loss_curves

# One explicit name → model class map for ``difflab train <kind>``.
MODEL_KINDS: dict[str, type[ModelMixin]] = {
    "ae": Autoencoder, "vae": VAE, "linear-ae": LinearAutoencoder}

# Measured default recipe (benchmarks/RESULTS.md, "Autoencoders and VAEs"): a 16-d MLP VAE on
# mnist5k has test IWAE NLL 159 / 133 / 115 / 107 / 103 nats after 10 / 20 / 40 / 80 / 160
# epochs (352 … 5,625 steps) — no overfitting yet, diminishing returns. A fixed step count
# (not epochs) keeps the default run ~2 min on a 2-core CPU whatever the data set's size.
DEFAULT_TRAIN: dict[str, object] = dict(batch_size=128, lr=1e-3, warmup_steps=50,
                                        max_steps=3000, ema_decay=0.999)


def default_likelihood(data: ImageDataset) -> str:
    """Bernoulli for grey-scale (MNIST-like, mostly black/white) data, Gaussian for colour."""
    return "bernoulli" if data.image_shape[0] == 1 else "gaussian"


def num_levels(images: Tensor) -> int:
    """How many equally spaced intensity levels the data lie on: 256 (8-bit) or 17 (sklearn
    digits, 0..16); 256 when neither grid fits (resized images are no longer on a grid)."""
    p = ((images[:2000].double() + 1) / 2).flatten()
    for levels in (256, 17):
        if torch.all((p * (levels - 1) - torch.round(p * (levels - 1))).abs() < 1e-3):
            return levels
    return 256


def model_config(kind: str, data: ImageDataset, *, arch: str = "mlp", latent_dim: int = 16,
                 hidden: tuple[int, ...] = (512, 256), likelihood: str | None = None,
                 C: float = 50.0, beta: float = 1.0, tied: bool = False) -> Config:
    """The config of a ``kind`` model sized for ``data`` (channels, side, intensity levels)."""
    c, h, w = data.image_shape
    if h != w:
        raise ConfigError(f"{data.name}: images are {h}×{w}; autoencoders need square images "
                          "(use --image-size)")
    if kind == "ae":
        return AutoencoderConfig(arch=arch, in_channels=c, image_size=h, latent_dim=latent_dim,
                                 hidden=hidden)
    if kind == "vae":
        return VAEConfig(arch=arch, in_channels=c, image_size=h, latent_dim=latent_dim,
                         hidden=hidden, likelihood=likelihood or default_likelihood(data), C=C,
                         beta=beta, num_levels=num_levels(data.images))
    if kind == "linear-ae":
        return LinearAutoencoderConfig(in_channels=c, image_size=h, latent_dim=latent_dim,
                                       tied=tied, center=True)
    raise ConfigError(f"unknown model kind {kind!r}; choose one of {sorted(MODEL_KINDS)}")


def build_model(config: Config, data: ImageDataset | None = None) -> ModelMixin:
    """The model for ``config`` (seeded by the caller); a centred linear AE gets the data mean."""
    cls = next(c for c in MODEL_KINDS.values() if isinstance(config, c.config_class))
    model = cls(config)
    if isinstance(model, LinearAutoencoder) and model.config.center and data is not None:
        model.set_data_mean(data.images)
    return model


def train_test_split(spec: str, image_size: int | None, train: ImageDataset, *,
                     fraction: float = 0.1, seed: int = 0, channels: int | None = None
                     ) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)``: ``train`` and the test split of ``spec``; a folder without a ``test/``
    split instead holds out a seeded ``fraction`` of ``train`` (at least two images) as the test
    set, and trains on the rest. Testing on the training images would make every held-out
    score meaningless (an autoencoder's "test" codes would be its training codes)."""
    if not folder_without_test_split(spec):
        return train, load_dataset(spec, "test", image_size=image_size, channels=channels)
    n = len(train)
    if n < 2:
        raise DataError(f"{spec}: {n} image: at least 2 are needed to hold one out as the "
                        "test set (or add a test/ folder)")
    k = max(2 if n >= 4 else 1, round(n * fraction))  # two for the report's interpolation
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    print(f"{spec}: no test/ folder; holding out {k} of its {n} images as the test set",
          file=sys.stderr)

    def part(index: Tensor, split: str) -> ImageDataset:
        index = index.sort().values
        return dataclasses.replace(train, images=train.images[index],
                                   labels=train.labels[index], split=split)

    return part(order[k:], "train"), part(order[:k], "test")


# ------------------------------------------------------------------------ latent-space tools
@torch.no_grad()
def encode_codes(model: nn.Module, images: Tensor, batch: int = 1000) -> Tensor:
    """Codes (N, k) of images (N, C, H, W): z = e(x) for AEs, the posterior mean μ(x) for VAEs."""
    out = []
    for i in range(0, len(images), batch):
        z = model.encode(images[i:i + batch])
        out.append(z.mean if isinstance(model, VAE) else z)
    return torch.cat(out)


@torch.no_grad()
def decode_images(model: nn.Module, z: Tensor, image_shape: tuple[int, int, int]) -> Tensor:
    """Decoded images (B, C, H, W) in [-1, 1] (clamped) from codes z (B, k)."""
    return model.decode(z).reshape(len(z), *image_shape).clamp(-1.0, 1.0)


@torch.no_grad()
def code_cloud(model: nn.Module, images: Tensor, generator: torch.Generator | None = None,
               batch: int = 1000) -> Tensor:
    """Where the data put the model in latent space, (N, k): z = e(x) for an AE; one draw
    z ~ q(z | x) per image for a VAE (samples of its aggregate posterior, which the prior
    N(0, I) should match — posterior *means* are shrunk towards 0 and would not)."""
    if not isinstance(model, VAE):
        return encode_codes(model, images, batch)
    return torch.cat([model.encode(images[i:i + batch]).sample(generator)
                      for i in range(0, len(images), batch)])


def fit_gaussian(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (k,) and Cholesky factor L (k, k) of the full-covariance Gaussian fitted to the
    codes (N, k): the best Gaussian an AE's latent space can offer as a "prior"."""
    z = codes.double()
    mu = z.mean(0)
    cov = torch.atleast_2d(torch.cov(z.T)) + 1e-6 * torch.eye(z.shape[1], dtype=z.dtype)
    return mu.float(), torch.linalg.cholesky(cov).float()


def random_latents(model: nn.Module, codes: Tensor, n: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """n random codes (n, k): z ~ N(0, I) for a VAE (its prior); for an AE, z ~ the Gaussian
    fitted to its training codes (it has no prior of its own)."""
    eps = torch.randn(n, codes.shape[1], generator=generator)
    if isinstance(model, VAE):
        return eps
    mu, L = fit_gaussian(codes)
    return mu + eps @ L.T


@torch.no_grad()
def latent_plane(model: nn.Module, image_shape: tuple[int, int, int], n: int = 12,
                 span: float = 2.0) -> Tensor:
    """Decoded grid of a 2-D latent plane, (n·n, C, H, W), z₁ left→right, z₂ top→bottom
    decreasing, both over [−span, span]."""
    axis = torch.linspace(-span, span, n)
    grid_z = torch.stack(torch.meshgrid(axis, axis.flip(0), indexing="xy"), -1).reshape(-1, 2)
    return decode_images(model, grid_z, image_shape)


@torch.no_grad()
def interpolate_codes(model: nn.Module, x_a: Tensor, x_b: Tensor, steps: int = 10) -> Tensor:
    """Decode the straight line between the codes of x_a, x_b (C, H, W): (steps, C, H, W)."""
    z = encode_codes(model, torch.stack([x_a, x_b]))
    w = torch.linspace(0.0, 1.0, steps)[:, None]
    return decode_images(model, (1 - w) * z[0] + w * z[1], tuple(x_a.shape))


def plot_codes(codes: Tensor, labels: Tensor, class_names: list[str], path: Path,
               title: str) -> str:
    """Scatter the codes coloured by class; k ≠ 2 codes are projected on their top-2 principal
    components first. Returns a caption that says which."""
    z = codes.double().numpy()
    k = z.shape[1]
    if k == 2:
        how = "the 2-D codes"
    elif k == 1:
        z, how = np.concatenate([z, np.zeros_like(z)], 1), "the 1-D codes (on the z₁ axis)"
    else:
        from sklearn.decomposition import PCA

        pca = PCA(2).fit(z)
        z = pca.transform(z)
        how = (f"a 2-D PCA projection of the {k}-D codes (it keeps "
               f"{100 * pca.explained_variance_ratio_.sum():.0f}% of their variance)")
    plot_latent_scatter(z, labels.numpy(), class_names, path, title=title)
    return how


def grid_scale(h: int, target: int = 56) -> int:
    return max(1, target // h)


# ------------------------------------------------------------------------------ train + report
@dataclass
class AutoencoderRun:
    model: ModelMixin  # the trained model (EMA weights), on the CPU, in eval mode
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    out_dir: Path


def data_info(data: ImageDataset, image_size: int | None) -> dict[str, Any]:
    """What ``model/data.json`` records, so that evaluation can reload the same data."""
    return {**dataset_record(data), "image_size": image_size}


def train_autoencoder(config: Config, data: ImageDataset, test: ImageDataset,
                      train_cfg: TrainConfig, *, out_dir: str | Path,
                      image_size: int | None = None, resume: bool = False, iwae_k: int = 100,
                      eval_n: int | None = 2000, report: bool = True) -> AutoencoderRun:
    """Train the model of ``config`` on ``data``; write ``model/``, ``metrics.json`` and (with
    ``report``) ``report.html``. VAE metrics: test ELBO and IWAE NLL with ``iwae_k`` samples on
    the first ``eval_n`` test images; AE metrics: test MSE (and the PCA angles for linear AEs)."""
    out = Path(out_dir)
    torch.manual_seed(train_cfg.seed)
    model = build_model(config, data)
    kind = next(k for k, c in MODEL_KINDS.items() if isinstance(model, c))
    res = train(model, data.images, data.labels, train_cfg, out_dir=out, resume=resume,
                desc=f"{kind} {data.name}")
    model = res.model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    if not res.is_main_process:  # many processes: only the main one writes the run folder
        return AutoencoderRun(model, {}, res.history, out)
    model.save_pretrained(out / "model", extra_files={"data.json": data_info(data, image_size)})
    metrics: dict[str, Any] = {
        "kind": kind, "data": data.name, "train_steps": res.steps,
        "train_seconds": res.seconds, "final_loss": res.final("loss"),
        "parameters": model.num_parameters, "skipped_nonfinite": res.skipped_nonfinite}
    ev = test.subset(min(eval_n or len(test), len(test)))
    with torch.no_grad():
        rec = torch.cat([model(ev.images[i:i + 500]).reshape(-1, *ev.image_shape)
                         for i in range(0, len(ev), 500)])
    metrics["test_mse"] = float(F.mse_loss(rec, ev.images))
    if isinstance(model, VAE):
        like = evaluate_likelihood(model, ev.images, k=iwae_k, progress=False,
                                   generator=torch.Generator().manual_seed(train_cfg.seed))
        metrics["test_likelihood"] = like
    if isinstance(model, LinearAutoencoder):
        metrics["pca"] = _pca_agreement(model, data)
    atomic_write_json(out / "metrics.json", metrics)
    run = AutoencoderRun(model, metrics, res.history, out)
    if report:
        write_autoencoder_report(run, data, test, seed=train_cfg.seed)
    return run


def _pca_agreement(model: LinearAutoencoder, data: ImageDataset) -> dict[str, Any]:
    """Principal angles between the linear AE's decoder span and the top-k PCA subspace."""
    from sklearn.decomposition import PCA

    from difflab.metrics.subspace import principal_angles

    X = data.images.reshape(len(data), -1).double().numpy()
    pca = PCA(model.config.latent_dim, svd_solver="full").fit(X)
    mse_pca = float(np.mean((X - pca.inverse_transform(pca.transform(X))) ** 2))
    angles = principal_angles(model.basis.detach(), torch.from_numpy(pca.components_).T,
                              degrees=True)
    return {"max_principal_angle_deg": float(angles.max()),
            "mean_principal_angle_deg": float(angles.mean()), "train_mse_pca": mse_pca}


def write_autoencoder_report(run: AutoencoderRun, data: ImageDataset, test: ImageDataset,
                             seed: int = 0) -> Path:
    """``OUT/report.html``: loss curves, reconstructions, samples, interpolation, the latent
    space, the decoded latent plane (2-D VAEs), and the test metrics."""
    out, model, m = run.out_dir, run.model, run.metrics
    shape = data.image_shape
    h = shape[1]
    cfg = model.config
    rep = Report(f"difflab — {m['kind']} on {data.name}")
    rep.text(f"{type(model).__name__} with {model.num_parameters / 1e6:.3g} M parameters, "
             f"latent dimension {cfg.latent_dim}; trained {m['train_steps']} steps in "
             f"{m['train_seconds']:.0f} s on {len(data)} images of shape "
             f"{'×'.join(map(str, shape))}.")
    rep.text("Model config: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()),
             note=True)

    rep.heading("Training")
    curves = {"loss": [(r["step"], r["loss"]) for r in run.history]}
    plot_loss_curves(curves, out / "loss.png", title=f"{m['kind']} training loss")
    rep.image(out / "loss.png", "training loss (VAE: (recon + β·KL) per dimension; AE: MSE)")
    if isinstance(model, VAE):
        plot_loss_curves({k: [(r["step"], r[k]) for r in run.history if k in r]
                          for k in ("recon", "kl")}, out / "recon_kl.png",
                         title="reconstruction and KL per image")
        rep.image(out / "recon_kl.png", "the two terms of the training objective per image "
                  "(KL in nats; reconstruction in nats for Bernoulli, C·‖t − f(z)‖² for the "
                  "Gaussian: its −log density without the constant)")

    rep.heading("Reconstructions")
    show = test.images[:16]
    with torch.no_grad():
        rec = model(show).reshape(len(show), *shape).clamp(-1, 1)
    rep.image(make_grid(torch.cat([show, rec]), 16, scale=grid_scale(h, 40)),
              f"top: test images; bottom: reconstructions (test MSE {m['test_mse']:.4g} on "
              "the [-1, 1] scale)")

    rep.heading("Samples and interpolation")
    g = torch.Generator().manual_seed(seed)
    codes = encode_codes(model, data.images[:5000])
    samples = decode_images(model, random_latents(model, codes, 64, g), shape)
    rep.image(make_grid(samples, 8, scale=grid_scale(h)),
              "samples from the prior z ~ N(0, I), decoder mean" if isinstance(model, VAE) else
              "decoded random codes z ~ N(m, S), the Gaussian fitted to the training codes "
              "(an autoencoder has no prior)")
    pair, which = (test, "test") if len(test) >= 2 else (data, "training")
    rep.image(make_grid(interpolate_codes(model, pair.images[0], pair.images[1]), 10,
                        scale=grid_scale(h)),
              f"decoding the straight line between the codes of two {which} images")

    rep.heading("Latent space")
    test_codes = encode_codes(model, test.images[:2000])
    how = plot_codes(test_codes, test.labels[:2000], test.class_names, out / "latent.png",
                     title=f"{m['kind']} latent space (test set)")
    rep.image(out / "latent.png", f"test-set codes coloured by class: {how}")
    if isinstance(model, VAE) and cfg.latent_dim == 2:
        rep.image(make_grid(latent_plane(model, shape), 12, padding=0, scale=grid_scale(h, 28)),
                  "the decoded latent plane, z₁, z₂ ∈ [−2, 2]")
    if isinstance(model, LinearAutoencoder):
        basis = model.basis.detach().T.reshape(-1, *shape)  # (k, C, H, W)
        basis = basis / basis.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        rep.image(make_grid(basis[:32], 8, scale=grid_scale(h)),
                  "decoder columns W[:, i] as images (grey = 0): a basis of the learned "
                  "subspace, not the principal components themselves")
        pca = m["pca"]
        rep.text(f"Largest principal angle between span(W) and the top-{cfg.latent_dim} PCA "
                 f"subspace of the training data: {pca['max_principal_angle_deg']:.3g}° (mean "
                 f"{pca['mean_principal_angle_deg']:.3g}°); train MSE of PCA "
                 f"{pca['train_mse_pca']:.4g}. Minibatch Adam gets close; `difflab experiment "
                 "pca-vs-linear-ae` trains to convergence and gets ≈ 0°.")

    if isinstance(model, VAE):
        like = m["test_likelihood"]
        rep.heading("Likelihood (test set)")
        rep.text(f"Likelihood: {like['likelihood_kind']}. First {like['num_images']} test "
                 f"images, one binarisation/quantisation per image shared by both bounds; "
                 f"IWAE with k = {like['k']} importance samples (`difflab eval --metric nll` "
                 "uses k = 1000). Nats per image and bits per dimension "
                 f"(D = {like['data_dim']}), ± standard error over images.")
        rep.table([
            {"bound": "−ELBO", "nats": like["nelbo_nats"], "± nats": like["nelbo_nats_sem"],
             "bits/dim": like["nelbo_bits_per_dim"]},
            {"bound": f"IWAE NLL (k={like['k']})", "nats": like["iwae_nll_nats"],
             "± nats": like["iwae_nll_nats_sem"], "bits/dim": like["iwae_nll_bits_per_dim"]}])
    return rep.save(out / "report.html")


# ---------------------------------------------------------------------------- evaluation API
def evaluate_vae_checkpoint(folder: str | Path, split: str = "test", k: int = 1000,
                            n: int | None = None, *, data: str | None = None, seed: int = 0,
                            progress: bool = False) -> dict[str, Any]:
    """Test ELBO and IWAE NLL (k importance samples) of a VAE checkpoint folder (or run folder).

    The data set is the one recorded in ``model/data.json`` unless ``data`` names another;
    ``n`` limits the evaluation to the first n images of ``split``. Returns the dict of
    :func:`difflab.metrics.likelihood.evaluate_likelihood` plus "data", "split", "checkpoint".
    """
    folder = model_dir(folder)
    model = load_model(folder)
    if not isinstance(model, VAE):
        raise CheckpointError(f"{folder}: holds {a_or_an(type(model).__name__)}; the "
                              "likelihood needs a VAE checkpoint")
    info = read_json(folder / "data.json") if (folder / "data.json").is_file() else {}
    spec = data or recorded_spec(info)
    if spec is None:
        raise CheckpointError(f"{folder}: no data.json says which data set the VAE was trained "
                              "on; name one (--data)")
    size = info.get("image_size") if data is None else None
    channels = (info.get("image_shape") or [None])[0] if data is None else None
    if split == "test" and folder_without_test_split(spec):
        # a folder without test/: the images training held out (train_test_split)
        train = load_dataset(spec, "train", image_size=size, channels=channels)
        ds = train_test_split(spec, size, train, channels=channels)[1]
    else:
        ds = load_dataset(spec, split, image_size=size, channels=channels)
    c = model.config
    if ds.image_shape != (c.in_channels, c.image_size, c.image_size):
        raise DataError(f"{spec} images are {ds.image_shape}, the VAE expects "
                        f"{(c.in_channels, c.image_size, c.image_size)}")
    if n is not None:
        ds = ds.subset(min(n, len(ds)))
    res = evaluate_likelihood(model, ds.images, k=k, progress=progress,
                              generator=torch.Generator().manual_seed(seed))
    return {**res, "data": ds.name, "split": split, "checkpoint": str(folder)}
