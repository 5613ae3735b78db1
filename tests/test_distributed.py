"""Data-parallel training: 2 CPU processes (torchrun, gloo) give the one-process update on the
same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflab.rng import BatchShard, ShardedGenerator, batch_rand, batch_randint, batch_randn

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker  # noqa: E402

# Tolerance of the 2-process vs 1-process weights after a few AdamW steps (lr 1e-2 / 3e-3):
# the gradients differ only by summation order ((g_a + g_b)/2 vs the mean over 8 rows), ~1e-7
# relative to the gradient's norm, but Adam divides each element by its own magnitude, so an
# element with a near-zero gradient moves by a visibly different fraction of lr (seen: 1.5e-5).
ATOL, RTOL = 5e-5, 1e-4
# Attention key biases: a softmax does not change when a row of logits is shifted, so their
# gradient is zero up to rounding, which Adam turns into ±lr steps: those weights are rounding
# noise in both runs, equal only by luck (seen: 1.4e-4 apart).
ZERO_GRAD = ("to_k.bias", "k_proj.bias")


def _load(prefix: Path) -> tuple[dict, dict, dict]:
    from safetensors.torch import load_file
    return (load_file(f"{prefix}.raw.safetensors"), load_file(f"{prefix}.ema.safetensors"),
            json.loads(Path(f"{prefix}.losses.json").read_text()))


def test_sharded_draws_are_rows_of_the_global_draw():
    full = torch.Generator().manual_seed(5)
    want = (torch.randint(0, 1000, (6,), generator=full), torch.randn(6, 3, generator=full),
            torch.rand(6, generator=full))
    for rank in range(3):
        g = ShardedGenerator("cpu", BatchShard(2 * rank, 2 * rank + 2, 6))
        g.manual_seed(5)
        got = (batch_randint(0, 1000, (2,), g), batch_randn((2, 3), g), batch_rand((2,), g))
        for w, x in zip(want, got):
            assert torch.equal(w[2 * rank:2 * rank + 2], x)
    with pytest.raises(ValueError, match="per-row draw"):
        batch_randn((5, 3), ShardedGenerator("cpu", BatchShard(0, 2, 6)))


def _torchrun(out: Path, kind: str) -> None:
    """The worker's ``kind`` run in 2 processes (torchrun, gloo on CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(_ddp_worker.__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    for _attempt in range(2):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", _ddp_worker.__file__, str(out), kind],
                              env=env, capture_output=True, text=True, timeout=240)
        # gloo's rare abort at interpreter exit (difflab.training.close_process_group: ~1 run
        # in 20 of this test still hits it on a loaded 2-core machine) gets one more launch;
        # any other failure, or the abort twice, fails the test
        if proc.returncode == 0 or "terminate called without an active exception" not in \
                proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_same_weights(one: tuple[dict, dict], two: tuple[dict, dict]) -> None:
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a:
            if not k.endswith(ZERO_GRAD):
                torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=k)


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    two = tmp_path / "two"
    _torchrun(two, "unet")
    raw2, ema2, log2 = _load(two)
    assert log2["world_size"] == 2

    _ddp_worker.run(str(tmp_path / "one"))
    raw1, ema1, log1 = _load(tmp_path / "one")
    assert log1["world_size"] == 1
    _assert_same_weights((raw1, ema1), (raw2, ema2))
    assert log1["losses"] == pytest.approx(log2["losses"], rel=1e-5)

    # Negative control: one process on the *local* batch (4 rows) is a different run.
    _ddp_worker.run(str(tmp_path / "local"), batch_size=4)
    raw_local, _, _ = _load(tmp_path / "local")
    assert max((raw_local[k] - raw2[k]).abs().max().item() for k in raw2) > 1e-3


def test_clip_contrasts_the_whole_global_batch_across_processes(tmp_path):
    """CLIP's InfoNCE compares each image with every caption of the *global* batch: 2
    processes give the 1-process loss, gradient (DDP's mean) and weights after 3 steps."""
    from safetensors.torch import load_file

    _torchrun(tmp_path / "two", "clip")
    raw2, ema2, log2 = _load(tmp_path / "two")
    grad2 = load_file(f"{tmp_path / 'two'}.grad.safetensors")
    assert log2["world_size"] == 2

    _ddp_worker.run_clip(str(tmp_path / "one"))
    raw1, ema1, log1 = _load(tmp_path / "one")
    grad1 = load_file(f"{tmp_path / 'one'}.grad.safetensors")
    assert log1["first_loss"] == pytest.approx(log2["first_loss"], rel=1e-6)
    assert grad1.keys() == grad2.keys() and "model.logit_scale" in grad1
    for k in grad1:  # the scale too: Adam would hide a gradient that is P times too small
        torch.testing.assert_close(grad1[k], grad2[k], atol=1e-6, rtol=1e-4, msg=k)
    assert grad1["model.text_encoder.text_model.encoder.layers.0.self_attn.k_proj.bias"] \
        .abs().max() < 1e-6  # ZERO_GRAD
    _assert_same_weights((raw1, ema1), (raw2, ema2))
    assert log1["losses"] == pytest.approx(log2["losses"], rel=1e-5)



def test_the_readme_torchrun_command_trains_once_and_exits_cleanly(tmp_path):
    """``torchrun --nproc_per_node 2 -m difflab.cli train ddpm …`` (the README's command, CPU):
    both processes exit 0 (the process group is torn down, not left to abort in gloo's
    destructors), only the main process prints and writes the run folder, and the run
    records that 2 processes shared each batch."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "difflab.cli", "train", "ddpm",
                           "--data", "digits", "--steps", "4", "--batch-size", "8",
                           "--out", str(out), "--no-progress", "--mixed-precision", "no"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 4 steps") == 1, proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 4
    assert (out / "model").is_dir() and (out / "samples.png").is_file()


def test_close_process_group_tears_down_only_what_is_up(tmp_path):
    import torch.distributed as dist

    from difflab.training import close_process_group

    close_process_group()  # nothing up: a no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    assert dist.is_initialized()
    close_process_group()
    assert not dist.is_initialized()


def test_bf16_weights_are_refused_with_several_processes(tmp_path):
    """--bf16-weights keeps one process's bf16 gradients (DDP would all-reduce them in bf16):
    two processes get the one-line error and a non-zero exit, not a silently different run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "difflab.cli", "train", "ddpm",
                           "--data", "digits", "--steps", "1", "--batch-size", "8",
                           "--mixed-precision", "bf16", "--bf16-weights", "--no-progress",
                           "--out", str(tmp_path / "r")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "bf16_weights needs bf16 mixed precision and one process (here: bf16, 2 processes)" \
        in proc.stderr
