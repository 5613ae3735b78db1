"""CLIP trained from scratch (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", §2.3 and Fig. 3).

Two towers map an image and a caption into one joint space; training pulls matching pairs
together and pushes the other pairs of the batch apart (InfoNCE, van den Oord et al. 2018):

    I_f = image_encoder(images)                  (B, C_img)   a small CNN, global-average pooled
    T_f = text_encoder(ids).pooler_output        (B, D)       difflab's CLIPTextModel, state at EOS
    I_e = normalize(I_f · W_i),  T_e = normalize(T_f · W_t)   (B, P)   visual/text_projection
    logits = exp(t) · I_e T_eᵀ                   (B, B)       t = logit_scale, learned
    loss = ½ [CE(logits, y) + CE(logitsᵀ, y)]                 symmetric InfoNCE

``t`` starts at log(1/0.07) and is clamped at log 100 (CLIP §2.5). Notation: ``logit_scale`` ↔ t,
``positives`` ↔ the targets y.

One change for captions made from labels: two images of a batch can have *the same* caption
("a seven"); the standard loss would push one of them away from a caption that describes it
exactly. Here every text with the same token ids counts as a positive, with the target mass
spread evenly over them (as in supervised contrastive learning, Khosla et al. 2020); with
distinct captions this is exactly CLIP's loss.

With many processes the negatives are those of the whole global batch, not only of this
process's slice (:meth:`CLIPModel.training_loss`): the loss and the update are the one-process
ones on the same B pairs.

The text side also gives the conditioning of latent diffusion: the frozen ``text_encoder``'s
``last_hidden_state`` is what the U-Net cross-attends to (``runs/ldm.py``). Its tokenizer is
CLIP's byte-level BPE (``models/tokenizer.py``) with merges learned here on the closed caption
vocabulary (:func:`caption_tokenizer`), so each caption word is one token and the files are the
standard ``vocab.json`` + ``merges.txt`` that ``CLIPTokenizer`` and diffusers folders use.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.config import Config, check_positive
from difflab.errors import ConfigError
from difflab.io import atomic_write_bytes, atomic_write_json
from difflab.models.base import ModelMixin
from difflab.models.clip_text import CLIPTextConfig, CLIPTextModel
from difflab.models.tokenizer import (
    BOS,
    END_OF_WORD,
    EOS,
    CLIPTokenizer,
    bytes_to_unicode,
    normalize,
    pre_tokenize,
)
from difflab.nn import Downsample, ResnetBlock, padded_conv
from difflab.nn.fused import group_norm_silu
from difflab.rng import batch_gather, batch_shard


@dataclass(kw_only=True)
class CLIPConfig(Config):
    # image tower: a CNN, one ResnetBlock per level, the resolution halves between levels
    in_channels: int = 1  # image channels
    image_channels: tuple[int, ...] = (32, 64, 128)  # width per level (28 → 14 → 7)
    norm_num_groups: int = 8  # GroupNorm groups of the image tower
    # text tower: difflab's CLIPTextModel (the transformer SD conditions on), tiny
    vocab_size: int = 49408  # tokenizer vocabulary (a caption tokenizer: a few hundred)
    text_width: int = 128  # D, also the cross-attention width of a U-Net conditioned on it
    text_layers: int = 3  # transformer layers
    text_heads: int = 4  # attention heads (must divide text_width)
    context_length: int = 24  # token positions (captions are ≤ ~16 tokens)
    eos_token_id: int = 49407  # id of <|endoftext|>: the pooled position
    # joint space
    projection_dim: int = 128  # P
    logit_scale_init: float = math.log(1 / 0.07)  # t₀: temperature 0.07 (CLIP §2.5)
    logit_scale_max: float = math.log(100.0)  # t is clamped here so logits stay ≤ 100

    def validate(self) -> None:
        o = "CLIPConfig"
        for name in ("in_channels", "norm_num_groups", "vocab_size", "text_width", "text_layers",
                     "text_heads", "context_length", "projection_dim", "logit_scale_max"):
            check_positive(o, name, getattr(self, name))
        ch = self.image_channels
        if not isinstance(ch, tuple) or not ch or not all(
                isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in ch):
            raise ConfigError(f"{o}.image_channels={ch!r} must be a non-empty tuple of positive "
                              "ints")
        if self.text_width % self.text_heads:
            raise ConfigError(f"{o}.text_heads={self.text_heads} does not divide "
                              f"text_width={self.text_width}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ConfigError(f"{o}.eos_token_id={self.eos_token_id} must be a token id "
                              f"< vocab_size={self.vocab_size}")

    def text_config(self) -> CLIPTextConfig:
        """The text tower's config (what ``text_encoder/config.json`` of an LDM folder holds)."""
        return CLIPTextConfig(vocab_size=self.vocab_size, hidden_size=self.text_width,
                              intermediate_size=4 * self.text_width,
                              num_hidden_layers=self.text_layers,
                              num_attention_heads=self.text_heads,
                              max_position_embeddings=self.context_length,
                              eos_token_id=self.eos_token_id)


class ImageEncoder(nn.Module):
    """images (B, C, H, W) → features (B, image_channels[-1]):
    conv_in → (ResnetBlock [→ Downsample]) per level → GroupNorm → SiLU → mean over H, W."""

    def __init__(self, c: CLIPConfig) -> None:
        super().__init__()
        ch, g = c.image_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, width in enumerate(ch):
            blocks.append(ResnetBlock(ch[max(i - 1, 0)], width, None, groups=g))
            if i < len(ch) - 1:
                blocks.append(Downsample(width))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(min(g, ch[-1]), ch[-1])

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(padded_conv(self.conv_in, x))
        return group_norm_silu(self.norm_out, h).mean((2, 3))  # (B, C_last)


def clip_loss(logits: Tensor, positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of ``logits`` (B, B) = exp(t)·cos(image_i, text_j).

    positives: (B, B) bool, which texts describe which image (default: the diagonal). Each
    row's target puts mass 1/#positives on every positive; image→text and text→image
    cross-entropies are averaged.
    """
    if positives is None:
        positives = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    logits = logits.float()
    return (soft_cross_entropy(logits, positives) + soft_cross_entropy(logits.T, positives.T)) / 2


def soft_cross_entropy(logits: Tensor, positives: Tensor) -> Tensor:
    """mean over rows i of −Σ_j y_ij log softmax(logits_i)_j, with y_i spread evenly over the
    positives of row i. logits, positives: (b, B) — b rows scored against B candidates."""
    pos = positives.float()
    return -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()


class CLIPModel(ModelMixin):
    """Image and text towers, projections and the learned temperature; see the module doc."""

    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.image_encoder = ImageEncoder(c)
        self.text_encoder = CLIPTextModel(c.text_config())
        self.visual_projection = nn.Linear(c.image_channels[-1], c.projection_dim, bias=False)
        self.text_projection = nn.Linear(c.text_width, c.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))

    def get_image_features(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) in [-1, 1] → I_f·W_i (B, P), not normalised."""
        return self.visual_projection(self.image_encoder(images))

    def get_text_features(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) → T_f·W_t (B, P), not normalised."""
        return self.text_projection(self.text_encoder(input_ids).pooler_output)

    def scale(self) -> Tensor:
        """exp(t), with t clamped at ``logit_scale_max``."""
        return self.logit_scale.clamp(max=self.config.logit_scale_max).exp()

    def forward(self, images: Tensor, input_ids: Tensor) -> Tensor:
        """logits_per_image (B, B) = exp(t) · I_e T_eᵀ."""
        i_e = F.normalize(self.get_image_features(images), dim=-1)
        t_e = F.normalize(self.get_text_features(input_ids), dim=-1)
        return self.scale() * i_e @ t_e.T

    def training_loss(self, batch: dict[str, Tensor],
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """batch: "images" (B, C, H, W), "input_ids" (B, L) (the tokenized captions).

        Logs: "loss", "accuracy" (image → text top-1 lands on a positive), "temperature".

        Many processes (``generator`` carries this process's rows of the global batch, see
        :mod:`difflab.rng`): the other pairs are those of the *whole global batch*, as in one
        process. Embeddings are all-gathered (:func:`~difflab.rng.batch_gather`), and process r
        takes the terms of its own b rows: its images against all B texts, its texts against
        all B images. The mean over processes is the one-process loss, and the gathered
        gradients make DDP's mean gradient the one-process gradient.

        The parameter t itself is clamped to ``logit_scale_max`` first (OpenCLIP's rule, done
        here after the previous update): clamped only inside :meth:`scale`, an AdamW step past
        the cap would leave t where its gradient is 0, stuck there (the training loop's weight
        decay leaves scalars alone)."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=self.config.logit_scale_max)
        ids = batch["input_ids"]
        if batch_shard(generator) is None:
            logits = self(batch["images"], ids)  # (B, B)
            positives = (ids[:, None, :] == ids[None, :, :]).all(-1)  # (B, B) same caption
            loss = clip_loss(logits, positives)
        else:
            i_e = F.normalize(self.get_image_features(batch["images"]), dim=-1)  # (b, P)
            t_e = F.normalize(self.get_text_features(ids), dim=-1)  # (b, P)
            all_i, all_t = batch_gather(i_e, generator), batch_gather(t_e, generator)  # (B, P)
            all_ids = batch_gather(ids, generator)  # (B, L)
            s = self.scale()
            logits = (s * i_e @ all_t.T).float()  # (b, B) this process's images vs all texts
            logits_t = (s * t_e @ all_i.T).float()  # (b, B) its texts vs all images
            positives = (ids[:, None, :] == all_ids[None, :, :]).all(-1)  # (b, B); symmetric
            loss = (soft_cross_entropy(logits, positives)
                    + soft_cross_entropy(logits_t, positives)) / 2
        hit = positives.gather(1, logits.argmax(1, keepdim=True)).float().mean()
        return {"loss": loss, "accuracy": hit.detach(), "temperature": 1 / self.scale().detach()}


# --------------------------------------------------------------------------------------------
# Zero-shot classification and retrieval (CLIP §3.1.2)
# --------------------------------------------------------------------------------------------

def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def embed_images(model: nn.Module, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Unit-norm image embeddings (N, P), computed in batches on the model's device."""
    dev = _device(model)
    out = [model.get_image_features(images[i:i + batch_size].to(dev)).float()
           for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(out), dim=-1).cpu()


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer, texts: list[str]) -> Tensor:
    """Unit-norm text embeddings (K, P) of ``texts``."""
    ids = tokenizer(list(texts)).to(_device(model))
    return F.normalize(model.get_text_features(ids).float(), dim=-1).cpu()


def zero_shot_scores(model: nn.Module, tokenizer, images: Tensor, prompts: list[str]) -> Tensor:
    """Cosine similarity (N, K) of every image with every class prompt."""
    return embed_images(model, images) @ embed_texts(model, tokenizer, prompts).T


def zero_shot_accuracy(model: nn.Module, tokenizer, images: Tensor, labels: Tensor,
                       prompts: list[str]) -> tuple[float, Tensor]:
    """Zero-shot classification: the class whose prompt ("a seven") is most similar.

    Returns (top-1 accuracy against ``labels`` (N,), predictions (N,))."""
    pred = zero_shot_scores(model, tokenizer, images, prompts).argmax(1)
    return float((pred == labels.cpu()).double().mean()), pred


def retrieve(model: nn.Module, tokenizer, images: Tensor, queries: list[str],
             k: int = 5) -> Tensor:
    """Indices (Q, k) of the ``k`` images most similar to each query caption, best first."""
    sims = embed_texts(model, tokenizer, queries) @ embed_images(model, images).T  # (Q, N)
    return sims.topk(min(k, len(images)), dim=1).indices


# --------------------------------------------------------------------------------------------
# A CLIP BPE tokenizer for a closed vocabulary
# --------------------------------------------------------------------------------------------

def learn_bpe(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges (Sennrich et al. 2016, Alg. 1) that spell every pre-token of ``words`` as one
    symbol: repeatedly merge the most frequent adjacent pair (ties: the smallest pair), counting
    each distinct pre-token once, until no pre-token has two symbols left."""
    b2u = bytes_to_unicode()
    seqs = set()
    for text in words:
        for token in pre_tokenize(normalize(text)):
            spelled = "".join(b2u[b] for b in token.encode("utf-8"))
            seqs.add((*spelled[:-1], spelled[-1] + END_OF_WORD))
    merges: list[tuple[str, str]] = []
    work = [list(s) for s in sorted(seqs)]
    while True:
        counts = collections.Counter(p for s in work for p in zip(s, s[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for s in work:  # merge every occurrence, left to right (as CLIPTokenizer.bpe does)
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i:i + 2] = [s[i] + s[i + 1]]
                i += 1


def caption_tokenizer(words: Iterable[str], model_max_length: int = 24) -> CLIPTokenizer:
    """A :class:`CLIPTokenizer` whose vocabulary is CLIP's layout — the 256 byte symbols, the
    same with ``</w>``, one entry per learned merge, ``<|startoftext|>``, ``<|endoftext|>`` — with
    merges learned on ``words``: each of those words becomes one token, and any other text still
    tokenizes (into byte symbols) instead of failing."""
    base = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for sym in [*base, *(b + END_OF_WORD for b in base)]:
        vocab.setdefault(sym, len(vocab))
    merges = learn_bpe(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab, merges, model_max_length=model_max_length)


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> None:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` (the files transformers' ``CLIPTokenizer`` reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "vocab.json", tokenizer.encoder)
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.__getitem__)
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    atomic_write_bytes(folder / "merges.txt", text.encode("utf-8"))
    pad = tokenizer.decoder[tokenizer.pad_token_id]
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad}
    atomic_write_json(folder / "special_tokens_map.json", specials)
    atomic_write_json(folder / "tokenizer_config.json",
                      {"tokenizer_class": "CLIPTokenizer",
                       "model_max_length": tokenizer.model_max_length, **specials})


__all__ = ["CLIPConfig", "CLIPModel", "ImageEncoder", "caption_tokenizer", "clip_loss",
           "embed_images", "embed_texts", "learn_bpe", "retrieve", "save_tokenizer",
           "soft_cross_entropy", "zero_shot_accuracy", "zero_shot_scores"]
