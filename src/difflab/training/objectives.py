"""Training objectives: what a network is asked to predict, and how errors are weighted.

The diffusion objective (Ho et al. 2020, Alg. 1) draws t ~ U{0..T−1}, ε ~ N(0, I), forms
x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε and regresses the U-Net output onto the target of the chosen
parameterisation:

    epsilon:       target = ε                                 (DDPM)
    v_prediction:  target = v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀           (Salimans & Ho 2022, §4)
    sample:        target = x₀

Min-SNR-γ weighting (Hang et al. 2023, arXiv:2303.09556) caps the weight of easy, low-noise
steps: with SNR_t = ᾱ_t/(1−ᾱ_t) the x₀-space weight is min(SNR_t, γ), i.e. min(SNR,γ)/SNR for ε
and min(SNR,γ)/(SNR+1) for v. Classifier-free guidance (Ho & Salimans 2022) trains the
unconditional model jointly by replacing the label by the "null" class with probability p_uncond.

:class:`LatentDiffusionObjective` is the same objective on the latents of a frozen autoencoder,
conditioned on a frozen text encoder's embeddings of generated captions (latent diffusion).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflab.config import Config, check_choice, check_positive
from difflab.errors import ConfigError
from difflab.rng import batch_rand, batch_randint, batch_randn
from difflab.schedulers import DDPMScheduler
from difflab.schedulers._common import append_dims

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(kw_only=True)
class DiffusionConfig(Config):
    num_train_timesteps: int = 1000  # T, the length of the forward chain
    beta_schedule: str = "squaredcos_cap_v2"  # cosine: keeps information longer than linear
    beta_start: float = 0.0001  # β_1 of the linear schedules
    beta_end: float = 0.02  # β_T of the linear schedules
    prediction_type: str = "epsilon"  # what the network outputs: epsilon | v_prediction | sample
    min_snr_gamma: float | None = 5.0  # Min-SNR-γ loss weighting; None = plain MSE on the target
    p_uncond: float = 0.0  # probability of dropping the class label (classifier-free guidance)
    rescale_betas_zero_snr: bool = False  # force ᾱ_T = 0 (Lin et al. 2023); use with v_prediction

    def validate(self) -> None:
        check_choice("DiffusionConfig", "prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_positive("DiffusionConfig", "num_train_timesteps", self.num_train_timesteps)
        if self.min_snr_gamma is not None:
            check_positive("DiffusionConfig", "min_snr_gamma", self.min_snr_gamma)
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ConfigError(f"DiffusionConfig.p_uncond={self.p_uncond} must be in [0, 1]")

    def make_scheduler(self) -> DDPMScheduler:
        """The training noise schedule as a (DDPM) scheduler; samplers are built from its config."""
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps,
                             beta_schedule=self.beta_schedule, beta_start=self.beta_start,
                             beta_end=self.beta_end, prediction_type=self.prediction_type,
                             rescale_betas_zero_snr=self.rescale_betas_zero_snr, clip_sample=False)


class DiffusionObjective(nn.Module):
    """Wraps a U-Net with the forward process; ``training_loss`` is Alg. 1 of DDPM (+ weighting)."""

    def __init__(self, unet: nn.Module, config: DiffusionConfig) -> None:
        super().__init__()
        self.unet = unet
        self.config = config
        ab = config.make_scheduler().alphas_cumprod.double()
        self.register_buffer("sqrt_ab", ab.sqrt().float(), persistent=False)  # √ᾱ_t
        self.register_buffer("sqrt_1mab", (1 - ab).sqrt().float(), persistent=False)  # √(1−ᾱ_t)
        self.register_buffer("snr", (ab / (1 - ab).clamp_min(1e-20)).float(), persistent=False)
        num_class_embeds = getattr(getattr(unet, "config", None), "num_class_embeds", None)
        self.null_class = None if num_class_embeds is None else num_class_embeds - 1

    def training_loss(self, batch: dict[str, torch.Tensor],
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        x0 = batch["images"]  # (B, C, H, W) in [-1, 1]
        t, noise, x_t = self.noised(x0, generator)
        labels = None
        if self.null_class is not None:
            labels = batch["labels"].clone()
            if self.config.p_uncond > 0:
                drop = batch_rand((len(x0),), generator, device=x0.device)
                labels[drop < self.config.p_uncond] = self.null_class
        pred = self.unet(x_t, t, class_labels=labels).sample
        return self.weighted_loss(pred, t, noise, x0)

    def noised(self, x0: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw t ~ U{0..T−1} (B,) and ε ~ N(0, I); return (t, ε, x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε)."""
        b, dev = x0.shape[0], x0.device
        t = batch_randint(0, self.config.num_train_timesteps, (b,), generator, device=dev)
        noise = batch_randn(x0.shape, generator, device=dev, dtype=x0.dtype)
        a, s = append_dims(self.sqrt_ab[t], 4), append_dims(self.sqrt_1mab[t], 4)
        return t, noise, a * x0 + s * noise

    def weighted_loss(self, pred: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                      x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """The (Min-SNR-weighted) MSE of the network output ``pred`` against its target."""
        cfg = self.config
        a, s = append_dims(self.sqrt_ab[t], 4), append_dims(self.sqrt_1mab[t], 4)
        if cfg.prediction_type == "epsilon":
            target = noise
        elif cfg.prediction_type == "v_prediction":
            target = a * noise - s * x0
        else:
            target = x0
        mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
        if cfg.min_snr_gamma is None:
            weight = torch.ones_like(mse)
        else:
            snr = self.snr[t]
            clipped = snr.clamp(max=cfg.min_snr_gamma)
            weight = {"epsilon": (cfg.min_snr_gamma / snr).clamp(max=1.0),  # SNR 0 → 1
                      "v_prediction": clipped / (snr + 1),
                      "sample": clipped}[cfg.prediction_type]
        loss = (weight * mse).mean()
        return {"loss": loss, "mse": mse.mean().detach()}


class LatentDiffusionObjective(DiffusionObjective):
    """Latent diffusion with text conditioning (Rombach et al. 2022, eq. 3):

        L = E_{x, y, ε, t} ‖ε − ε_θ(z_t, t, τ(y))‖²,   z₀ = scaling_factor · z, z ~ q(z | x)

    where q(z | x) is a frozen AutoencoderKL's encoder and τ(y) the frozen text encoder's
    ``last_hidden_state`` of the caption y (B, L, D), which the U-Net cross-attends to. The
    captions are made per batch by ``captioner(images, labels, generator) -> list[str]``; with
    probability ``p_uncond`` a caption is replaced by the empty prompt "" — the unconditional
    text that ``TextToImage`` uses for classifier-free guidance. Noise, t and the weighting are
    the pixel objective's (:meth:`noised`, :meth:`weighted_loss`), applied to z₀.
    """

    def __init__(self, unet: nn.Module, config: DiffusionConfig, *, vae: nn.Module,
                 text_encoder: nn.Module, tokenizer, captioner) -> None:
        super().__init__(unet, config)
        self.vae = vae.requires_grad_(False).eval()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer  # list[str] -> (B, L) ids
        self.captioner = captioner

    def train(self, mode: bool = True) -> LatentDiffusionObjective:
        super().train(mode)
        self.vae.eval()  # frozen parts stay in inference mode
        self.text_encoder.eval()
        return self

    def training_loss(self, batch: dict[str, torch.Tensor],
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        x = batch["images"]  # (B, C, H, W) in [-1, 1]
        captions = self.captioner(x, batch["labels"], generator)
        if self.config.p_uncond > 0:
            drop = batch_rand((len(captions),), generator, device=x.device)
            captions = ["" if d else c for c, d in zip(captions, (drop < self.config.p_uncond)
                                                      .tolist())]
        with torch.no_grad():
            ids = self.tokenizer(captions).to(x.device)
            context = self.text_encoder(ids).last_hidden_state  # (B, L, D)
            z0 = self.vae.encode(x).latent_dist.sample(generator)  # (B, c_z, H/f, W/f)
            # float32 (the VAE may have run under bf16 autocast): the noise and z_t are drawn
            # and formed in float32 like the pixel objective's
            z0 = (z0 * self.vae.config.scaling_factor).float()
        t, noise, z_t = self.noised(z0, generator)
        pred = self.unet(z_t, t, encoder_hidden_states=context).sample
        return self.weighted_loss(pred, t, noise, z0)
