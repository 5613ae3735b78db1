"""Training options: torch.compile in place (names and numbers unchanged), precision per run."""

import pytest
import torch

from difflab.data import load_dataset
from difflab.errors import ConfigError
from difflab.models.unet import UNet2DModel, UNetConfig
from difflab.training import TrainConfig, train
from difflab.training.objectives import DiffusionConfig, DiffusionObjective

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(False, False),
            norm_num_groups=4, attention_head_dim=8, sample_size=8)


def _run(compile_mode: str):
    digits = load_dataset("digits")
    torch.manual_seed(0)
    task = DiffusionObjective(UNet2DModel(UNetConfig(**TINY)), DiffusionConfig())
    cfg = TrainConfig(batch_size=16, lr=1e-3, warmup_steps=2, progress=False, seed=0,
                      max_steps=3, compile=compile_mode, channels_last=False, ema_decay=0.9)
    return train(task, digits.images[:256], digits.labels[:256], cfg)


@pytest.mark.slow  # inductor builds C++ kernels on CPU: ~30 s
def test_compiled_training_matches_eager():
    eager, compiled = _run("no"), _run("default")
    ke, kc = eager.raw_model.state_dict(), compiled.raw_model.state_dict()
    assert list(ke) == list(kc)  # no "_orig_mod." prefixes: checkpoints stay loadable
    for k in ke:
        torch.testing.assert_close(kc[k], ke[k], rtol=1e-4, atol=1e-5, msg=k)
    for a, b in zip(eager.history, compiled.history):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, a["loss"])


def test_compile_mode_is_validated():
    with pytest.raises(ConfigError, match="compile"):
        TrainConfig(compile="fast")


def test_runs_with_different_precisions_in_one_process():
    """Accelerate keeps a process-wide state; a second run asking for bf16 must not be refused."""
    digits = load_dataset("digits")
    for mp in ("no", "bf16", "no"):
        torch.manual_seed(0)
        task = DiffusionObjective(UNet2DModel(UNetConfig(**TINY)), DiffusionConfig())
        cfg = TrainConfig(batch_size=8, max_steps=1, mixed_precision=mp, progress=False)
        res = train(task, digits.images[:32], digits.labels[:32], cfg)
        assert res.steps == 1 and torch.isfinite(torch.tensor(res.history[-1]["loss"]))
