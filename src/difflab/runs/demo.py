"""``difflab demo``: the whole practical in a few minutes on a laptop CPU.

Trains (a) an autoencoder and (b) a VAE, both with a 2-D latent space so it can be drawn, and
(c) a small DDPM, on ``mnist5k`` by default; writes ``OUT/report.html`` with data examples,
reconstructions, prior samples, an interpolation, both latent spaces side by side (the AE's is
irregular, the VAE's is close to N(0, I)), DDPM samples and a denoising trajectory, and how long
each part took.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.config import Config, check_positive
from difflab.data import ImageDataset, load_dataset
from difflab.errors import DataError
from difflab.io import atomic_write_json
from difflab.models.autoencoder import Autoencoder, AutoencoderConfig
from difflab.models.vae import VAE, VAEConfig
from difflab.runs.autoencoders import (
    decode_images,
    encode_codes,
    latent_plane,
    random_latents,
)
from difflab.runs.diffusion import sample_images, train_diffusion, trajectory_figure
from difflab.training import TrainConfig, train
from difflab.training.objectives import DiffusionConfig
from difflab.viz import Report, make_grid, plot_latent_scatter, plot_loss_curves, save_image


@dataclass(kw_only=True)
class DemoConfig(Config):
    data: str = "mnist5k"  # data set name or image folder
    out: str = "runs/demo"  # output folder (report.html, models, pictures)
    minutes: float = 4.5  # total training budget, split AE 5% / VAE 10% / DDPM 85%
    guidance: float = 2.0  # classifier-free guidance scale (best FID-style of 0–7, RESULTS.md)
    seed: int = 0  # seeds everything: same seed, same machine ⇒ same report
    progress: bool = True  # progress bars

    def validate(self) -> None:
        check_positive("DemoConfig", "minutes", self.minutes)


def _fit(model: torch.nn.Module, data: ImageDataset, minutes: float, cfg: DemoConfig,
         desc: str, **train_kw: object):
    tcfg = TrainConfig(minutes=minutes, seed=cfg.seed, progress=cfg.progress,
                       channels_last=False, **train_kw)
    return train(model, data.images, data.labels, tcfg, desc=desc)


SWEEP = (0.0, 1.0, 2.0, 3.0, 7.0)  # guidance scales of the report's sweep


def run_demo(cfg: DemoConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: list[dict[str, object]] = []
    data = load_dataset(cfg.data, "train")
    try:
        test = load_dataset(cfg.data, "test")
    except DataError:  # a folder without a test split: show training images instead
        test = data
    c, h, w = data.image_shape
    if h != w:
        raise ValueError(f"{data.name}: the demo needs square images, got {h}×{w}")
    rep = Report(f"difflab demo — {data.name}")
    rep.text(f"{len(data)} training images of shape {c}×{h}×{w}, classes: "
             f"{', '.join(data.class_names)}. Budget {cfg.minutes:g} min of training, seed "
             f"{cfg.seed}.")
    rep.heading("Data")
    rep.image(make_grid(data.images[:64], 8, scale=max(1, 56 // h)), "training examples")
    show = test.images[:16]

    # (a) autoencoder and (b) VAE, both with a 2-D latent space so it can be drawn -----------
    def fit_timed(model: torch.nn.Module, share: float, label: str, folder: str):
        t0 = time.perf_counter()
        res = _fit(model, data, share * cfg.minutes, cfg, label, lr=1e-3, batch_size=128,
                   warmup_steps=50)
        timings.append({"part": f"{label} (2-D latent)", "steps": res.steps,
                        "seconds": time.perf_counter() - t0})
        res.model.save_pretrained(out / folder)
        return res

    torch.manual_seed(cfg.seed)
    ae_res = fit_timed(Autoencoder(AutoencoderConfig(arch="mlp", in_channels=c, image_size=h,
                                                     latent_dim=2, hidden=(512, 256))),
                       0.05, "autoencoder", "ae")
    torch.manual_seed(cfg.seed)
    vae_res = fit_timed(VAE(VAEConfig(arch="mlp", in_channels=c, image_size=h, latent_dim=2,
                                      hidden=(512, 256), likelihood="bernoulli")),
                        0.10, "VAE", "vae")
    ae, vae = ae_res.model, vae_res.model

    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        ae_rec, vae_rec = ae(show), vae(show)
    rep.heading("Autoencoder and VAE")
    plot_loss_curves({"AE (MSE)": [(r["step"], r["loss"]) for r in ae_res.history],
                      "VAE (loss per pixel)": [(r["step"], r["loss"]) for r in vae_res.history]},
                     out / "ae_vae_loss.png", title="AE / VAE training loss")
    rep.image(out / "ae_vae_loss.png", "training loss")
    rep.image(make_grid(torch.cat([show, ae_rec.clamp(-1, 1), vae_rec]), 16,
                        scale=max(1, 40 // h)),
              "rows: test images, AE reconstructions, VAE reconstructions (2-D codes)")
    rep.image(make_grid(vae.sample(32, g), 8, scale=max(1, 56 // h)),
              "VAE samples from the prior z ~ N(0, I)")
    rep.image(make_grid(vae.interpolate(show[0], show[1], 10), 10, scale=max(1, 56 // h)),
              "VAE: decoding the straight line between two encoded test images")

    # latent spaces side by side + regularity
    z_ae = encode_codes(ae, test.images).numpy()
    z_vae = encode_codes(vae, test.images).numpy()
    y = test.labels.numpy()
    plot_latent_scatter(z_ae, y, test.class_names, out / "ae_latent.png",
                        title="AE latent space (test set)")
    plot_latent_scatter(z_vae, y, test.class_names, out / "vae_latent.png",
                        title="VAE latent space (test set)")
    rep.heading("Latent spaces: AE vs VAE")
    rep.image(out / "ae_latent.png", "AE: codes anywhere, any scale, gaps between classes")
    rep.image(out / "vae_latent.png", "VAE: codes pulled towards N(0, I) by the KL term")
    # for the AE, "random points" use the Gaussian fitted to its codes: its best chance
    z_train_ae = encode_codes(ae, data.images)
    ae_rand, vae_rand = (
        decode_images(m, random_latents(m, z_train_ae, 32, torch.Generator().manual_seed(
            cfg.seed + 1)), data.image_shape) for m in (ae, vae))  # the same ε for both
    rep.image(make_grid(ae_rand, 8, scale=max(1, 40 // h)),
              "AE: decoding random latent points (Gaussian fitted to the training codes)")
    rep.image(make_grid(vae_rand, 8, scale=max(1, 40 // h)),
              "VAE: decoding the same standard-normal points")
    rep.image(make_grid(latent_plane(vae, data.image_shape), 12, padding=0,
                        scale=max(1, 28 // h)),
              "VAE: the decoded latent plane, z₁, z₂ ∈ [−2, 2]")

    # (c) DDPM ----------------------------------------------------------------------------
    # Class-conditional with label dropout, sampled with classifier-free guidance: at this
    # budget (~1,100 steps of 32 images on 2 cores in float32, ~1,500 in bf16) unconditional
    # samples are still mostly stroke soup, guided ones are clearly digits (measured;
    # benchmarks/RESULTS.md).
    t0 = time.perf_counter()
    run = train_diffusion(data, out_dir=out / "ddpm", report=False, cond_class=True,
                          train_cfg=TrainConfig(minutes=0.85 * cfg.minutes, seed=cfg.seed,
                                                progress=cfg.progress, batch_size=32, lr=2e-3,
                                                warmup_steps=100, mixed_precision="auto"),
                          diffusion_cfg=DiffusionConfig(p_uncond=0.1))
    train_s = time.perf_counter() - t0
    k = data.num_classes
    labels = torch.arange(6 * k) % k
    t0 = time.perf_counter()
    res = sample_images(run.bundle, len(labels), scheduler="dpm++", steps=25, seed=cfg.seed,
                        class_labels=labels, guidance_scale=cfg.guidance,
                        return_trajectory=True)
    sample_s = time.perf_counter() - t0
    sweep = [sample_images(run.bundle, k, scheduler="dpm++", steps=25, seed=cfg.seed + 1,
                           class_labels=torch.arange(k), guidance_scale=gs).images
             for gs in SWEEP]
    precision = "bf16 autocast" if run.precision == "bf16" else "float32"
    timings.append({"part": f"DDPM U-Net (class-conditional, {precision})", "steps": run.steps,
                    "seconds": train_s})
    timings.append({"part": f"DDPM sampling ({len(labels)} images, DPM-Solver++ 25 steps, "
                            "guided: 2 U-Net passes per step)", "steps": 25,
                    "seconds": sample_s})
    rep.heading("Diffusion (DDPM)")
    rep.text(f"U-Net with {run.bundle.unet.num_parameters / 1e6:.2f} M parameters, ε-prediction, "
             f"cosine schedule, Min-SNR-5 weighting, {run.steps} steps of batch 32 in {precision} "
             f"(bf16 where the CPU or GPU multiplies bf16 natively); class "
             f"labels dropped 10% of the time so one network is both conditional and "
             f"unconditional (classifier-free guidance).")
    plot_loss_curves({"loss": [(r["step"], r["loss"]) for r in run.history]},
                     out / "ddpm_loss.png", title="DDPM training loss")
    rep.image(out / "ddpm_loss.png", "training loss")
    rep.image(save_image(make_grid(res.images * 2 - 1, k, scale=max(1, 56 // h)),
                         out / "ddpm_samples.png"),
              f"DDPM samples, one class per column ({', '.join(data.class_names)}), "
              f"guidance scale {cfg.guidance:g}")
    rep.image(make_grid(torch.cat(sweep) * 2 - 1, k, scale=max(1, 40 // h)),
              "Guidance sweep, same noise: rows g = " + ", ".join(f"{g:g}" for g in SWEEP) +
              " (0: unconditional, 1: conditional)")
    rep.image(save_image(trajectory_figure(res.trajectory), out / "ddpm_trajectory.png"),
              "Denoising trajectory. Rows: x_t; the network's prediction of the WHOLE noise ε; "
              "the implied clean image x̂₀; x_{t−1} — the scheduler removes only part of the "
              "noise at each step.")

    total = time.perf_counter() - t_start
    timings.append({"part": "total (incl. data, pictures)", "steps": "", "seconds": total})
    rep.heading("Timings")
    rep.table(timings)
    atomic_write_json(out / "timings.json", timings)
    return rep.save(out / "report.html")
