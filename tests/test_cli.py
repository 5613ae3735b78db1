"""The command line: exit codes, one-line errors, and the diffusion train → sample path."""

import json
import subprocess
import sys

import pytest
import torch

from difflab.cli import main


def run(*args):
    return main(list(args))


def test_help_lists_the_built_commands(capsys):
    with pytest.raises(SystemExit) as e:
        run("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "data", "train", "sample", "plot"):
        assert cmd in out


@pytest.mark.parametrize("argv", [["data", "info", "imagenet"],
                                  ["data", "info", "/nonexistent/folder"]])
def test_bad_data_is_one_line_exit_2(argv, capsys):
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflab: error:") and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["train", "ddpm", "--steps", "-1"],
                                  ["train", "ddpm", "--lr", "nan"],
                                  ["sample", "--ckpt", "x", "--scheduler", "bogus"],
                                  ["sample", "--ckpt", "x", "--guidance", "nan"],
                                  ["demo", "--minutes", "0"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1


def test_data_info_writes_grid(tmp_path, capsys):
    assert run("data", "info", "digits", "--out", str(tmp_path / "g.png")) == 0
    out = capsys.readouterr().out
    assert "1437" in out and (tmp_path / "g.png").stat().st_size > 100


def test_dry_run_prints_config_and_trains_nothing(tmp_path, capsys):
    assert run("train", "ddpm", "--data", "digits", "--out", str(tmp_path / "r"), "--steps", "3",
               "--dry-run") == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["max_steps"] == 3 and not (tmp_path / "r").exists()
    assert cfg["train"]["mixed_precision"] == "auto"  # the recipe: bf16 where it pays
    assert cfg["train"]["deterministic"] is False
    assert run("train", "ddpm", "--data", "digits", "--mixed-precision", "no", "--deterministic",
               "--dry-run") == 0
    cfg = json.loads(capsys.readouterr().out)["train"]
    assert cfg["mixed_precision"] == "no" and cfg["deterministic"] is True
    assert cfg["bf16_weights"] is None  # on wherever bf16 runs in one process
    for flag, want in (("--bf16-weights", True), ("--no-bf16-weights", False)):
        assert run("train", "ddpm", "--data", "digits", "--mixed-precision", "bf16", flag,
                   "--dry-run") == 0
        assert json.loads(capsys.readouterr().out)["train"]["bf16_weights"] is want


def test_bf16_weights_without_bf16_is_a_one_line_error(tmp_path, capsys):
    assert run("train", "ddpm", "--data", "digits", "--mixed-precision", "no", "--steps", "1",
               "--bf16-weights", "--no-progress", "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bf16_weights needs bf16 mixed precision" in err[0]


def test_train_then_sample(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "ddpm", "--data", "digits", "--out", str(out), "--steps", "3",
               "--batch-size", "8", "--no-progress", "--cond", "class") == 0
    for f in ("model/config.json", "model/model.safetensors", "model/scheduler_config.json",
              "report.html", "samples.png", "metrics.json", "checkpoint/state.json"):
        assert (out / f).is_file(), f
    from difflab.perf import resolve_mixed_precision

    ran = json.loads((out / "metrics.json").read_text())["mixed_precision"]
    assert ran == resolve_mixed_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for p in (a, b):
        assert run("sample", "--ckpt", str(out), "--scheduler", "ddim", "--steps", "3", "--n",
                   "4", "--seed", "7", "--class", "3", "--guidance", "2", "--out", str(p)) == 0
    assert a.read_bytes() == b.read_bytes()  # same seed ⇒ same samples
    for p in (a, b):  # the U-Net in bf16 autocast: deterministic too
        assert run("sample", "--ckpt", str(out), "--steps", "3", "--n", "4", "--mixed-precision",
                   "bf16", "--out", str(p)) == 0
    assert a.read_bytes() == b.read_bytes()
    assert run("sample", "--ckpt", str(out), "--steps", "2", "--n", "2", "--trajectory",
               "--out", str(tmp_path / "c.png")) == 0
    assert (tmp_path / "c-trajectory.png").is_file()
    assert run("sample", "--ckpt", str(out), "--class", "99", "--out", str(a)) == 2
    capsys.readouterr()
    # η belongs to DDIM: with another scheduler it is a one-line error, not a traceback
    assert run("sample", "--ckpt", str(out), "--scheduler", "dpm++", "--eta", "0.5",
               "--out", str(a)) == 2
    err = capsys.readouterr().err
    assert "eta is a DDIM option" in err and err.count("\n") == 1


def test_sample_missing_checkpoint(tmp_path, capsys):
    assert run("sample", "--ckpt", str(tmp_path / "nope")) == 2
    assert "not a difflab diffusion model" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "difflab.cli", "data", "info", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_plot_commands(tmp_path):
    assert run("plot", "schedules", "--out", str(tmp_path / "s.png")) == 0
    assert run("plot", "forward", "--data", "digits", "--out", str(tmp_path / "f.png")) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_an_eager_gpu_run_gets_a_note_on_compiling():
    from difflab.cli import compile_hint
    from difflab.training import TrainConfig

    assert "--compile reduce-overhead" in compile_hint(TrainConfig(minutes=20), cuda=True)
    assert compile_hint(TrainConfig(), cuda=True) is not None  # the default budget
    assert compile_hint(TrainConfig(minutes=20), cuda=False) is None  # CPU: no
    assert compile_hint(TrainConfig(minutes=20, compile="reduce-overhead"), cuda=True) is None
    assert compile_hint(TrainConfig(minutes=2), cuda=True) is None  # short runs: no
    assert compile_hint(TrainConfig(max_steps=500), cuda=True) is None
