"""Captions from labels and pixel attributes: exact measurements on drawn shapes, level cuts,
grammar, determinism and the JSON round trip."""

import json
import math

import pytest
import torch

from difflab.data import load_dataset
from difflab.data.captions import (
    ATTRIBUTES,
    CaptionConfig,
    Captioner,
    captions_for,
    class_word,
    measure_attributes,
    with_article,
)
from difflab.errors import ConfigError

S = 28
A = {name: i for i, name in enumerate(ATTRIBUTES)}


def canvas(n=1):
    return torch.full((n, 1, S, S), -1.0)  # black background


def bar(top, bottom, left, right, value=1.0):
    """One image with the rectangle rows top..bottom-1, cols left..right-1 at intensity value."""
    x = canvas()
    x[0, 0, top:bottom, left:right] = 2 * value - 1
    return x


def test_area_thickness_brightness_of_bars_are_exact():
    thin = bar(4, 24, 13, 15)  # 20×2: no pixel has ink on both sides
    thick = bar(4, 24, 11, 17, value=0.75)  # 20×6 at intensity 0.75
    v = measure_attributes(torch.cat([thin, thick]))
    assert v[0, A["size"]] == pytest.approx(40 / S**2)
    assert v[1, A["size"]] == pytest.approx(120 / S**2)
    assert v[0, A["thickness"]] == 0.0
    assert v[1, A["thickness"]] == pytest.approx((18 * 4) / 120)  # the 18×4 core survives
    assert v[0, A["brightness"]] == pytest.approx(1.0)
    assert v[1, A["brightness"]] == pytest.approx(0.75)


def test_position_is_the_centre_of_mass():
    left, right = bar(10, 14, 2, 6), bar(20, 26, 22, 26)
    v = measure_attributes(torch.cat([left, right]))
    assert v[0, A["x"]] == pytest.approx((3.5 - 13.5) / S)
    assert v[0, A["y"]] == pytest.approx((11.5 - 13.5) / S)
    assert v[1, A["x"]] == pytest.approx((23.5 - 13.5) / S)
    assert v[1, A["y"]] == pytest.approx((22.5 - 13.5) / S)


def test_slant_sign_and_value():
    up, down, vertical = canvas(), canvas(), bar(4, 24, 13, 14)
    for r in range(4, 24):  # "/" leans right: column grows as the row goes up
        up[0, 0, r, 27 - r] = 1
        down[0, 0, r, r] = 1
    signed = measure_attributes(torch.cat([up, down, vertical]), signed_slant=True)
    assert signed[0, A["slant"]] == pytest.approx(1.0)  # one column per row
    assert signed[1, A["slant"]] == pytest.approx(-1.0)
    assert signed[2, A["slant"]] == pytest.approx(0.0)
    v = measure_attributes(torch.cat([up, down, vertical]))  # either way: how far it leans
    assert v[:, A["slant"]].tolist() == pytest.approx([1.0, 1.0, 0.0])


@pytest.mark.parametrize("spec", ["digits", "mnist5k"])
def test_upright_names_the_least_slanted_third(spec):
    """"upright" captions the digits leaning least (either way), "slanted" the most; before,
    the signed shear's low third — mostly left-leaning digits — was called "upright"."""
    ds = load_dataset(spec, "test")
    cap = Captioner.fit(ds.images, ds.class_names)
    lean = measure_attributes(ds.images, signed_slant=True)[:, A["slant"]].abs()
    level = cap.table(ds.images).levels[:, A["slant"]]
    means = [float(lean[level == k].mean()) for k in (-1, 0, 1)]
    assert means[0] < means[1] < means[2]
    assert cap.caption(0, [0, 0, 0, -1, 0, 0]).split()[1] == "upright"


def test_blank_image_measures_zero():
    assert measure_attributes(canvas()).abs().max() == 0


def test_class_words_and_articles():
    assert [class_word(c) for c in ("7", "0", "T-shirt/top", "Ankle boot", "my_cats")] == [
        "seven", "zero", "t-shirt", "ankle boot", "my cats"]
    assert with_article(["eight"]) == "an eight"
    assert with_article(["one"]) == "a one"
    assert with_article(["ankle", "boot"]) == "an ankle boot"
    assert with_article(["small", "eight"]) == "a small eight"


def _population():
    """9 bars: 3 sizes × 3 thicknesses, as class '7'."""
    imgs = [bar(14 - h // 2, 14 + h // 2, 14 - w // 2, 14 - w // 2 + w)
            for h in (8, 14, 20) for w in (1, 3, 7)]
    return torch.cat(imgs), torch.full((9,), 0, dtype=torch.long)


def test_levels_cut_at_quantiles_and_full_captions():
    x, y = _population()
    cap = Captioner.fit(x, ["7"], CaptionConfig(min_brightness_gap=0.0, min_shift_px=0.0))
    levels = cap.table(x).levels
    # the middle third of a continuous attribute gets level 0
    assert (levels[:, A["size"]] == 0).sum() >= 1
    captions = cap(x, y)  # no generator: every extreme attribute named
    assert captions[0].startswith("a small thin") and captions[0].endswith("seven")
    assert captions[-1].startswith("a large thick")


def test_visibility_floors_widen_the_cuts():
    x, _ = _population()
    cap = Captioner.fit(x, ["7"])  # all bars are centred and equally bright
    lo, hi = cap.thresholds[A["x"]].tolist()
    assert lo <= -1 / S and hi >= 1 / S
    assert (cap.table(x).levels[:, [A["brightness"], A["x"], A["y"]]] == 0).all()


def test_captions_are_deterministic_given_a_generator():
    ds = load_dataset("digits")
    cap = Captioner.fit(ds.images, ds.class_names)
    x, y = ds.images[:64], ds.labels[:64]
    a = cap(x, y, torch.Generator().manual_seed(3))
    b = cap(x, y, torch.Generator().manual_seed(3))
    c = cap(x, y, torch.Generator().manual_seed(4))
    assert a == b and a != c
    assert captions_for(ds)[:64] == cap(x, y)  # no generator: the full captions
    names = [class_word(n) for n in ds.class_names]
    assert all(s.split()[-1] in names or "on the" in s or "at the" in s for s in a)


def test_p_attribute_extremes():
    ds = load_dataset("digits")
    x, y = ds.images[:32], ds.labels[:32]
    g = torch.Generator().manual_seed(0)
    bare = Captioner.fit(ds.images, ds.class_names, CaptionConfig(p_attribute=0.0))
    assert bare(x, y, g) == [bare.class_prompts()[k] for k in y.tolist()]
    full = Captioner.fit(ds.images, ds.class_names, CaptionConfig(p_attribute=1.0))
    assert full(x, y, g) == full(x, y)


def test_json_round_trip_and_vocabulary():
    ds = load_dataset("digits")
    cap = Captioner.fit(ds.images, ds.class_names)
    again = Captioner.from_dict(json.loads(json.dumps(cap.to_dict())))
    legacy = cap.to_dict()
    del legacy["config"]["slant_magnitude"]  # saved before the key: the signed shear, as then
    old = Captioner.from_dict(json.loads(json.dumps(legacy)))
    assert not old.config.slant_magnitude and again.config.slant_magnitude
    assert old.table(ds.images).values[:, A["slant"]].min() < 0
    assert again(ds.images[:50], ds.labels[:50]) == cap(ds.images[:50], ds.labels[:50])
    words = set(cap.vocabulary())
    for caption in captions_for(ds):
        assert set(caption.split()) <= words
    assert cap.class_prompts()[8] == "an eight"


@pytest.mark.parametrize("kw", [dict(quantiles=(0.7, 0.3)), dict(p_attribute=1.5),
                                dict(ink_threshold=1.0), dict(min_shift_px=-1.0)])
def test_bad_caption_config(kw):
    with pytest.raises(ConfigError):
        CaptionConfig(**kw)


def test_bad_threshold_shape():
    with pytest.raises(ConfigError):
        Captioner(torch.zeros(3, 2), ["a"])
    assert not math.isnan(float(measure_attributes(canvas(2)).sum()))
