"""AE vs VAE latent regularity: the same architecture and budget, random latent points decoded
and judged (``difflab experiment ae-vs-vae``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.config import Config
from difflab.data import load_dataset
from difflab.errors import ConfigError
from difflab.io import atomic_write_json
from difflab.runs.autoencoders import (
    code_cloud,
    decode_images,
    encode_codes,
    grid_scale,
    model_config,
    plot_codes,
    random_latents,
    train_autoencoder,
    train_test_split,
)
from difflab.runs.judge import score_samples, train_classifier
from difflab.training import TrainConfig
from difflab.viz import Report, make_grid


def hole_fraction(z: Tensor, train_codes: Tensor, test_codes: Tensor, q: float = 0.99) -> float:
    """Fraction of random latent points z (n, k) that fall in a "hole": farther from every
    training code than ``q`` of the test images' codes are (distances to the nearest training
    code). If z has the distribution of the codes this is ≈ 1 − q; for a VAE pass codes from
    :func:`code_cloud` (posterior samples), for an AE its codes."""
    def nn_dist(a: Tensor) -> Tensor:
        return torch.cat([torch.cdist(a[i:i + 1000], train_codes).min(1).values
                          for i in range(0, len(a), 1000)])

    threshold = torch.quantile(nn_dist(test_codes), q)
    return float((nn_dist(z) > threshold).double().mean())


@dataclass(kw_only=True)
class AEvsVAEConfig(Config):
    data: str = "mnist5k"  # data set name or image folder
    image_size: int | None = None  # resize images to this side (None: native)
    out: str = "runs/ae-vs-vae"  # output folder (report.html, results.json, figures)
    arch: str = "mlp"  # "mlp" or "conv", the same for both models
    latent_dim: int = 2  # the same latent size for both; 2 can be drawn
    hidden: tuple[int, ...] = (512, 256)  # MLP widths / conv channels of both models
    n_samples: int = 2000  # random latent points decoded and scored per model
    seed: int = 0  # seeds the models, their training, the classifier and the random points

    def validate(self) -> None:
        for name in ("latent_dim", "n_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"AEvsVAEConfig.{name}={getattr(self, name)} must be >= 1")


def run_ae_vs_vae(cfg: AEvsVAEConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    """Train an AE and a VAE with the same architecture and budget (``train_cfg`` each), decode
    random latent points of both (VAE: N(0, I); AE: Gaussian fitted to its codes) and score them
    with a classifier trained on the train split. Writes ``results.json`` and ``report.html``;
    returns {"classifier_accuracy", "rows": [per-model scores], "report"}."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(cfg.data, "train", image_size=cfg.image_size)
    data, test = train_test_split(cfg.data, cfg.image_size, data)
    shape = data.image_shape
    t0 = time.perf_counter()
    clf = train_classifier(data, seed=cfg.seed)
    with torch.no_grad():
        acc = float((clf(test.images).argmax(1) == test.labels).double().mean())
    clf_s = time.perf_counter() - t0
    real = score_samples(clf, test.images, data.num_classes)
    rows = [{"model": "test images", "steps": "", "train s": "", "test MSE": "",
             "confidence": real["mean_confidence"], "conf>0.9": real["frac_confident"],
             "class entropy": real["class_entropy"], "in holes": ""}]
    decoded, scatters = {}, {}
    for kind in ("ae", "vae"):
        mcfg = model_config(kind, data, arch=cfg.arch, latent_dim=cfg.latent_dim,
                            hidden=cfg.hidden)
        run = train_autoencoder(mcfg, data, test, train_cfg, out_dir=out / kind, report=False,
                                image_size=cfg.image_size, eval_n=2000, iwae_k=10)
        model = run.model
        train_codes = encode_codes(model, data.images)
        test_codes = encode_codes(model, test.images)
        g = torch.Generator().manual_seed(cfg.seed + 1)  # the same ε for both models
        z = random_latents(model, train_codes, cfg.n_samples, g)
        holes = hole_fraction(z, code_cloud(model, data.images, g),
                              code_cloud(model, test.images, g))
        decoded[kind] = decode_images(model, z, shape)
        s = score_samples(clf, decoded[kind], data.num_classes)
        rows.append({"model": "AE, z ~ Gaussian fit to codes" if kind == "ae" else
                     "VAE, z ~ N(0, I)", "steps": run.metrics["train_steps"],
                     "train s": run.metrics["train_seconds"],
                     "test MSE": run.metrics["test_mse"], "confidence": s["mean_confidence"],
                     "conf>0.9": s["frac_confident"], "class entropy": s["class_entropy"],
                     "in holes": holes})
        scatters[kind] = plot_codes(test_codes, test.labels, test.class_names,
                                    out / f"{kind}_latent.png",
                                    title=f"{kind.upper()} latent space (test set)")

    result = {"data": data.name, "latent_dim": cfg.latent_dim, "classifier_accuracy": acc,
              "classifier_seconds": clf_s, "rows": rows, "config": cfg.to_dict(),
              "train": train_cfg.to_dict()}
    atomic_write_json(out / "results.json", result)

    h = shape[1]
    rep = Report(f"difflab — AE vs VAE latent regularity on {data.name}")
    rep.text(f"Both models: {cfg.arch} {cfg.hidden}, latent dimension {cfg.latent_dim}, the "
             f"same training budget. {cfg.n_samples} random latent points per model are decoded "
             f"and judged by an MLP classifier trained on the train split ({acc:.1%} test "
             "accuracy). The AE has no prior, so its random points come from the full-covariance "
             "Gaussian fitted to its training codes — its best chance. \"In holes\": fraction of "
             "random points farther from every training code than 99% of test-image codes are "
             "(≈ 0.01 when the random points are distributed like the codes; a VAE's codes "
             "here are posterior samples z ~ q(z|x), whose mixture the prior should match).")
    rep.table(rows)
    rep.heading("Decoded random latent points")
    for kind, caption in (("ae", "AE: z ~ Gaussian fitted to its codes"),
                          ("vae", "VAE: z ~ N(0, I), the same ε")):
        rep.image(make_grid(decoded[kind][:64], 8, scale=grid_scale(h, 32)), caption)
    rep.heading("Latent spaces (test set)")
    for kind in ("ae", "vae"):
        rep.image(out / f"{kind}_latent.png", f"{kind.upper()}: {scatters[kind]}", width=420)
    result["report"] = str(rep.save(out / "report.html"))
    return result


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of dict rows (floats to 4 significant digits)."""
    cols = list(rows[0])
    cells = [[c for c in cols]] + [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])
                                    for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                       for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
