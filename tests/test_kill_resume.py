"""SIGKILL a real `difflab train ddpm` run at different points, `--resume` it, and get the same
bits as an uninterrupted run (CPU, one process).

Kill points:
- ``mid-training``: right after the 2nd checkpoint is on disk, while the run trains on;
- ``checkpoint-partial``: while the 3rd checkpoint's temp folder is half written (model weights
  written, no ``state.json``) — the previous checkpoint must still be complete and loadable;
- ``checkpoint-swap``: between the two renames of the 3rd checkpoint (old one moved aside, new
  one not yet in place) — resume must put the previous one back.
The writer pauses at the last two through the ``DIFFLAB_TEST_PAUSE`` hook of ``difflab.io``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS, EVERY = 20, 4
ARGS = ["train", "ddpm", "--data", "digits", "--steps", str(STEPS), "--checkpoint-every",
        str(EVERY), "--batch-size", "16", "--no-progress", "--seed", "1"]
TENSOR_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors",
                "training_state.safetensors")


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "difflab.cli", *ARGS, "--out", str(out), *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DIFFLAB_TEST_PAUSE"}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _run(out: Path) -> None:
    proc = subprocess.run(_cmd(out, "--resume") if out.exists() else _cmd(out), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _ckpt_step(folder: Path) -> int | None:
    try:
        return json.loads((folder / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(out)
    return out


def _kill_mid_training(out: Path) -> None:
    proc = subprocess.Popen(_cmd(out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while (_ckpt_step(out / "checkpoint") or 0) < 2 * EVERY:
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "model").exists()  # it really was cut short


def _kill_at_pause(out: Path, point: str) -> None:
    # the 3rd checkpoint is the 3rd write but only the 2nd swap (the 1st has nothing to swap)
    nth = 3 if point == "checkpoint-partial" else 2
    proc = subprocess.Popen(_cmd(out), env=_env(DIFFLAB_TEST_PAUSE=f"{point}:{nth}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        for line in proc.stderr:
            if f"test pause at {point}" in line:
                break
        else:
            pytest.fail(f"the run never reached {point} (exit {proc.wait()})")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        watchdog.cancel()
        proc.stderr.close()


def _check_previous_checkpoint_intact(out: Path, point: str) -> None:
    """At the kill, the checkpoint of step 2·EVERY is complete and loadable: in place
    (partial) or moved aside as .checkpoint.old (swap); the temp folder of the 3rd exists."""
    temps = [p for p in out.glob(".checkpoint.*") if p.name != ".checkpoint.old"]
    assert len(temps) == 1
    if point == "checkpoint-partial":
        prev = out / "checkpoint"
        assert not (temps[0] / "state.json").exists()  # half written
    else:
        prev = out / ".checkpoint.old"
        assert not (out / "checkpoint").exists()
        assert _ckpt_step(temps[0]) == 3 * EVERY  # complete, not yet renamed
    assert _ckpt_step(prev) == 2 * EVERY
    for name in TENSOR_FILES:
        assert load_file(str(prev / name))  # complete safetensors files


def _assert_same_bits(a: Path, b: Path) -> None:
    for name in TENSOR_FILES:
        ta, tb = load_file(str(a / "checkpoint" / name)), load_file(str(b / "checkpoint" / name))
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}:{k}"
    ma, mb = load_file(str(a / "model" / "model.safetensors")), \
        load_file(str(b / "model" / "model.safetensors"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    sa, sb = (json.loads((p / "checkpoint" / "state.json").read_text()) for p in (a, b))
    assert [h["loss"] for h in sa["history"]] == [h["loss"] for h in sb["history"]]
    assert sa["step"] == sb["step"] == STEPS


@pytest.mark.parametrize("point", [
    "checkpoint-partial",
    pytest.param("mid-training", marks=pytest.mark.slow),
    pytest.param("checkpoint-swap", marks=pytest.mark.slow),
])
def test_sigkill_then_resume_is_bit_identical(point, reference, tmp_path):
    out = tmp_path / "run"
    if point == "mid-training":
        _kill_mid_training(out)
    else:
        _kill_at_pause(out, point)
        _check_previous_checkpoint_intact(out, point)
    _run(out)  # --resume
    assert not list(out.glob(".checkpoint.*"))  # leftovers of the killed writer are gone
    _assert_same_bits(reference, out)
