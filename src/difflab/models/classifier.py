"""A small CNN classifier whose penultimate layer is the feature space of difflab's metrics.

FID (Heusel et al. 2017) compares generated and real images through the features of a network
trained to classify *natural* images (Inception-v3 on ImageNet). For 28×28 digits and clothes
those features mean little, so difflab trains, once per data set, a classifier on that data
set's own train split and measures in its feature space (as e.g. the MNIST FIDs of many VAE
papers do). Layout, top to bottom (a VGG-style net sized for 8×8 … 32×32 inputs):

    stage k (k = 0 … L−1):  [Conv3×3 → GroupNorm → SiLU] × convs_per_stage, then MaxPool 2×2
                            (ceil mode: 28 → 14 → 7 → 4, 8 → 4 → 2 → 1; none after the last)
    features  φ(x) = global average pool of the last stage             (B, widths[-1])
    logits         = Linear(φ(x))                                       (B, num_classes)

φ is the "penultimate layer": like Inception's pool3, a spatial average of non-negative-ish
activations, taken right before the linear classifier. GroupNorm (not BatchNorm) keeps
train and eval identical, so the features of a batch never depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.config import Config, check_positive
from difflab.errors import ConfigError
from difflab.models.base import ModelMixin
from difflab.nn.fused import GroupNorm


@dataclass(kw_only=True)
class FeatureClassifierConfig(Config):
    in_channels: int = 1  # image channels: 1 (grayscale) or 3 (RGB)
    num_classes: int = 10  # classes of the data set it is trained on
    image_size: int = 28  # training resolution (informational; the net is fully convolutional)
    # channels per stage; the last is the feature dim. Narrow early stages keep the full-size
    # convolutions cheap: (16, 32, 64, 128) trains ~4× faster than (32, 64, 128) on a CPU.
    widths: tuple[int, ...] = (16, 32, 64, 128)
    convs_per_stage: int = 1  # 3×3 convolutions per stage
    norm_num_groups: int = 8  # GroupNorm groups (must divide every width)
    label_smoothing: float = 0.0  # cross-entropy label smoothing during training

    def validate(self) -> None:
        for name in ("in_channels", "num_classes", "image_size", "convs_per_stage",
                     "norm_num_groups"):
            check_positive("FeatureClassifierConfig", name, getattr(self, name))
        if not self.widths:
            raise ConfigError("FeatureClassifierConfig.widths must not be empty")
        for w in self.widths:
            if w % self.norm_num_groups:
                raise ConfigError(f"FeatureClassifierConfig.widths: {w} is not divisible by "
                                  f"norm_num_groups={self.norm_num_groups}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"FeatureClassifierConfig.label_smoothing={self.label_smoothing} "
                              "must be in [0, 1)")


class FeatureClassifier(ModelMixin):
    """CNN classifier; ``features(x)`` is the penultimate layer used by FID / KID / P&R.

    Input ``x: (B, C, H, W)`` in [-1, 1] (difflab's image convention), any H, W ≥ 2^(L−1).
    """

    config_class = FeatureClassifierConfig

    def __init__(self, config: FeatureClassifierConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        prev = config.in_channels
        for k, width in enumerate(config.widths):
            for _ in range(config.convs_per_stage):
                layers += [nn.Conv2d(prev, width, 3, padding=1),
                           GroupNorm(config.norm_num_groups, width), nn.SiLU()]
                prev = width
            if k < len(config.widths) - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, config.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config.widths[-1]

    def features(self, x: Tensor) -> Tensor:
        """φ(x): (B, C, H, W) → (B, feature_dim), the global average of the last stage."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits, (B, num_classes)."""
        return self.head(self.features(x))

    def training_loss(self, batch: dict[str, Tensor],
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Cross-entropy on ``batch["images"]`` (B, C, H, W) and ``batch["labels"]`` (B,)."""
        logits = self(batch["images"])
        loss = F.cross_entropy(logits.float(), batch["labels"],
                               label_smoothing=self.config.label_smoothing)
        acc = (logits.argmax(1) == batch["labels"]).float().mean()
        return {"loss": loss, "accuracy": acc.detach()}

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
        """Top-1 accuracy on ``images`` (N, C, H, W) in [-1, 1] with ``labels`` (N,)."""
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        correct = 0
        for i in range(0, len(images), batch_size):
            pred = self(images[i:i + batch_size].to(dev)).argmax(1).cpu()
            correct += int((pred == labels[i:i + batch_size]).sum())
        self.train(was_training)
        return correct / max(1, len(images))
