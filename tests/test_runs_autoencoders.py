"""difflab.runs.autoencoders: latent-space tools, the AE-vs-VAE scores, checkpoint evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from difflab.cli import main
from difflab.data import load_dataset
from difflab.errors import CheckpointError
from difflab.experiments.ae_vs_vae import hole_fraction
from difflab.models.autoencoder import Autoencoder
from difflab.models.vae import VAE
from difflab.runs.autoencoders import (
    code_cloud,
    decode_images,
    encode_codes,
    evaluate_vae_checkpoint,
    fit_gaussian,
    latent_plane,
    model_config,
    num_levels,
    random_latents,
)
from difflab.runs.judge import score_samples


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_num_levels_detects_the_grid(digits):
    assert num_levels(digits.images) == 17
    x8 = torch.randint(0, 256, (50, 1, 4, 4)).float() / 127.5 - 1
    assert num_levels(x8) == 256
    assert num_levels(torch.rand(50, 1, 4, 4) * 2 - 1) == 256  # off-grid: 8-bit default


def test_fit_gaussian_recovers_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    A = torch.tensor([[2.0, 0.0], [1.5, 0.5]])
    z = torch.randn(20000, 2, generator=g) @ A.T + torch.tensor([3.0, -1.0])
    mu, L = fit_gaussian(z)
    torch.testing.assert_close(mu, torch.tensor([3.0, -1.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(L @ L.T, A @ A.T, atol=0.1, rtol=0)


def test_random_latents_prior_for_vae_fitted_gaussian_for_ae(digits):
    torch.manual_seed(0)
    vae = VAE(model_config("vae", digits, latent_dim=2, hidden=(16,)))
    ae = Autoencoder(model_config("ae", digits, latent_dim=2, hidden=(16,)))
    codes = torch.randn(5000, 2) * 5 + 10
    z_vae = random_latents(vae, codes, 4000, torch.Generator().manual_seed(1))
    z_ae = random_latents(ae, codes, 4000, torch.Generator().manual_seed(1))
    assert abs(float(z_vae.mean())) < 0.1 and abs(float(z_vae.std()) - 1) < 0.05
    assert abs(float(z_ae.mean()) - 10) < 0.5 and abs(float(z_ae.std()) - 5) < 0.3
    assert latent_plane(vae, digits.image_shape, n=5).shape == (25, 1, 8, 8)
    assert decode_images(ae, z_ae[:3], digits.image_shape).abs().max() <= 1
    x = digits.images[:6]
    torch.testing.assert_close(code_cloud(ae, x), encode_codes(ae, x))
    z_q = code_cloud(vae, x, torch.Generator().manual_seed(0))  # posterior samples, not means
    assert z_q.shape == (6, 2) and not torch.allclose(z_q, encode_codes(vae, x))


def test_hole_fraction_is_about_one_minus_q_when_points_match_the_data():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(3000, 2, generator=g)
    test = torch.randn(1000, 2, generator=g)
    z = torch.randn(2000, 2, generator=g)
    assert hole_fraction(z, train, test, q=0.9) == pytest.approx(0.1, abs=0.04)
    far = torch.randn(500, 2, generator=g) + 8.0
    assert hole_fraction(far, train, test) == 1.0


def test_score_samples_confidence_and_class_entropy():
    class Fixed(torch.nn.Module):
        def forward(self, x):  # class = first pixel, near-certain
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 4).float() * 20

    x = torch.arange(4).repeat(25).float().view(100, 1, 1, 1)
    s = score_samples(Fixed(), x, 4)
    assert s["mean_confidence"] > 0.99 and s["frac_confident"] == 1.0
    assert s["class_entropy"] == pytest.approx(1.0)
    s = score_samples(Fixed(), torch.zeros(10, 1, 1, 1), 4)
    assert s["class_entropy"] == pytest.approx(0.0, abs=1e-12)


def test_evaluate_vae_checkpoint_reads_data_json_and_refuses_non_vaes(tmp_path, capsys):
    common = ["--data", "digits", "--steps", "2", "--hidden", "16", "--no-progress",
              "--eval-n", "10"]
    assert main(["train", "vae", *common, "--iwae-k", "2", "--out", str(tmp_path / "v")]) == 0
    res = evaluate_vae_checkpoint(tmp_path / "v", k=8, n=12)
    assert res["num_images"] == 12 and res["k"] == 8 and res["data"] == "digits"
    assert res["iwae_nll_nats"] <= res["nelbo_nats"] + 1e-3
    assert res["iwae_nll_bits_per_dim"] == pytest.approx(
        res["iwae_nll_nats"] / (64 * math.log(2)))
    assert evaluate_vae_checkpoint(tmp_path / "v" / "model", k=8, n=12) == {
        **res, "checkpoint": str(tmp_path / "v" / "model")}  # seeded: same numbers
    assert main(["train", "ae", *common, "--out", str(tmp_path / "a")]) == 0
    with pytest.raises(CheckpointError, match="VAE"):
        evaluate_vae_checkpoint(tmp_path / "a")


def test_ae_vs_vae_experiment_runs_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["experiment", "ae-vs-vae", "--data", "digits", "--steps", "5", "--hidden",
                 "32", "--n-samples", "100", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "classifier test accuracy" in text
    for col in ("confidence", "conf>0.9", "in holes", "VAE, z ~ N(0, I)"):
        assert col in text
    res = json.loads((out / "results.json").read_text())
    assert res["classifier_accuracy"] > 0.7  # 8×8 digits: an MLP gets ~95% in seconds
    assert [r["model"] for r in res["rows"]][0] == "test images"
    for row in res["rows"][1:]:
        assert 0 <= row["conf>0.9"] <= 1 and 0 <= row["in holes"] <= 1
    html = (out / "report.html").read_text()
    assert html.count("<img") == 4  # two sample grids, two latent scatters


@pytest.mark.parametrize("kind", ["vae", "ae", "linear-ae"])
def test_saved_model_reloads_with_identical_outputs(kind, digits, tmp_path):
    from difflab.models.base import load_model
    from difflab.runs.autoencoders import train_autoencoder
    from difflab.training import TrainConfig

    opts = {} if kind == "linear-ae" else {"hidden": (16,)}
    cfg = model_config(kind, digits, latent_dim=3, **opts)
    tcfg = TrainConfig(max_steps=3, batch_size=32, progress=False, channels_last=False)
    test = digits.subset(20)
    run = train_autoencoder(cfg, digits, test, tcfg, out_dir=tmp_path, iwae_k=2, report=False)
    again = load_model(tmp_path / "model")
    assert again.config == run.model.config
    x = test.images[:7]
    with torch.no_grad():
        torch.testing.assert_close(again(x), run.model(x), rtol=0, atol=0)
        if kind == "vae":
            torch.testing.assert_close(again.encode(x).logvar, run.model.encode(x).logvar,
                                       rtol=0, atol=0)


def test_a_folder_without_test_split_holds_out_a_seeded_tenth(tmp_path, capsys):
    """Without a test/ folder the test set is a seeded 10 % held out of the images (disjoint
    from what trains), not the training set itself — an AE's codes of such "test" images are
    its training codes, which made its hole score exactly 1."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from difflab.errors import DataError
    from difflab.runs.autoencoders import train_test_split

    rng = np.random.default_rng(0)
    for i in range(25):
        (tmp_path / "f" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(
            tmp_path / "f" / f"c{i % 2}" / f"{i}.png")
    spec = str(tmp_path / "f")
    everything = load_dataset(spec)
    train, test = train_test_split(spec, None, everything)
    assert (len(train), len(test)) == (23, 2) and "holding out 2 of its 25" in \
        capsys.readouterr().err
    assert (train.split, test.split) == ("train", "test")
    rows = {tuple(x.flatten().tolist()) for x in everything.images}
    seen = [{tuple(x.flatten().tolist()) for x in d.images} for d in (train, test)]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == rows
    again = train_test_split(spec, None, everything)[1]
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    train, test = train_test_split("digits", None, load_dataset("digits"))
    assert len(test) == len(load_dataset("digits", "test")) and len(train) > len(test)
    one = dataclasses.replace(everything, images=everything.images[:1],
                              labels=everything.labels[:1])
    with pytest.raises(DataError, match="at least 2"):
        train_test_split(spec, None, one)


def test_cli_channels_overwrite_and_held_out_eval(tmp_path, capsys, monkeypatch):
    """A folder mixing gray and color files trains with --channels 1; training again into the
    same --out is refused unless --overwrite; eval of the folder-trained VAE finds its data
    (data.json records the folder) and its held-out test images."""
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mixed").mkdir()
    for i in range(12):
        shape = (8, 8, 3) if i == 0 else (8, 8)
        Image.fromarray(np.full(shape, 20 * i, np.uint8)).save(tmp_path / "mixed" / f"{i}.png")
    argv = ["train", "vae", "--data", "mixed", "--steps", "3", "--no-progress", "--out", "r"]
    assert main(argv) == 2 and "--channels 1 or 3" in capsys.readouterr().err
    assert main([*argv, "--channels", "1"]) == 0
    assert "holding out 2 of its 12" in capsys.readouterr().err
    info = json.loads((tmp_path / "r" / "model" / "data.json").read_text())
    assert info["path"] == str((tmp_path / "mixed").resolve())
    assert main([*argv, "--channels", "1"]) == 2
    assert "holds a run already" in capsys.readouterr().err
    (tmp_path / "r" / "stale.txt").write_text("x")
    assert main([*argv, "--channels", "1", "--overwrite"]) == 0
    assert not (tmp_path / "r" / "stale.txt").exists()
    monkeypatch.chdir(tmp_path / "r")  # the recorded path, not the relative "mixed", is used
    assert main(["eval", "--ckpt", ".", "--metric", "nll", "--n", "2", "--no-progress",
                 "--out", "m.json"]) == 0
    res = json.loads((tmp_path / "r" / "m.json").read_text())
    assert (res["nll"]["data"], res["nll"]["num_images"]) == ("mixed", 2)
    assert math.isfinite(res["nll"]["iwae_nll_nats"])
