"""Latent diffusion trained here, end to end: autoencoder → CLIP → text-conditioned U-Net.

Rombach et al. 2022 in three stages, each through the one training loop:

1. an AutoencoderKL (f = 4: 28×28×1 → 7×7×4) on the images; its ``scaling_factor`` (1/std of
   the latents) is measured on the training set — or reuse one with ``vae=``;
2. a CLIP trained on the same images with generated captions (``runs/clip.py``) — or reuse one
   with ``clip=``; its text tower is the text encoder τ;
3. a tiny UNet2DConditionModel on the scaled latents, cross-attending to τ(caption), with the
   caption dropped to "" with probability ``p_uncond`` for classifier-free guidance
   (:class:`~difflab.training.objectives.LatentDiffusionObjective`). The autoencoder and τ are
   frozen.

The run folder ``OUT/`` holds ``vae/`` (``model/`` + ``checkpoint/``), ``clip/`` (a CLIP run
folder), ``unet/checkpoint/``, and ``pipeline/``: a diffusers-layout folder

    model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/  captions.json

that ``difflab.interop.load_pipeline`` reads unchanged into a :class:`TextToImage` (and
``difflab sample --ckpt OUT --prompt "a thick seven"`` samples). ``captions.json`` is difflab's
addition: the captioner whose words the model knows. Plus ``report.html``, ``metrics.json``,
``reconstructions.png``, ``t2i_grid.png`` and ``loss.png``.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.config import Config, check_choice, check_positive
from difflab.data import ImageDataset, dataset_record
from difflab.data.captions import Captioner, class_word
from difflab.errors import CheckpointError, ConfigError, DifflabError
from difflab.interop.writer import write_pipeline_files
from difflab.io import atomic_write_json, read_json, replace_dir
from difflab.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflab.models.unet_condition import UNet2DConditionConfig, UNet2DConditionModel
from difflab.pipelines import TextToImage
from difflab.runs.clip import (
    DEFAULT_TRAIN as CLIP_TRAIN,
)
from difflab.runs.clip import (
    CLIPBundle,
    load_clip,
    train_clip,
)
from difflab.runs.diffusion import DPM_SOLVER_SDE
from difflab.schedulers import SCHEDULERS
from difflab.training import TrainConfig, is_main_process, train
from difflab.training.objectives import PREDICTION_TYPES, DiffusionConfig, LatentDiffusionObjective

STAGES = ("vae", "clip", "unet")
VAE_TRAIN: dict[str, Any] = dict(batch_size=64, lr=1e-3, warmup_steps=50, ema_decay=None)
# mixed_precision "auto" (bf16 where the CPU/GPU multiplies bf16 natively) for every stage: on
# this project's CPU a 10-minute run gets 14 % more U-Net and 8 % more autoencoder steps than in
# float32 and scores FID-style 1.19 vs 1.35 (benchmarks/RESULTS.md, "CLIP and latent diffusion")
UNET_TRAIN: dict[str, Any] = dict(batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.999,
                                  mixed_precision="auto")


@dataclass(kw_only=True)
class LDMConfig(Config):
    vae_channels: tuple[int, ...] = (16, 32, 32)  # AutoencoderKL widths; f = 2^(len − 1) = 4
    latent_channels: int = 4  # channels of z (SD: 4)
    vae_kl_weight: float = 1e-6  # KL weight of the autoencoder (LDM's 1e-6: near-deterministic)
    unet_channels: tuple[int, ...] = (32, 64)  # U-Net widths; cross-attention at every level
    unet_layers_per_block: int = 1  # ResnetBlocks per level (SD: 2)
    unet_heads: int = 4  # attention heads
    p_uncond: float = 0.1  # caption dropout → the "" embedding, for classifier-free guidance
    prediction_type: str = "epsilon"  # what the U-Net predicts: epsilon | v_prediction | sample
    beta_schedule: str = "squaredcos_cap_v2"  # the pixel runs' cosine schedule
    min_snr_gamma: float | None = 5.0  # Min-SNR-γ weighting (None: plain MSE)
    # Shares of a --minutes budget for the stages trained here (renormalised over those).
    stage_fractions: tuple[float, float, float] = (0.2, 0.2, 0.6)
    guidance_scale: float = 4.0  # guidance of the report's samples
    sample_steps: int = 25  # DPM-Solver++ steps of the report's samples

    def validate(self) -> None:
        o = "LDMConfig"
        for name in ("vae_channels", "unet_channels", "stage_fractions"):
            v = getattr(self, name)
            if isinstance(v, list):
                setattr(self, name, tuple(v))
        for name in ("vae_channels", "unet_channels"):
            v = getattr(self, name)
            if not v or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0
                                and c % 8 == 0 for c in v):
                raise ConfigError(f"{o}.{name}={v!r} must be positive multiples of 8")
        for name in ("latent_channels", "unet_layers_per_block", "unet_heads", "sample_steps"):
            check_positive(o, name, getattr(self, name))
        check_positive(o, "vae_kl_weight", self.vae_kl_weight, allow_zero=True)
        check_positive(o, "guidance_scale", self.guidance_scale)
        check_choice(o, "prediction_type", self.prediction_type, PREDICTION_TYPES)
        if not 0.0 <= self.p_uncond < 1.0:
            raise ConfigError(f"{o}.p_uncond={self.p_uncond} must be in [0, 1)")
        if len(self.stage_fractions) != 3 or any(f <= 0 for f in self.stage_fractions):
            raise ConfigError(f"{o}.stage_fractions={self.stage_fractions!r} must be three "
                              "positive numbers (autoencoder, CLIP, U-Net)")
        if any(c % self.unet_heads for c in self.unet_channels):
            raise ConfigError(f"{o}.unet_heads={self.unet_heads} must divide every "
                              f"unet_channels entry {self.unet_channels}")

    def diffusion(self) -> DiffusionConfig:
        return DiffusionConfig(prediction_type=self.prediction_type,
                               beta_schedule=self.beta_schedule,
                               min_snr_gamma=self.min_snr_gamma, p_uncond=self.p_uncond)


# --------------------------------------------------------------------------------------------
# Building the networks
# --------------------------------------------------------------------------------------------

def build_vae(data: ImageDataset, cfg: LDMConfig) -> AutoencoderKL:
    """An AutoencoderKL for ``data``; levels are dropped until the side divides by f and the
    latent side is ≥ 4 (28 → 7 with f = 4; 8×8 digits get f = 2)."""
    c, h, w = data.image_shape
    if h != w:
        raise ConfigError(f"latent diffusion needs square images, got {h}×{w}; use --image-size")
    channels = cfg.vae_channels
    while len(channels) > 1 and (h % 2 ** (len(channels) - 1) or h // 2 ** (len(channels) - 1)
                                 < 4):
        channels = channels[:-1]
    return AutoencoderKL(AutoencoderKLConfig(
        in_channels=c, image_size=h, block_out_channels=channels,
        latent_channels=cfg.latent_channels, norm_num_groups=8, kl_weight=cfg.vae_kl_weight))


def build_unet(vae: AutoencoderKL, text_width: int, cfg: LDMConfig) -> UNet2DConditionModel:
    """A UNet2DConditionModel on the latents with cross-attention at every level."""
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(UNet2DConditionConfig(
        in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
        sample_size=vae.config.latent_size, block_out_channels=cfg.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        layers_per_block=cfg.unet_layers_per_block, attention_head_dim=cfg.unet_heads,
        cross_attention_dim=text_width, norm_num_groups=math.gcd(32, *cfg.unet_channels)))


# --------------------------------------------------------------------------------------------
# The diffusers-layout pipeline folder
# --------------------------------------------------------------------------------------------

def save_ldm(folder: str | Path, *, unet: UNet2DConditionModel, vae: AutoencoderKL,
             clip: CLIPBundle, diffusion: DiffusionConfig, info: dict[str, Any]) -> Path:
    """Write the pipeline folder atomically (assembled beside it, then renamed into place)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _write_ldm(tmp, unet=unet, vae=vae, clip=clip, diffusion=diffusion, info=info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, folder)
    return folder


def _write_ldm(tmp: Path, *, unet: UNet2DConditionModel, vae: AutoencoderKL, clip: CLIPBundle,
               diffusion: DiffusionConfig, info: dict[str, Any]) -> None:
    dpm = SCHEDULERS["dpm++"]  # the default sampler; the noise schedule is the training one
    own = {f.name for f in dataclasses.fields(dpm.config_class)}
    # The SDE form with the heun correction, as for pixel models: on a 10-minute mnist5k LDM
    # (n = 1,000, 3–4 seed sets; benchmarks/RESULTS.md) it ties the ODE in FID-style score and
    # puts more samples in the prompt's class (99.6 % vs 97.4 % at guidance 2). diffusers reads
    # the same config.
    sched = dpm(**{k: v for k, v in diffusion.make_scheduler().config.items() if k in own},
                **DPM_SOLVER_SDE)
    write_pipeline_files(tmp, TextToImage(clip.tokenizer, clip.model.text_encoder, unet, vae,
                                          sched))
    atomic_write_json(tmp / "captions.json", clip.captioner.to_dict())
    atomic_write_json(tmp / "difflab_ldm.json", {"diffusion": diffusion.to_dict(), **info})


def ldm_folder(path: str | Path) -> Path:
    """The pipeline folder of a ``difflab train ldm`` run folder, or ``path`` itself."""
    path = Path(path)
    if (path / "pipeline" / "model_index.json").is_file():
        return path / "pipeline"
    return path


def is_ldm_folder(path: str | Path) -> bool:
    folder = ldm_folder(path)
    return (folder / "model_index.json").is_file() and (folder / "unet").is_dir()


def load_ldm(path: str | Path, scheduler: str | None = None,
             device: str | torch.device = "cpu") -> tuple[TextToImage, Captioner | None]:
    """(TextToImage, the captioner whose words the model knows — None for a foreign folder)
    from a pipeline folder or an LDM run folder, through ``difflab.interop.load_pipeline``."""
    from difflab.interop import load_pipeline

    folder = ldm_folder(path)
    if not is_ldm_folder(folder):
        raise CheckpointError(f"{path}: not a latent diffusion folder (no model_index.json and "
                              "unet/); train one with `difflab train ldm`")
    pipe = load_pipeline(folder, device=device, scheduler=scheduler)
    captions = folder / "captions.json"
    return pipe, Captioner.from_dict(read_json(captions)) if captions.is_file() else None


def check_prompt(prompt: str, captioner: Captioner | None, pipe: TextToImage) -> None:
    """DifflabError for a prompt the model cannot read: a word its captions never used, or more
    tokens than the text encoder has positions (they would be cut off silently)."""
    from difflab.models.tokenizer import normalize, pre_tokenize

    if captioner is not None:
        vocab = set(captioner.vocabulary())
        vocab_tokens = {t for w in vocab for t in pre_tokenize(w)}
        unknown = [t for t in pre_tokenize(normalize(prompt)) if t not in vocab_tokens]
        if unknown:
            raise DifflabError(f"prompt {prompt!r}: {', '.join(map(repr, unknown))} never "
                               f"appeared in the training captions; known words: "
                               f"{' '.join(sorted(vocab))}")
    n, limit = len(pipe.tokenizer.encode(prompt)), pipe.tokenizer.model_max_length
    if n > limit:
        raise DifflabError(f"prompt {prompt!r} has {n} tokens; the text encoder reads at most "
                           f"{limit}")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def stage_train_configs(total: TrainConfig, cfg: LDMConfig, trained: list[str]
                        ) -> dict[str, TrainConfig]:
    """Train configs of the stages in ``trained``: ``total``'s budget (steps or epochs: each
    stage gets them; minutes: split by ``stage_fractions``), seed, precision and progress; the
    U-Net stage also takes ``total``'s optimiser settings. ``deterministic`` and
    ``bf16_weights`` hold for all."""
    shares = {s: f for s, f in zip(STAGES, cfg.stage_fractions) if s in trained}
    shared = dict(seed=total.seed, mixed_precision=total.mixed_precision,
                  progress=total.progress, max_steps=total.max_steps, epochs=total.epochs,
                  checkpoint_every=total.checkpoint_every, deterministic=total.deterministic,
                  bf16_weights=total.bf16_weights)
    out = {}
    for stage in trained:
        minutes = (total.minutes * shares[stage] / sum(shares.values())
                   if total.minutes is not None else None)
        if stage == "unet":
            out[stage] = dataclasses.replace(total, minutes=minutes)
        else:
            base = VAE_TRAIN if stage == "vae" else CLIP_TRAIN
            out[stage] = TrainConfig(**{**base, **shared, "minutes": minutes})
    return out


@dataclass
class LDMRun:
    pipeline: Path
    metrics: dict[str, Any]
    out_dir: Path
    is_main_process: bool = True  # False on the other processes of a multi-process run: they
    # trained the same models but wrote nothing (``metrics`` holds only their training stages)


@torch.no_grad()
def reconstruction_metrics(vae: AutoencoderKL, images: Tensor) -> dict[str, float]:
    """Test-set reconstruction through z = μ: MSE and PSNR on the [0, 1] scale, mean |error|."""
    x_hat = torch.cat([vae(images[i:i + 500]).sample for i in range(0, len(images), 500)])
    err = (x_hat.clamp(-1, 1) - images) / 2  # on the [0, 1] scale
    mse = float(err.pow(2).mean(dtype=torch.float64))
    return {"mse": mse, "psnr_db": 10 * math.log10(1 / max(mse, 1e-12)),
            "l1": float(err.abs().mean(dtype=torch.float64))}


def train_vae_stage(data: ImageDataset, cfg: LDMConfig, tcfg: TrainConfig, out_dir: Path,
                    resume: bool) -> tuple[AutoencoderKL, dict[str, Any]]:
    torch.manual_seed(tcfg.seed)
    vae = build_vae(data, cfg)
    res = train(vae, data.images, data.labels, tcfg, out_dir=out_dir, resume=resume,
                desc=f"autoencoder {data.name}")
    vae = res.model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    return vae, {"seconds": res.seconds, "steps": res.steps, "history": res.history}


def train_ldm(data: ImageDataset, test: ImageDataset, *, out_dir: str | Path,
              cfg: LDMConfig, train_cfg: TrainConfig, clip: str | Path | None = None,
              vae: str | Path | None = None, resume: bool = False,
              report: bool = True) -> LDMRun:
    """Train (or reuse) the autoencoder and CLIP, then the text-conditioned U-Net; write the
    pipeline folder, and the report unless ``report=False``. ``train_cfg`` is the U-Net's and
    the total budget (see :func:`stage_train_configs`). With many processes each stage trains
    on all of them; only the main process writes files and evaluates."""
    out = Path(out_dir)
    main = is_main_process()
    trained = [s for s, given in zip(STAGES, (vae, clip, None)) if given is None]
    tcfgs = stage_train_configs(train_cfg, cfg, trained)
    metrics: dict[str, Any] = {"data": data.name, "stages": {}}
    hist: dict[str, list] = {}

    # 1. autoencoder --------------------------------------------------------------------
    t0 = time.perf_counter()
    if vae is None:
        ae, st = train_vae_stage(data, cfg, tcfgs["vae"], out / "vae",
                                 resume and (out / "vae" / "checkpoint").is_dir())
        hist["autoencoder"] = st.pop("history")
    else:
        ae, st = _load_vae(vae), {"reused": str(vae)}
    if ae.config.image_size != data.image_shape[1] or ae.config.in_channels != \
            data.image_shape[0]:
        raise ConfigError(f"the autoencoder takes {ae.config.in_channels}×{ae.config.image_size}"
                          f"² images; {data.name} has {data.image_shape}")
    scale = ae.compute_scaling_factor(data.images[:4096], torch.Generator().manual_seed(0))
    if main:
        ae.save_pretrained(out / "vae" / "model")
        st.update(reconstruction_metrics(ae, test.images[:2000]))
    latent_shape = [ae.config.latent_channels, ae.config.latent_size, ae.config.latent_size]
    st.update(scaling_factor=scale, latent_shape=latent_shape,
              wall_seconds=time.perf_counter() - t0)
    metrics["stages"]["autoencoder"] = st

    # 2. CLIP ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    if clip is None:
        crun = train_clip(data, test, out_dir=out / "clip", train_cfg=tcfgs["clip"],
                          resume=resume and (out / "clip" / "checkpoint").is_dir(),
                          report=report)
        bundle = crun.bundle
        st = {"seconds": crun.seconds, "steps": crun.steps}
        if main:
            st["zero_shot_accuracy"] = crun.metrics["zero_shot_accuracy"]
        hist["clip"] = crun.history
    else:
        from difflab.models.clip import zero_shot_accuracy

        bundle = load_clip(clip)
        if bundle.captioner.class_words != [class_word(c) for c in data.class_names]:
            raise ConfigError(f"{clip}: this CLIP was trained on the classes "
                              f"{bundle.captioner.class_words}; {data.name} has "
                              f"{data.class_names}")
        st = {"reused": str(clip)}
        if main:
            st["zero_shot_accuracy"], _ = zero_shot_accuracy(
                bundle.model, bundle.tokenizer, test.images, test.labels,
                bundle.captioner.class_prompts())
    st["wall_seconds"] = time.perf_counter() - t0
    metrics["stages"]["clip"] = st

    # 3. the text-conditioned U-Net on the latents --------------------------------------
    t0 = time.perf_counter()
    dcfg = cfg.diffusion()
    torch.manual_seed(train_cfg.seed)
    text_encoder = bundle.model.text_encoder
    unet = build_unet(ae, text_encoder.config.hidden_size, cfg)
    task = LatentDiffusionObjective(unet, dcfg, vae=ae, text_encoder=text_encoder,
                                    tokenizer=bundle.tokenizer, captioner=bundle.captioner)
    res = train(task, data.images, data.labels, tcfgs["unet"], out_dir=out / "unet",
                resume=resume and (out / "unet" / "checkpoint").is_dir(),
                desc=f"latent diffusion {data.name}")
    unet = res.model.unet.to("cpu").to(memory_format=torch.contiguous_format).eval()
    hist["unet"] = res.history
    metrics["stages"]["unet"] = {"seconds": res.seconds, "steps": res.steps,
                                 "final_loss": res.final("loss"),
                                 "parameters": unet.num_parameters,
                                 "wall_seconds": time.perf_counter() - t0}
    if not main:  # many processes: only the main one writes the pipeline, report, metrics
        return LDMRun(out / "pipeline", metrics, out, is_main_process=False)
    info = {"data": dataset_record(data), "ldm_config": cfg.to_dict()}
    folder = save_ldm(out / "pipeline", unet=unet, vae=ae.to(memory_format=torch
                      .contiguous_format), clip=bundle, diffusion=dcfg, info=info)
    metrics["total_train_seconds"] = sum(s.get("seconds", 0.0) for s in
                                         metrics["stages"].values())
    run = LDMRun(folder, metrics, out)
    if report:
        from difflab.runs.ldm_report import write_ldm_report

        write_ldm_report(run, data, test, hist, cfg, train_cfg.seed)
    atomic_write_json(out / "metrics.json", run.metrics)
    return run


def _load_vae(path: str | Path) -> AutoencoderKL:
    path = Path(path)
    for cand in (path, path / "model", path / "vae" / "model"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return AutoencoderKL.from_pretrained(cand).eval()
    raise CheckpointError(f"{path}: no AutoencoderKL checkpoint (config.json + model.safetensors"
                          ") here or in model/ or vae/model/")


__all__ = ["LDMConfig", "LDMRun", "build_unet", "build_vae", "check_prompt", "is_ldm_folder",
           "ldm_folder", "load_ldm", "save_ldm", "stage_train_configs", "train_ldm"]
