"""Grids, plots and the HTML report writer."""

import base64
import re

import numpy as np
import torch
from PIL import Image

from difflab.viz import Report, make_grid, plot_latent_scatter, plot_loss_curves, save_grid


def test_grid_layout_and_values():
    imgs = torch.full((5, 1, 4, 4), -1.0)
    imgs[2] = 1.0
    g = make_grid(imgs, nrow=3, padding=1, pad_value=128)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 1) and g.dtype == np.uint8
    assert g[1, 1, 0] == 0 and g[1, 11, 0] == 255  # image 0 black, image 2 white
    assert g[0, 0, 0] == 128  # padding
    assert g[6:10, 11:15].max() == 128  # the sixth cell is empty padding


def test_grid_rgb_scale_and_clipping(tmp_path):
    imgs = torch.linspace(-3, 3, 2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    g = make_grid(imgs, nrow=2, padding=0, scale=3)
    assert g.shape == (6, 12, 3) and g.min() == 0 and g.max() == 255
    p = save_grid(imgs, tmp_path / "g.png")
    assert Image.open(p).size[0] >= 56


def test_report_embeds_images_and_tables(tmp_path):
    png = plot_loss_curves({"a": [(i, 1.0 / (i + 1)) for i in range(100)]}, tmp_path / "l.png")
    z = np.random.default_rng(0).normal(size=(50, 2))
    sc = plot_latent_scatter(z, np.arange(50) % 3, ["x", "y", "z"], tmp_path / "s.png")
    rep = Report("t <1>")
    rep.heading("h")
    rep.text("a & b")
    rep.image(png, "loss")
    rep.image(sc, "scatter")
    rep.image(np.zeros((4, 4, 1), np.uint8), "array")
    rep.table([{"part": "x", "seconds": 1.23456}])
    out = rep.save(tmp_path / "r.html")
    html = out.read_text()
    assert "t &lt;1&gt;" in html and "a &amp; b" in html and "1.235" in html
    blobs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(blobs) == 3
    for b in blobs:
        assert base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n"
