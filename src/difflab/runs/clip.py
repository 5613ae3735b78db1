"""Train CLIP from scratch on a labelled image set with generated captions; evaluate zero-shot.

A run folder ``OUT/`` holds ``model/`` (the checkpoint folder: ``config.json``,
``model.safetensors``, the tokenizer's ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``,
``captions.json`` — the fitted captioner — and ``data.json``), ``checkpoint/`` (training state for
``--resume``), ``loss.png``, ``confusion.png``, ``retrieval.png``, ``metrics.json`` and
``report.html``.

Captions are made *inside the training task*, per batch, from the batch's labels and pixels
(:class:`CaptionedCLIP`): the loop's batch stays (images, labels) like every other model's, each
epoch names a fresh random subset of attributes, and a caption always describes the very pixels
the image tower sees. Measuring 128 images and tokenizing their captions costs about a
millisecond, next to ~0.2 s for the step itself.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.data import ImageDataset
from difflab.data.captions import CaptionConfig, Captioner
from difflab.errors import CheckpointError
from difflab.io import atomic_write_json, model_dir, read_json
from difflab.models.clip import (
    CLIPConfig,
    CLIPModel,
    caption_tokenizer,
    retrieve,
    save_tokenizer,
    zero_shot_accuracy,
)
from difflab.models.tokenizer import CLIPTokenizer
from difflab.training import TrainConfig, train
from difflab.viz import Report, plot_loss_curves

# The measured default recipe (benchmarks/RESULTS.md, "CLIP and latent diffusion"): contrastive
# training on CPU wants many small steps; no EMA (the run is too short for it to help).
DEFAULT_TRAIN: dict[str, Any] = dict(batch_size=128, lr=2e-3, warmup_steps=100, ema_decay=None,
                                     weight_decay=0.05)
# The default towers: ~0.2 s per 128-image step on one CPU core (28×28).
DEFAULT_MODEL: dict[str, Any] = dict(image_channels=(16, 32, 64), text_width=64, text_layers=2,
                                     text_heads=4, projection_dim=64)


class CaptionedCLIP(nn.Module):
    """CLIP's training task on (images, labels): caption → tokenize → symmetric InfoNCE."""

    def __init__(self, model: CLIPModel, captioner: Captioner, tokenizer: CLIPTokenizer) -> None:
        super().__init__()
        self.model = model
        self.captioner = captioner
        self.tokenizer = tokenizer

    def training_loss(self, batch: dict[str, Tensor],
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        images = batch["images"]
        captions = self.captioner(images, batch["labels"], generator)
        ids = self.tokenizer(captions).to(images.device)
        return self.model.training_loss({"images": images, "input_ids": ids}, generator)


@dataclass
class CLIPBundle:
    """A trained CLIP with what it needs to read text: tokenizer and captioner."""

    model: CLIPModel
    tokenizer: CLIPTokenizer
    captioner: Captioner
    data: dict[str, Any]  # {"name", "class_names", "image_shape"}


def context_length_for(captioner: Captioner, tokenizer: CLIPTokenizer) -> int:
    """Token positions for the longest caption (every attribute named) + 4 spare, rounded up
    to a multiple of 8."""
    longest = max(len(tokenizer.encode(captioner.caption(k, [1] * 6)))
                  for k in range(len(captioner.class_words)))
    return 8 * math.ceil((longest + 4) / 8)


def build_clip(data: ImageDataset, caption_cfg: CaptionConfig | None = None,
               **overrides: Any) -> tuple[CLIPModel, CLIPTokenizer, Captioner]:
    """A CLIP sized for ``data``, its caption tokenizer, and the captioner fitted on ``data``."""
    captioner = Captioner.fit(data.images, data.class_names, caption_cfg)
    tokenizer = caption_tokenizer(captioner.vocabulary())
    context = context_length_for(captioner, tokenizer)
    tokenizer.model_max_length = context
    cfg = CLIPConfig(**{**DEFAULT_MODEL, "in_channels": data.image_shape[0],
                        "vocab_size": tokenizer.vocab_size,
                        "eos_token_id": tokenizer.eos_token_id, "context_length": context,
                        **overrides})
    return CLIPModel(cfg), tokenizer, captioner


def save_clip(folder: Path, bundle: CLIPBundle) -> None:
    bundle.model.save_pretrained(folder, extra_files={"captions.json": bundle.captioner.to_dict(),
                                                      "data.json": bundle.data})
    save_tokenizer(bundle.tokenizer, folder)


def load_clip(folder: str | Path, device: str | torch.device = "cpu") -> CLIPBundle:
    """Load a CLIP checkpoint folder (or a ``difflab train clip`` run folder)."""
    folder = model_dir(folder)
    if not (folder / "captions.json").is_file():
        raise CheckpointError(f"{folder}: not a difflab CLIP folder (no captions.json); train "
                              "one with `difflab train clip`")
    model = CLIPModel.from_pretrained(folder, map_location=device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    captioner = Captioner.from_dict(read_json(folder / "captions.json"))
    return CLIPBundle(model, tokenizer, captioner, read_json(folder / "data.json"))


@dataclass
class CLIPRun:
    bundle: CLIPBundle
    seconds: float
    steps: int
    history: list[dict[str, float]]
    metrics: dict[str, Any]  # empty on the other processes of a multi-process run
    out_dir: Path
    is_main_process: bool = True  # False on the other processes: they wrote nothing


def train_clip(data: ImageDataset, test: ImageDataset, *, out_dir: str | Path,
               train_cfg: TrainConfig, caption_cfg: CaptionConfig | None = None,
               model_overrides: dict[str, Any] | None = None, resume: bool = False,
               report: bool = True) -> CLIPRun:
    """Train CLIP on ``data`` (captions generated per batch); zero-shot evaluate on ``test``."""
    out_dir = Path(out_dir)
    torch.manual_seed(train_cfg.seed)
    model, tokenizer, captioner = build_clip(data, caption_cfg, **(model_overrides or {}))
    task = CaptionedCLIP(model, captioner, tokenizer)
    result = train(task, data.images, data.labels, train_cfg, out_dir=out_dir, resume=resume,
                   desc=f"clip {data.name}")
    trained = result.model.model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    info = {"name": data.name, "class_names": list(data.class_names),
            "image_shape": list(data.image_shape)}
    bundle = CLIPBundle(trained, tokenizer, captioner, info)
    if not result.is_main_process:  # many processes: only the main one writes the run folder
        return CLIPRun(bundle, result.seconds, result.steps, result.history, {}, out_dir,
                       is_main_process=False)
    save_clip(out_dir / "model", bundle)
    acc, pred = zero_shot_accuracy(trained, tokenizer, test.images, test.labels,
                                   captioner.class_prompts())
    metrics = {"train_seconds": result.seconds, "steps": result.steps,
               "batch_size": train_cfg.batch_size,
               "final_loss": result.final("loss", n=50),
               "final_batch_accuracy": result.final("accuracy", n=50),
               "temperature": float(1 / trained.scale().detach()),
               "zero_shot_accuracy": acc, "test_images": len(test), "test_split": test.split,
               "parameters": trained.num_parameters,
               "prompts": captioner.class_prompts()}
    atomic_write_json(out_dir / "metrics.json", metrics)
    run = CLIPRun(bundle, result.seconds, result.steps, result.history, metrics, out_dir)
    if report:
        write_clip_report(run, test, pred)
    return run


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def plot_image_table(images: Tensor, path: str | Path, *, row_titles: list[str] | None = None,
                     col_titles: list[str] | None = None,
                     cell_texts: list[list[str]] | None = None, cell_inches: float = 1.1,
                     dpi: int = 72) -> Path:
    """Images (R, K, C, H, W) in [-1, 1] as an R×K table with text: a title left of each row,
    above each column, and (wrapped) under each cell. Grayscale for C = 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R, K = images.shape[:2]
    text_h = 0.35 if cell_texts else 0.0
    left = 1.9 if row_titles else 0.1
    fig_w, fig_h = left + K * cell_inches, (0.3 if col_titles else 0.1) + R * (cell_inches
                                                                               + text_h)
    fig, axes = plt.subplots(R, K, figsize=(fig_w, fig_h), dpi=dpi, squeeze=False)
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 1, 3, 4, 2).numpy()
    for r in range(R):
        for k in range(K):
            ax = axes[r][k]
            img = arr[r, k]
            if img.shape[-1] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if cell_texts:
                ax.set_xlabel("\n".join(textwrap.wrap(cell_texts[r][k], 18)), fontsize=6.5)
            if col_titles and r == 0:
                ax.set_title(col_titles[k], fontsize=8)
        if row_titles:
            axes[r][0].set_ylabel("\n".join(textwrap.wrap(row_titles[r], 24)), fontsize=8,
                                  rotation=0, ha="right", va="center", labelpad=8)
    fig.subplots_adjust(left=left / fig_w, right=0.99, top=0.97 if not col_titles else 0.93,
                        bottom=0.02, wspace=0.08, hspace=0.45 if cell_texts else 0.08)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.05)  # keeps wrapped labels whole
    plt.close(fig)
    return path


def plot_confusion(conf: Tensor, class_names: list[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (true × predicted) as a heat map with the percentages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = len(class_names)
    frac = (conf.double() / conf.sum(1, keepdim=True).clamp_min(1)).numpy()
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * K, 1.0 + 0.45 * K), dpi=80)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(K):
        for j in range(K):
            if frac[i, j] >= 0.01:
                ax.text(j, i, f"{100 * frac[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(K), class_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(K), class_names, fontsize=7)
    ax.set_xlabel("predicted (zero-shot)")
    ax.set_ylabel("true")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def retrieval_queries(captioner: Captioner, n: int = 4) -> list[str]:
    """A few captions worth retrieving: attributes × classes spread over the class list."""
    K = len(captioner.class_words)
    picks = [(0, [-1, -1, 0, 0, 0, 0]), (K // 3, [1, 1, 0, 0, 0, 0]),
             ((2 * K) // 3, [0, 0, 0, 1, 0, 0]), (K - 1, [0, 0, 0, 0, 0, 0]),
             (K // 2, [1, -1, 0, 0, 0, 0]), (1 % K, [0, 0, 0, 0, -1, 0])]
    return [captioner.caption(k, lev) for k, lev in picks[:n]]


def write_clip_report(run: CLIPRun, test: ImageDataset, pred: Tensor) -> Path:
    out, b = run.out_dir, run.bundle
    m = run.metrics
    rep = Report(f"difflab — CLIP on {b.data['name']}")
    rep.text(f"Trained {run.steps} steps (batch {m['batch_size']}) in {run.seconds:.0f} s; "
             f"{b.model.num_parameters / 1e6:.2f} M parameters; learned temperature "
             f"{m['temperature']:.4f}.")
    rep.heading("Zero-shot classification")
    rep.text(f"Test accuracy {100 * m['zero_shot_accuracy']:.1f} % on {len(test)} "
             f"{test.split} images: each image gets the class whose prompt embedding is most "
             f"similar. Prompts: {', '.join(repr(p) for p in m['prompts'])}.")
    K = len(b.captioner.class_words)
    conf = torch.bincount(test.labels * K + pred, minlength=K * K).view(K, K)
    plot_confusion(conf, b.captioner.class_words, out / "confusion.png")
    rep.image(out / "confusion.png", "confusion matrix (row %)")
    plot_loss_curves({"loss": [(h["step"], h["loss"]) for h in run.history]}, out / "loss.png")
    rep.heading("Training loss")
    rep.image(out / "loss.png", "symmetric InfoNCE (running mean)")
    rep.heading("Retrieval")
    queries = retrieval_queries(b.captioner)
    idx = retrieve(b.model, b.tokenizer, test.images, queries, k=5)  # (Q, 5)
    names = b.captioner.class_words
    texts = [[names[int(test.labels[i])] for i in row] for row in idx]
    plot_image_table(test.images[idx], out / "retrieval.png", row_titles=queries,
                     cell_texts=texts)
    rep.image(out / "retrieval.png", "top-5 test images per caption (true class under each)")
    return rep.save(out / "report.html")


__all__ = ["DEFAULT_MODEL", "DEFAULT_TRAIN", "CLIPBundle", "CLIPRun", "CaptionedCLIP",
           "build_clip", "load_clip", "plot_confusion", "plot_image_table", "save_clip",
           "train_clip"]
