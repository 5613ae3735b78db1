"""A small classifier that judges generated images: is each one recognisably of some class, and
are all classes there? Used by ``difflab experiment ae-vs-vae`` (decoded random latents) and by
the latent-diffusion run (does a prompted digit come out as that digit?)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.data import ImageDataset
from difflab.training import TrainConfig, train


class ImageClassifier(nn.Module):
    """A small MLP classifier x (B, C, H, W) → logits (B, classes), the judge of decoded
    samples in :func:`run_ae_vs_vae`. Trained through the one loop via ``training_loss``."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int,
                 hidden: int = 256) -> None:
        super().__init__()
        d = math.prod(image_shape)
        self.net = nn.Sequential(nn.Flatten(1), nn.Linear(d, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_loss(self, batch: dict[str, Tensor],
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        loss = F.cross_entropy(self(batch["images"]), batch["labels"])
        return {"loss": loss}


def train_classifier(data: ImageDataset, *, seed: int = 0,
                     max_steps: int = 2000) -> ImageClassifier:
    """Fit :class:`ImageClassifier` on ``data``: 10 epochs or ``max_steps``, seeded."""
    torch.manual_seed(seed)
    clf = ImageClassifier(data.image_shape, data.num_classes)
    steps = min(max_steps, math.ceil(10 * len(data) / 128))
    cfg = TrainConfig(max_steps=steps, batch_size=128, lr=1e-3, warmup_steps=20,
                      ema_decay=None, seed=seed, progress=False, channels_last=False)
    return train(clf, data.images, data.labels, cfg, desc="classifier").model.eval()


@torch.no_grad()
def score_samples(clf: nn.Module, images: Tensor, num_classes: int) -> dict[str, float]:
    """How recognisable decoded samples are: mean max-softmax confidence, fraction classified
    with confidence > 0.9, and the entropy of the predicted-class histogram divided by
    log(classes) (1 = all classes equally often, 0 = one class only)."""
    prob = torch.cat([clf(images[i:i + 1000]).softmax(1) for i in range(0, len(images), 1000)])
    conf, pred = prob.max(1)
    hist = torch.bincount(pred, minlength=num_classes).double() / len(pred)
    ent = -(hist[hist > 0] * hist[hist > 0].log()).sum() / math.log(max(2, num_classes))
    return {"mean_confidence": float(conf.mean()), "frac_confident": float((conf > 0.9).double()
            .mean()), "class_entropy": float(ent) + 0.0}  # + 0.0: one class is 0, not -0
