"""`difflab demo` end to end on the tiny digits set with a tiny budget."""

import json
import re

from difflab.cli import main


def test_demo_writes_the_full_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--data", "digits", "--minutes", "0.15", "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    for section in ("Data", "Autoencoder and VAE", "Latent spaces", "Diffusion (DDPM)",
                    "Denoising trajectory", "Timings"):
        assert section in html, section
    assert len(re.findall(r"data:image/png;base64,", html)) >= 10
    timings = json.loads((out / "timings.json").read_text())
    parts = [t["part"] for t in timings]
    assert any("VAE" in p for p in parts) and any("DDPM" in p for p in parts)
    for sub in ("ae", "vae", "ddpm/model"):
        assert (out / sub / "model.safetensors").is_file()
    for png in ("ddpm_samples.png", "ddpm_trajectory.png", "vae_latent.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "guidance scale 2" in html and "g = 0, 1, 2, 3, 7" in html


def test_demo_dry_run(capsys):
    assert main(["demo", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == "mnist5k"
