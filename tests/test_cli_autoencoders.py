"""``difflab train ae|vae|linear-ae`` and ``difflab experiment …``: exit codes, files, reloads."""

from __future__ import annotations

import json

import pytest
import torch

from difflab.cli import main
from difflab.data import load_dataset
from difflab.models.base import load_model

TINY = ["--data", "digits", "--steps", "3", "--batch-size", "32", "--no-progress",
        "--eval-n", "40"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv", [
    ["train", "vae", "--latent-dim", "0"],
    ["train", "ae", "--hidden", "512,0"],
    ["train", "vae", "--likelihood", "poisson"],
    ["train", "ae", "--beta", "2"],  # a VAE-only flag
    ["train", "vae", "--beta", "-0.5"],
    ["train", "linear-ae", "--arch", "conv"],
    ["train", "vae", "--steps", "5", "--minutes", "1"],
    ["experiment", "pca-vs-linear-ae", "--k", "-1"],
    ["experiment", "ae-vs-vae", "--latent-dim", "x"],
])
def test_bad_flags_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in one_line_error(capsys)


@pytest.mark.parametrize("argv", [
    ["train", "vae", "--data", "no-such-set", "--dry-run"],
    ["train", "linear-ae", "--data", "digits", "--latent-dim", "65", "--dry-run"],
    ["experiment", "pca-vs-linear-ae", "--data", "no-such-set"],
])
def test_user_errors_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    assert one_line_error(capsys).startswith("difflab: error:")


def test_dry_run_prints_resolved_config_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "vae", "--data", "digits", "--out", str(out), "--dry-run",
                 "--latent-dim", "3", "--minutes", "2"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["_class_name"] == "VAE"
    assert cfg["model"]["latent_dim"] == 3 and cfg["model"]["image_size"] == 8
    assert cfg["model"]["likelihood"] == "bernoulli" and cfg["model"]["num_levels"] == 17
    assert cfg["train"]["minutes"] == 2 and cfg["train"]["max_steps"] is None
    assert not out.exists()
    assert main(["train", "vae", "--data", "digits", "--dry-run", "--beta", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["beta"] == 0  # no KL: allowed
    assert main(["train", "ae", "--data", "digits", "--dry-run", "--epochs", "3"]) == 0
    train = json.loads(capsys.readouterr().out)["train"]
    assert train["epochs"] == 3 and train["max_steps"] is None
    assert main(["train", "ae", "--data", "digits", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["max_steps"] == 3000  # the default


@pytest.mark.parametrize("kind,extra", [
    ("vae", ["--hidden", "32,16", "--latent-dim", "2", "--iwae-k", "4"]),
    ("ae", ["--hidden", "32", "--latent-dim", "3"]),
    ("linear-ae", ["--latent-dim", "4", "--tied"]),
])
def test_train_writes_model_report_metrics_and_reloads(kind, extra, tmp_path, capsys):
    out = tmp_path / kind
    assert main(["train", kind, *TINY, "--out", str(out), *extra]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    for name in ("model/config.json", "model/model.safetensors", "model/data.json",
                 "report.html", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 3 and metrics["kind"] == kind
    html = (out / "report.html").read_text()
    assert "Reconstructions" in html and "Latent space" in html
    if kind == "vae":
        like = metrics["test_likelihood"]
        assert like["k"] == 4 and like["num_images"] == 40
        assert like["iwae_nll_nats"] <= like["nelbo_nats"] + 1e-3
        assert "IWAE NLL (k=4)" in html and "bits/dim" in html and "Bernoulli" in html
        assert "decoded latent plane" in html  # 2-D VAE
    else:
        assert "PCA projection" in html if kind == "ae" else "principal angle" in html

    model = load_model(out / "model")
    assert type(model).__name__ == {"vae": "VAE", "ae": "Autoencoder",
                                     "linear-ae": "LinearAutoencoder"}[kind]
    x = load_dataset("digits", "test").images[:5]
    with torch.no_grad():
        assert model(x).shape == x.shape


def test_experiment_pca_vs_linear_ae_on_digits(tmp_path, capsys):
    out = tmp_path / "pca"
    assert main(["experiment", "pca-vs-linear-ae", "--data", "digits", "--k", "3", "--tied",
                 "--n", "400", "--steps", "50", "--lbfgs-steps", "200", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max principal angle (deg)" in text and "reconstruction MSE, PCA" in text
    for name in ("bases.png", "report.html", "metrics.json"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 400 and m["k"] == 3 and m["max_principal_angle_deg"] < 1.0
