"""Compose the README's picture (docs/demo.png) from a `difflab demo` folder.

    python scripts/demo_figure.py runs/demo docs/demo.png

Left: the DDPM samples (one class per column) above the denoising trajectory; right: the VAE
latent space. Titles carry the step count, precision and time from the folder's timings.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def main(run: Path, out: Path) -> None:
    timings = json.loads((run / "timings.json").read_text())
    ddpm = next(t for t in timings if t["part"].startswith("DDPM U-Net"))
    precision = "bf16" if "bf16" in ddpm["part"] else "fp32"
    html = (run / "report.html").read_text()
    guidance = html.split("guidance scale ", 1)[1].split('"', 1)[0] if "guidance scale " in html \
        else "?"
    panels = [("ddpm_samples.png", f"DDPM samples (class-conditional, guidance {guidance}), "
               f"{ddpm['steps']:,} steps / {ddpm['seconds'] / 60:.1f} min {precision} on 2 CPU "
               "cores"),
              ("ddpm_trajectory.png", "trajectory: x_t | predicted whole noise | implied x0 | "
               "x_(t-1)"),
              ("vae_latent.png", "VAE latent space (test set)")]
    ims = {name: Image.open(run / name) for name, _ in panels}
    fig = plt.figure(figsize=(10.2, 6.5), dpi=100)
    spec = fig.add_gridspec(2, 2, width_ratios=[1.45, 1], height_ratios=[1.25, 1])
    places = [spec[0, 0], spec[1, 0], spec[0, 1]]
    for (name, title), place in zip(panels, places):
        ax = fig.add_subplot(place)
        ax.imshow(ims[name], cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=8, loc="left")
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python scripts/demo_figure.py RUN_DIR OUT_PNG")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
