"""Captions made from labels and attributes measured on the pixels ("a small thin seven").

Text-to-image needs (image, text) pairs; a labelled data set has only labels. Here each image
gets a caption built from its class name and six attributes computed from its pixels, so that the
words mean something one can check on the image (and on a generated image: the same functions
measure whether "thick" came out thick).

Attributes (v = (x + 1)/2 ∈ [0, 1] is the ink intensity, gray = mean over channels; the ink mask
is m = v > ``ink_threshold``; moments are v-weighted, coordinates in pixels):

    size        ink area  Σm / (H·W)
    thickness   erosion ratio  Σ erode(m) / Σm: the fraction of ink that survives an erosion
                by the 4-neighbour cross; thin strokes vanish, thick ones keep their core
    brightness  mean ink intensity  Σ v·m / Σm
    slant       how far the ink leans, either way: |cov(u, w) / var(w)| with u = column,
                w = −row (upwards); the signed shear is > 0 when the top leans to the right.
                Its low third is "upright", its high third "slanted" (captioners saved before
                2026-11-27 cut the signed shear, so their "upright" third leaned left; they
                keep doing so: ``CaptionConfig.slant_magnitude``)
    x, y        centre of mass (column, row) minus the image centre, divided by W or H

Each attribute is cut into three levels at the training set's 1/3 and 2/3 quantiles
(:class:`Captioner.fit`); the low and high levels have words (``WORDS``), the middle one none.
A caption is ``article + adjectives + class noun + position phrases``; during training each
extreme attribute is named with probability ``p_attribute`` (drawn from the caller's
generator), so the model sees "a seven", "a thin seven", "a small thin seven on the left", …
With ``generator=None`` every extreme attribute is named: the full, deterministic caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.config import Config, check_positive
from difflab.errors import ConfigError
from difflab.rng import batch_rand

ATTRIBUTES = ("size", "thickness", "brightness", "slant", "x", "y")
# attribute → (word for the low third, word for the high third); adjectives precede the noun,
# the position phrases follow it, in this order.
WORDS: dict[str, tuple[str, str]] = {
    "size": ("small", "large"),
    "thickness": ("thin", "thick"),
    "brightness": ("dark", "bright"),
    "slant": ("upright", "slanted"),
    "x": ("on the left", "on the right"),
    "y": ("at the top", "at the bottom"),
}
ADJECTIVES = ("size", "thickness", "brightness", "slant")
PHRASES = ("x", "y")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(kw_only=True)
class CaptionConfig(Config):
    ink_threshold: float = 0.5  # intensity v ∈ [0, 1] above which a pixel counts as ink
    quantiles: tuple[float, float] = (1 / 3, 2 / 3)  # level cuts: low < q₀ ≤ middle ≤ q₁ < high
    p_attribute: float = 0.5  # chance that an extreme attribute is named in a training caption
    # Quantile cuts can be closer than the eye can see (MNIST's ink is near-saturated and its
    # digits are centred on their centre of mass): these floors keep every word visible.
    min_brightness_gap: float = 0.1  # "dark"/"bright" cuts at least this far apart (intensity)
    min_shift_px: float = 1.0  # position words need the centre of mass this many px off centre
    # slant measured as |shear| (so "upright" is the least slanted third); False: the signed
    # shear of captioners saved before this key existed (models trained with those captions)
    slant_magnitude: bool = True

    def validate(self) -> None:
        check_positive("CaptionConfig", "ink_threshold", self.ink_threshold)
        if self.ink_threshold >= 1:
            raise ConfigError(f"CaptionConfig.ink_threshold={self.ink_threshold} must be < 1")
        q = tuple(self.quantiles)
        if len(q) != 2 or not 0.0 < q[0] < q[1] < 1.0:
            raise ConfigError(f"CaptionConfig.quantiles={self.quantiles!r} must be two numbers "
                              "0 < low < high < 1")
        for name in ("min_brightness_gap", "min_shift_px"):
            check_positive("CaptionConfig", name, getattr(self, name), allow_zero=True)
        if not 0.0 <= self.p_attribute <= 1.0:
            raise ConfigError(f"CaptionConfig.p_attribute={self.p_attribute} must be in [0, 1]")


# ----------------------------------------------------------------------------- measurement

def measure_attributes(images: Tensor, ink_threshold: float = 0.5, *,
                       signed_slant: bool = False) -> Tensor:
    """Raw attribute values ``(N, 6)`` float64, columns in ``ATTRIBUTES`` order.

    images: (N, C, H, W) in [-1, 1]. An image without ink gets zeros. Pixel maps stay float32
    (or bool); every sum is accumulated in float64.
    """
    v = ((images.detach().float().mean(1) + 1) / 2).clamp_(0, 1)  # (N, H, W) ink intensity
    n, h, w = v.shape
    m = v > ink_threshold  # (N, H, W) bool ink mask

    def total(t: Tensor) -> Tensor:  # (N, ...) → (N,) float64
        return t.flatten(1).sum(1, dtype=torch.float64)

    area = total(m)
    safe = area.clamp_min(1)
    # erosion by the 4-neighbour cross: a pixel stays ink if it and its four neighbours are ink
    # (the border counts as background); gentler than 3×3, so 2-px strokes of 8×8 digits differ
    p = F.pad(m, (1, 1, 1, 1))
    eroded = m & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]
    thickness = total(eroded) / safe
    brightness = total(v * m) / safe

    mass = total(v).clamp_min(1e-12)  # (N,)
    rows = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    cy = total(v * rows) / mass  # (N,) centre of mass: row
    cx = total(v * cols) / mass  # (N,) column
    du = cols - cx.float().view(n, 1, 1)  # (N, 1, W) horizontal offset
    dw = cy.float().view(n, 1, 1) - rows  # (N, H, 1) vertical offset, upwards
    slant = total(v * du * dw) / total(v * dw * dw).clamp_min(1e-12)  # cov(u, w) / var(w)
    if not signed_slant:
        slant = slant.abs()
    x = (cx - (w - 1) / 2) / w
    y = (cy - (h - 1) / 2) / h
    out = torch.stack([area / (h * w), thickness, brightness, slant, x, y], dim=1)
    return torch.where(area[:, None] > 0, out, torch.zeros_like(out))


def class_word(name: str) -> str:
    """A class name as caption words: digits → number words ("7" → "seven"), "T-shirt/top" →
    "t-shirt" (the first alternative), "Ankle boot" → "ankle boot", "my_cats" → "my cats"."""
    name = name.strip()
    if name.isdigit() and int(name) < len(NUMBER_WORDS):
        return NUMBER_WORDS[int(name)]
    word = " ".join(name.split("/")[0].replace("_", " ").lower().split())
    return word or "image"


def with_article(words: list[str]) -> str:
    """Prefix "a" or "an" by the sound of the next word ("an eight", "a one", "an ankle boot")."""
    first = words[0] if words else ""
    vowel = first[:1] in tuple("aeiou") and not first.startswith(("one", "uni", "use", "eu"))
    article = "an" if vowel else "a"
    return " ".join([article, *words])


# ---------------------------------------------------------------------------- captioner

@dataclass
class AttributeTable:
    """Attributes of N images: raw values and levels (−1 low, 0 middle, +1 high)."""

    values: Tensor  # (N, 6) float64, columns in ATTRIBUTES order
    levels: Tensor  # (N, 6) int64 in {−1, 0, 1}

    def rows(self) -> list[dict[str, float | int]]:
        """One dict per image: ``{"size": 0.21, "size_level": 1, …}`` (JSON/table ready)."""
        out = []
        for vals, levs in zip(self.values.tolist(), self.levels.tolist()):
            row: dict[str, float | int] = {}
            for name, val, lev in zip(ATTRIBUTES, vals, levs):
                row[name] = val
                row[f"{name}_level"] = lev
            out.append(row)
        return out


class Captioner:
    """Turns (images, labels) into captions, with level cuts fitted on a training set.

    ``thresholds``: (6, 2) float64, the low/high cut of each attribute; ``class_words``: the
    caption noun of each class index.
    """

    def __init__(self, thresholds: Tensor, class_words: list[str],
                 config: CaptionConfig | None = None) -> None:
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
        if thresholds.shape != (len(ATTRIBUTES), 2):
            raise ConfigError(f"caption thresholds must have shape ({len(ATTRIBUTES)}, 2), got "
                              f"{tuple(thresholds.shape)}")
        if not class_words:
            raise ConfigError("a captioner needs at least one class word")
        self.thresholds = thresholds
        self.class_words = list(class_words)
        self.config = config or CaptionConfig()

    @classmethod
    def fit(cls, images: Tensor, class_names: list[str],
            config: CaptionConfig | None = None) -> Captioner:
        """Cut each attribute at the ``config.quantiles`` of ``images`` (N, C, H, W), widened
        to the visibility floors ``min_brightness_gap`` and ``min_shift_px``."""
        config = config or CaptionConfig()
        values = measure_attributes(images, config.ink_threshold,
                                    signed_slant=not config.slant_magnitude)
        q = torch.tensor(config.quantiles, dtype=torch.float64)
        cuts = torch.quantile(values, q, dim=0).T.tolist()  # 6 × [low, high]
        b = ATTRIBUTES.index("brightness")
        mid, half = float(values[:, b].median()), config.min_brightness_gap / 2
        cuts[b] = [min(cuts[b][0], mid - half), max(cuts[b][1], mid + half)]
        for name, side in (("x", images.shape[-1]), ("y", images.shape[-2])):
            i, shift = ATTRIBUTES.index(name), config.min_shift_px / side
            cuts[i] = [min(cuts[i][0], -shift), max(cuts[i][1], shift)]
        return cls(torch.tensor(cuts, dtype=torch.float64), [class_word(c) for c in class_names],
                   config)

    # ------------------------------------------------------------------------- measuring

    def table(self, images: Tensor) -> AttributeTable:
        values = measure_attributes(images, self.config.ink_threshold,
                                    signed_slant=not self.config.slant_magnitude)
        lo, hi = self.thresholds[:, 0], self.thresholds[:, 1]
        levels = (values > hi).long() - (values < lo).long()
        return AttributeTable(values, levels)

    # -------------------------------------------------------------------------- captions

    def caption(self, label: int, levels: list[int] | None = None,
                named: list[bool] | None = None) -> str:
        """One caption: class ``label`` with the attributes whose level is ±1 and ``named``."""
        levels = levels or [0] * len(ATTRIBUTES)
        named = named or [True] * len(ATTRIBUTES)
        words = {a: WORDS[a][0 if lev < 0 else 1] for a, lev, keep in
                 zip(ATTRIBUTES, levels, named) if lev != 0 and keep}
        adjectives = [words[a] for a in ADJECTIVES if a in words]
        phrases = [words[a] for a in PHRASES if a in words]
        return with_article([*adjectives, self.class_words[label], *phrases])

    def class_prompts(self) -> list[str]:
        """The bare caption of every class ("a zero", …, "an ankle boot"): zero-shot prompts."""
        return [self.caption(k) for k in range(len(self.class_words))]

    def __call__(self, images: Tensor, labels: Tensor,
                 generator: torch.Generator | None = None) -> list[str]:
        """Captions of images (N, C, H, W) with labels (N,).

        With a generator each extreme attribute is named with probability ``p_attribute``
        (the draw is ``torch.rand((N, 6), generator=generator)`` on the generator's device);
        without one, all of them are (deterministic full captions).
        """
        levels = self.table(images).levels.tolist()
        if generator is None:
            named = [[True] * len(ATTRIBUTES)] * len(levels)
        else:
            u = batch_rand((len(levels), len(ATTRIBUTES)), generator, device=generator.device)
            named = (u < self.config.p_attribute).tolist()
        return [self.caption(int(k), lev, keep)
                for k, lev, keep in zip(labels.tolist(), levels, named)]

    def vocabulary(self) -> list[str]:
        """Every word a caption can contain, sorted (the tokenizer is built from these)."""
        words = {"a", "an"}
        for pair in WORDS.values():
            for phrase in pair:
                words.update(phrase.split())
        for name in self.class_words:
            words.update(name.split())
        return sorted(words)

    # -------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict:
        return {"attributes": list(ATTRIBUTES),
                "thresholds": {a: t for a, t in zip(ATTRIBUTES, self.thresholds.tolist())},
                "class_words": list(self.class_words), "config": self.config.to_dict(),
                "vocabulary": self.vocabulary()}

    @classmethod
    def from_dict(cls, d: dict) -> Captioner:
        try:
            thresholds = [d["thresholds"][a] for a in ATTRIBUTES]
            config = {"slant_magnitude": False, **d.get("config", {})}  # older: signed
            return cls(torch.tensor(thresholds, dtype=torch.float64), d["class_words"],
                       CaptionConfig.from_dict(config))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"captions.json: missing or malformed entry ({e})") from None


def captions_for(dataset, generator: torch.Generator | None = None,
                 captioner: Captioner | None = None) -> list[str]:
    """Captions of every image of an :class:`~difflab.data.ImageDataset`.

    The level cuts are fitted on ``dataset`` itself unless a ``captioner`` (fitted on the
    training split) is given; ``generator`` picks the attribute subsets (None: all named).
    """
    captioner = captioner or Captioner.fit(dataset.images, dataset.class_names)
    out: list[str] = []
    for i in range(0, len(dataset), 4096):
        out += captioner(dataset.images[i:i + 4096], dataset.labels[i:i + 4096], generator)
    return out


__all__ = ["ATTRIBUTES", "WORDS", "AttributeTable", "CaptionConfig", "Captioner",
           "captions_for", "class_word", "measure_attributes"]
