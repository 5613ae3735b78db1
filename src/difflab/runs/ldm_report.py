"""The report of a latent diffusion run (:func:`difflab.runs.ldm.train_ldm`): reconstructions,
a text-to-image grid, how well samples follow their prompts, CLIP's zero-shot accuracy, the
training losses."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.data import ImageDataset
from difflab.data.captions import ATTRIBUTES, WORDS, Captioner
from difflab.runs.clip import plot_image_table
from difflab.runs.ldm import LDMConfig, LDMRun, load_ldm
from difflab.viz import Report, plot_loss_curves, save_grid

# Rows of the report's text-to-image grid: levels of (size, thickness, brightness, slant, x, y).
GRID_ROWS: tuple[tuple[int, ...], ...] = ((0, 0, 0, 0, 0, 0), (-1, -1, 0, 0, 0, 0),
                                          (1, 1, 0, 0, 0, 0))


def grid_prompts(captioner: Captioner, rows: tuple[tuple[int, ...], ...] = GRID_ROWS
                 ) -> list[list[str]]:
    """Prompts (R, K): one row per attribute pattern, one column per class."""
    return [[captioner.caption(k, list(lev)) for k in range(len(captioner.class_words))]
            for lev in rows]


@torch.no_grad()
def text_following(captioner: Captioner, images: Tensor, labels: Tensor,
                   rows: tuple[tuple[int, ...], ...], classifier=None) -> dict[str, Any]:
    """How well samples follow their prompts. images (R, K, n, C, H, W) for the prompt rows ×
    classes; labels (K,) class of each column. For every attribute word used, the fraction of
    samples measured in the requested third (chance ≈ 1/3); with a classifier, the fraction
    classified as the prompt's class."""
    R, K, n = images.shape[:3]
    levels = captioner.table(images.flatten(0, 2)).levels.view(R, K, n, -1)
    out: dict[str, Any] = {}
    for r, lev in enumerate(rows):
        for a, want in enumerate(lev):
            if want:
                word = WORDS[ATTRIBUTES[a]][0 if want < 0 else 1]
                out[word] = float((levels[r, :, :, a] == want).double().mean())
    if classifier is not None:
        flat = images.flatten(0, 2)
        pred = torch.cat([classifier(flat[i:i + 500]).argmax(1) for i in range(0, len(flat),
                                                                               500)])
        want = labels.view(1, K, 1).expand(R, K, n).flatten()
        out["class_accuracy"] = float((pred == want).double().mean())
    return out


def write_ldm_report(run: LDMRun, data: ImageDataset, test: ImageDataset,
                     hist: dict[str, list], cfg: LDMConfig, seed: int,
                     n_per_prompt: int = 4) -> Path:
    from difflab.runs.judge import train_classifier

    out, m = run.out_dir, run.metrics
    pipe, captioner = load_ldm(run.pipeline, scheduler="dpm++")
    assert captioner is not None
    rep = Report(f"difflab — latent diffusion on {data.name}")
    st = m["stages"]
    example = captioner.caption(min(7, len(captioner.class_words) - 1), [0, 1, 0, 0, 0, 0])
    rep.text(f"Autoencoder → CLIP → text-conditioned U-Net, {m['total_train_seconds']:.0f} s "
             "of training in all. The pipeline folder loads with "
             "difflab.interop.load_pipeline; sample it with `difflab sample --ckpt "
             f"{out} --prompt '{example}'`.")
    rep.table([{"stage": name, "steps": s.get("steps", "reused"),
                "train s": s.get("seconds"), "wall s": s.get("wall_seconds"),
                "result": _stage_result(name, s)} for name, s in st.items()],
              caption="stages")

    ae = pipe.vae
    rep.heading("Autoencoder")
    x = test.images[:16]
    with torch.no_grad():
        x_hat = ae(x).sample.clamp(-1, 1)
    save_grid(torch.cat([x, x_hat]), out / "reconstructions.png", nrow=16)
    a = st["autoencoder"]
    rep.image(out / "reconstructions.png", f"test images (top) and reconstructions (bottom); "
              f"PSNR {a['psnr_db']:.1f} dB, latents {'×'.join(map(str, a['latent_shape']))}, "
              f"scaling factor {a['scaling_factor']:.3f}")

    rep.heading("Text to image")
    prompts = grid_prompts(captioner)
    R, K = len(prompts), len(prompts[0])
    flat = [p for row in prompts for p in row for _ in range(n_per_prompt)]
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    imgs = pipe(flat, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                generator=g) * 2 - 1  # (R·K·n, C, H, W) in [-1, 1]
    dt = time.perf_counter() - t0
    imgs = imgs.view(R, K, n_per_prompt, *imgs.shape[1:])
    plot_image_table(imgs[:, :, 0], out / "t2i_grid.png", cell_texts=prompts, dpi=80)
    m["sampling_seconds_per_image"] = dt / len(flat)
    rep.image(out / "t2i_grid.png", f"one sample per prompt; DPM-Solver++ {cfg.sample_steps} "
              f"steps, guidance {cfg.guidance_scale}")
    clf = train_classifier(data, seed=seed)
    follow = text_following(captioner, imgs, torch.arange(K), GRID_ROWS, clf)
    m["text_following"] = follow
    rep.text(f"Prompt following over {n_per_prompt} samples per prompt: fraction classified as "
             f"the prompt's class by an MLP classifier trained on {data.name} "
             f"{100 * follow['class_accuracy']:.0f} %; fraction measured in the requested third "
             "of each attribute (chance ≈ 33 %): " + ", ".join(
                 f"{w} {100 * v:.0f} %" for w, v in follow.items() if w != "class_accuracy")
             + f". Sampling {1000 * dt / len(flat):.0f} ms per image.")
    rep.heading("CLIP")
    rep.text(f"Zero-shot test accuracy of the CLIP whose text tower conditions the U-Net: "
             f"{100 * st['clip']['zero_shot_accuracy']:.1f} %.")
    curves = {name: [(h["step"], h["loss"]) for h in hs] for name, hs in hist.items()}
    if curves:
        plot_loss_curves(curves, out / "loss.png", title="training losses")
        rep.image(out / "loss.png", "training loss of each stage (running mean)")
    return rep.save(out / "report.html")


def _stage_result(name: str, s: dict[str, Any]) -> str:
    if name == "autoencoder":
        return f"PSNR {s['psnr_db']:.1f} dB, scale {s['scaling_factor']:.3f}"
    if name == "clip":
        return f"zero-shot {100 * s['zero_shot_accuracy']:.1f} %"
    return f"loss {s['final_loss']:.4f}" if s.get("final_loss") is not None else ""
