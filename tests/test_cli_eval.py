"""``difflab eval`` end to end on a tiny diffusion checkpoint trained for 2 steps on digits."""

from __future__ import annotations

import json
import math

import pytest

from difflab.cli import main

TINY_UNET = {"block_out_channels": (8, 16), "attention_levels": (False, True),
             "norm_num_groups": 4, "attention_head_dim": 8}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from difflab.data import load_dataset
    from difflab.runs.diffusion import train_diffusion
    from difflab.training import TrainConfig
    from difflab.training.objectives import DiffusionConfig

    out = tmp_path_factory.mktemp("ddpm-digits")
    train_diffusion(load_dataset("digits", "train"), out_dir=out,
                    train_cfg=TrainConfig(max_steps=2, progress=False),
                    diffusion_cfg=DiffusionConfig(num_train_timesteps=100),
                    unet_overrides=TINY_UNET, report=False)
    return out


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    # one feature-classifier cache for the module, never the user's ~/.cache
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path_factory.getbasetemp() / "difflab-cache"))


def _all_finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_all_finite(v) for v in obj)
    return True


def test_eval_sample_metrics_write_json(ckpt, tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main(["eval", "--ckpt", str(ckpt), "--metric", "fid", "kid", "pr", "--n", "40",
               "--steps", "2", "--feature-steps", "20", "--batch-size", "16", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("fid", "kid", "kid_std", "precision", "recall"):
        assert isinstance(res[key], float) and math.isfinite(res[key]), key
    assert res["n"] == 40 and res["n_ref"] == 360 and res["data"] == "digits"
    assert 0.0 <= res["feature_extractor"]["test_accuracy"] <= 1.0
    assert res["scheduler"] == "dpm++"  # recorded with the config that actually sampled
    assert res["scheduler_config"]["algorithm_type"] == "sde-dpmsolver++"
    assert res["scheduler_config"]["timestep_spacing"] == "trailing"
    printed = capsys.readouterr().out
    assert "fid:" in printed and "test accuracy" in printed and "precision:" in printed

    # same seed ⇒ same samples ⇒ same numbers (the classifier now comes from the cache)
    out2 = tmp_path / "m2.json"
    assert main(["eval", "--ckpt", str(ckpt / "model"), "--metric", "fid", "--n", "40",
                 "--steps", "2", "--feature-steps", "20", "--batch-size", "16",
                 "--no-progress", "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["fid"] == res["fid"]

    from difflab.cli_args import DEFAULT_SAMPLE_PRECISION
    from difflab.perf import resolve_mixed_precision

    assert res["mixed_precision"] == resolve_mixed_precision(DEFAULT_SAMPLE_PRECISION, "cpu")
    out3 = tmp_path / "m3.json"  # the U-Net in bf16 autocast: recorded, and a finite score
    assert main(["eval", "--ckpt", str(ckpt), "--metric", "fid", "--n", "40", "--steps", "2",
                 "--feature-steps", "20", "--batch-size", "16", "--no-progress",
                 "--mixed-precision", "bf16", "--out", str(out3)]) == 0
    bf16 = json.loads(out3.read_text())
    assert bf16["mixed_precision"] == "bf16" and math.isfinite(bf16["fid"])


def test_eval_nll_of_diffusion_checkpoint(ckpt, tmp_path, capsys):
    out = tmp_path / "nll.json"
    rc = main(["eval", "--ckpt", str(ckpt), "--metric", "nll", "--n", "6",
               "--nll-timesteps", "3", "--no-progress", "--out", str(out)])
    assert rc == 0
    nll = json.loads(out.read_text())["nll"]
    assert nll["num_images"] == 6 and nll["num_timesteps"] == 3
    assert nll["estimator"] == "stratified" and nll["variance"] == "fixed_large"
    assert _all_finite(nll) and nll["nll_bits_per_dim"] > 0
    assert "bits/dim" in capsys.readouterr().out


def test_eval_nll_of_vae_folder_goes_to_vae_evaluation(tmp_path, monkeypatch, capsys):
    import difflab.runs.autoencoders as ae

    calls = []

    def fake(folder, split, k, n, **kw):
        calls.append((str(folder), split, k, n, kw["data"], kw["seed"]))
        return {"iwae_nll_bits_per_dim": 1.25, "nelbo_bits_per_dim": 1.5}

    monkeypatch.setattr(ae, "evaluate_vae_checkpoint", fake)
    folder = tmp_path / "vae"
    folder.mkdir()
    out = tmp_path / "vae.json"
    assert main(["eval", "--ckpt", str(folder), "--metric", "nll", "--iwae-k", "7", "--n", "5",
                 "--out", str(out)]) == 0
    assert calls == [(str(folder), "test", 7, 5, None, 0)]
    assert json.loads(out.read_text())["nll"]["iwae_nll_bits_per_dim"] == 1.25


@pytest.mark.parametrize("argv, message", [
    (["--metric", "fid", "--n", "0"], "positive integer"),
    (["--metric", "bogus"], "invalid choice"),
    (["--metric", "fid", "--scheduler", "nope"], "invalid choice"),
    (["--metric", "fid", "--nll-timesteps", "-3"], "positive integer"),
])
def test_eval_bad_flags_exit_2_with_one_line(ckpt, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--ckpt", str(ckpt), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("make, argv, message", [
    (lambda p: p / "missing", ["--metric", "fid"], "checkpoint folder not found"),
    (lambda p: p, ["--metric", "fid"], "not a diffusion checkpoint"),
    (None, ["--metric", "fid", "--data", "no-such-set"], "unknown data set"),
    (None, ["--metric", "fid", "--inception-weights", "/nonexistent.pth"], "not found"),
])
def test_eval_user_errors_exit_2_with_one_line(ckpt, tmp_path, make, argv, message, capsys):
    folder = ckpt if make is None else make(tmp_path)
    assert main(["eval", "--ckpt", str(folder), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
