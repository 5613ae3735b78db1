"""The feature space of difflab's sample-quality metrics: a classifier per data set, cached.

``get_feature_extractor("fashion-mnist")`` trains :class:`~difflab.models.classifier.
FeatureClassifier` on the train split once (fixed seed and step count, so the same machine gives
the same weights), reports its test accuracy, and caches it as a checkpoint folder

    $DIFFLAB_CACHE/features/<data>-<C>x<H>x<W>-<version>-<steps>steps-seed<seed>/
        config.json  model.safetensors  metrics.json      (DIFFLAB_CACHE: ~/.cache/difflab)

Later calls load that folder (safetensors only; nothing is unpickled). Numbers computed in
this space are "FID-style" scores: comparable across models of one data set and one extractor
version, not with Inception FIDs from papers. The extractor's test accuracy is reported next
to every score, because a feature space is only as meaningful as the classifier behind it.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.data import DATASETS, load_dataset
from difflab.errors import DataError, DifflabError
from difflab.io import read_json
from difflab.models.classifier import FeatureClassifier, FeatureClassifierConfig

# Bump when the architecture or the training recipe changes: old cache folders are then ignored.
FEATURES_VERSION = "v1"

# Training recipe (measured in benchmarks/RESULTS.md, "## Metrics").
BATCH_SIZE = 128
LR = 3e-3
EPOCHS = 4.0  # default budget: 4 passes over the train split ...
MIN_STEPS, MAX_STEPS = 500, 2000  # ... but 500 to 2000 steps (Fashion-MNIST: ~1–2 min on 2 CPUs)


def default_cache_dir() -> Path:
    """``$DIFFLAB_CACHE/features`` if set, else ``~/.cache/difflab/features``."""
    root = os.environ.get("DIFFLAB_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "difflab"
    return base / "features"


def default_steps(num_train: int) -> int:
    """The default training budget for a train split of ``num_train`` images."""
    return int(min(MAX_STEPS, max(MIN_STEPS, math.ceil(EPOCHS * num_train / BATCH_SIZE))))


def _slug(spec: str, name: str) -> str:
    """A file-name-safe key for a data set: its registered name, or folder name + path hash."""
    if spec in DATASETS or spec.lower() in DATASETS:
        return spec.lower()
    digest = hashlib.sha1(str(Path(spec).expanduser().resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{digest}"


@dataclass
class FeatureExtractor:
    """φ: images → features, with what is needed to judge and reproduce it.

    ``extractor(images)`` maps (N, C, H, W) in [-1, 1] to (N, D) float32 features.
    """

    model: FeatureClassifier
    name: str  # e.g. "classifier:fashion-mnist-1x28x28-v1-1407steps-seed0"
    image_shape: tuple[int, int, int]  # (C, H, W) it was trained on
    test_accuracy: float | None  # top-1 accuracy on the data set's test split
    path: Path | None = None  # the cache folder
    trained_now: bool = False  # True when this call trained it (False: loaded from the cache)
    metrics: dict[str, Any] = field(default_factory=dict)  # the cache's metrics.json

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """images: (N, C, H, W) in [-1, 1] → features (N, D) float32 on the CPU."""
        if tuple(images.shape[1:]) != tuple(self.image_shape):
            raise DifflabError(f"feature extractor {self.name} expects images of shape "
                               f"{tuple(self.image_shape)}, got {tuple(images.shape[1:])}")
        self.model.eval()
        dev = next(self.model.parameters()).device
        out = [self.model.features(images[i:i + batch_size].to(dev, torch.float32)).cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.feature_dim)

    def info(self) -> dict[str, Any]:
        """JSON-ready description for metric reports."""
        return {"name": self.name, "path": str(self.path) if self.path else None,
                "test_accuracy": self.test_accuracy, "feature_dim": self.feature_dim,
                "train_seconds": self.metrics.get("train_seconds"),
                "steps": self.metrics.get("steps")}


def get_feature_extractor(dataset_spec: str, *, image_size: int | None = None,
                          channels: int | None = None, steps: int | None = None, seed: int = 0,
                          cache_dir: str | Path | None = None, progress: bool = True,
                          device: str | torch.device = "cpu") -> FeatureExtractor:
    """The feature classifier of ``dataset_spec`` (at ``image_size`` / ``channels`` if given):
    loaded from the cache, or trained on the train split and cached.

    steps: optimisation steps (default :func:`default_steps`; a fixed count, not a time budget,
    so that the weights do not depend on the machine's speed). Progress and the test accuracy
    go to stderr when ``progress``.
    """
    train_set = load_dataset(dataset_spec, "train", image_size=image_size, channels=channels)
    if train_set.num_classes < 2:
        raise DataError(f"{dataset_spec}: the feature classifier needs a labelled data set "
                        "(at least 2 classes); this one has a single class")
    steps = default_steps(len(train_set)) if steps is None else int(steps)
    if steps < 1:
        raise DifflabError(f"feature classifier steps={steps} must be >= 1")
    c, h, w = train_set.image_shape
    key = f"{_slug(str(dataset_spec), train_set.name)}-{c}x{h}x{w}-{FEATURES_VERSION}-" \
          f"{steps}steps-seed{seed}"
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = folder / key
    name = f"classifier:{key}"

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    if (folder / "model.safetensors").is_file() and (folder / "metrics.json").is_file():
        model = FeatureClassifier.from_pretrained(folder, map_location=device).eval()
        metrics = read_json(folder / "metrics.json")
        say(f"feature classifier {key}: cached, test accuracy {_pct(metrics['test_accuracy'])}")
        return FeatureExtractor(model, name, (c, h, w), metrics["test_accuracy"], folder,
                                trained_now=False, metrics=metrics)

    say(f"feature classifier {key}: training {steps} steps on {len(train_set)} images "
        f"(once; cached in {folder})")
    model, metrics = train_feature_classifier(train_set, steps=steps, seed=seed,
                                              progress=progress, device=device)
    try:
        test_set = load_dataset(dataset_spec, "test", image_size=image_size, channels=channels)
        metrics["test_accuracy"] = model.accuracy(test_set.images, test_set.labels)
        metrics["num_test"] = len(test_set)
    except DataError:  # e.g. a folder with only a train split
        metrics["test_accuracy"], metrics["num_test"] = None, 0
    metrics.update(dataset=train_set.name, spec=str(dataset_spec), image_shape=[c, h, w],
                   version=FEATURES_VERSION, seed=seed)
    model.cpu().save_pretrained(folder, extra_files={"metrics.json": metrics})
    model.to(device)
    say(f"feature classifier {key}: test accuracy {_pct(metrics['test_accuracy'])} "
        f"after {metrics['train_seconds']:.0f} s")
    return FeatureExtractor(model, name, (c, h, w), metrics["test_accuracy"], folder,
                            trained_now=True, metrics=metrics)


def train_feature_classifier(data: Any, *, steps: int, seed: int = 0, progress: bool = True,
                             device: str | torch.device = "cpu"
                             ) -> tuple[FeatureClassifier, dict[str, Any]]:
    """Train a fresh :class:`FeatureClassifier` on ``data`` (an ImageDataset) with the standard
    training loop; returns the model (eval mode) and {"steps", "train_seconds", ...}."""
    from difflab.training import TrainConfig, train

    c, h, _ = data.image_shape
    torch.manual_seed(seed)  # initialisation
    model = FeatureClassifier(FeatureClassifierConfig(in_channels=c, image_size=h,
                                                      num_classes=data.num_classes))
    cfg = TrainConfig(max_steps=steps, batch_size=min(BATCH_SIZE, len(data)), lr=LR,
                      warmup_steps=min(100, max(1, steps // 10)), ema_decay=None, seed=seed,
                      progress=progress)
    t0 = time.perf_counter()
    result = train(model, data.images, data.labels, cfg, desc="feature classifier")
    seconds = time.perf_counter() - t0
    model = result.model.to(device).to(memory_format=torch.contiguous_format).eval()
    tail = [r["accuracy"] for r in result.history[-50:]]
    return model, {"steps": result.steps, "train_seconds": seconds, "num_train": len(data),
                   "batch_size": cfg.batch_size, "lr": cfg.lr,
                   "train_accuracy_last50": sum(tail) / max(1, len(tail))}


def _pct(acc: float | None) -> str:
    return "n/a (no test split)" if acc is None else f"{100 * acc:.2f}%"
