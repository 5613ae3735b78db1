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

# Tolerance of the 2-process vs 1-process weights after 4 AdamW steps: the gradients differ
# only by summation order ((g_a + g_b)/2 vs the mean over 8 rows), ~1e-7 relative.
ATOL, RTOL = 1e-5, 1e-4


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


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(_ddp_worker.__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", _ddp_worker.__file__, str(two)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw2, ema2, log2 = _load(two)
    assert log2["world_size"] == 2

    _ddp_worker.run(str(tmp_path / "one"))
    raw1, ema1, log1 = _load(tmp_path / "one")
    assert log1["world_size"] == 1
    for a, b in ((raw1, raw2), (ema1, ema2)):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=k)
    assert log1["losses"] == pytest.approx(log2["losses"], rel=1e-5)

    # Negative control: one process on the *local* batch (4 rows) is a different run.
    _ddp_worker.run(str(tmp_path / "local"), batch_size=4)
    raw_local, _, _ = _load(tmp_path / "local")
    assert max((raw_local[k] - raw2[k]).abs().max().item() for k in raw2) > 100 * ATOL
