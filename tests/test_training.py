"""The training loop and the diffusion objective: closed forms, determinism, exact resume."""

import math
import os

import pytest
import torch

from difflab.data import load_dataset
from difflab.errors import ConfigError, DifflabError
from difflab.models.unet import UNet2DModel, UNetConfig
from difflab.training import TrainConfig, train
from difflab.training.loop import lr_factor
from difflab.training.objectives import DiffusionConfig, DiffusionObjective

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(False, True),
            norm_num_groups=4, attention_head_dim=8, sample_size=8)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _task(seed=0, **dkw):
    torch.manual_seed(seed)
    return DiffusionObjective(UNet2DModel(UNetConfig(**TINY)), DiffusionConfig(**dkw))


def _cfg(**kw):
    base = dict(batch_size=16, lr=1e-3, warmup_steps=2, progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


class _Echo(torch.nn.Module):
    """A fake network returning a fixed tensor, to read the objective's target off the loss."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.config = None

    def forward(self, x, t, class_labels=None):
        from difflab.models.unet import UNetOutput
        self.seen = (x, t)
        return UNetOutput(self.out)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_objective_targets_match_closed_form(pred):
    cfg = DiffusionConfig(prediction_type=pred, min_snr_gamma=None)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    net = _Echo(torch.zeros(4, 1, 8, 8))
    task = DiffusionObjective(net, cfg)
    g = torch.Generator().manual_seed(0)
    loss = task.training_loss({"images": x0, "labels": torch.zeros(4, dtype=torch.long)}, g)
    g = torch.Generator().manual_seed(0)  # replay the draws: t, then ε
    t = torch.randint(0, 1000, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ab = cfg.make_scheduler().alphas_cumprod.double()[t].view(4, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert torch.allclose(net.seen[0].double(), x_t, atol=1e-6)
    target = {"epsilon": eps.double(), "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0,
              "sample": x0.double()}[pred]
    # the network outputs 0, so the loss is the mean square of the target
    assert math.isclose(loss["loss"].item(), target.pow(2).mean().item(), rel_tol=1e-5)


def test_min_snr_weight_is_capped_snr():
    cfg = DiffusionConfig(min_snr_gamma=5.0)
    task = DiffusionObjective(_Echo(torch.zeros(1, 1, 2, 2)), cfg)
    snr = task.snr.double()
    w_eps = torch.minimum(snr, torch.tensor(5.0).double()) / snr
    assert w_eps[0] < 1e-3 and w_eps[-1] == 1.0  # easy low-noise steps down-weighted


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_min_snr_weight_at_zero_terminal_snr(pred):
    """With zero terminal SNR (ᾱ_T = 0) the weight takes its limit: min(SNR, γ)/SNR → 1 for ε,
    min(SNR, γ)/(SNR + 1) → 0 for v — not 0/0 turned into 0 for ε."""
    cfg = DiffusionConfig(min_snr_gamma=5.0, rescale_betas_zero_snr=True, prediction_type=pred)
    task = DiffusionObjective(_Echo(torch.zeros(2, 1, 2, 2)), cfg)
    assert task.snr[-1] == 0
    zeros, ones = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    out = task.weighted_loss(zeros, torch.tensor([999, 999]), ones, -ones)  # ε, x₀: targets ±1
    assert out["mse"].item() == 1.0
    assert out["loss"].item() == (1.0 if pred == "epsilon" else 0.0)


def test_lr_schedule_warmup_then_cosine():
    cfg = _cfg(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("warmup,schedule", [(0, "cosine"), (10, "cosine"), (10, "constant"),
                                             (0, "constant")])
def test_lr_schedule_of_a_device_count_rounds_as_the_hosts(warmup, schedule):
    """The lazy guard's LR comes from a float64 tensor step (no host sync): the same value,
    bit for bit, as the host's from an int."""
    cfg = _cfg(warmup_steps=warmup, lr_schedule=schedule, min_lr_ratio=0.05)
    for step in (0, 1, 9, 10, 11, 37, 55, 109, 110, 200):
        host = lr_factor(step, cfg, 110)
        device = lr_factor(torch.tensor(float(step), dtype=torch.float64), cfg, 110)
        assert torch.is_tensor(device) and float(device) == host, step  # (no host copy)
        assert 0.05 <= host <= 1.0


def test_training_lowers_the_loss(digits):
    res = train(_task(), digits.images, digits.labels, _cfg(max_steps=60, lr=3e-3))
    first = sum(h["loss"] for h in res.history[:10]) / 10
    last = sum(h["loss"] for h in res.history[-10:]) / 10
    assert last < 0.7 * first


def test_same_seed_same_weights(digits):  # deterministic: GPU kernels too (CPU is anyway)
    cfg = _cfg(max_steps=5, deterministic=True)
    a = train(_task(), digits.images, digits.labels, cfg).raw_model
    b = train(_task(), digits.images, digits.labels, cfg).raw_model
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("lazy", [False, True])  # True: fused AdamW + the GPU's sync-free guard
def test_resume_is_bit_exact(digits, tmp_path, lazy):
    full = train(_task(), digits.images, digits.labels,
                 _cfg(max_steps=8, lazy_guard=lazy, deterministic=True), out_dir=tmp_path / "a")

    class Kill(Exception):
        pass

    def die(model, step):
        if step == 4:
            raise Kill

    with pytest.raises(Kill):
        train(_task(), digits.images, digits.labels,
              _cfg(max_steps=8, checkpoint_every=4, lazy_guard=lazy, deterministic=True),
              out_dir=tmp_path / "b", on_checkpoint=die)
    resumed = train(_task(seed=123), digits.images, digits.labels,
                    _cfg(max_steps=8, checkpoint_every=4, lazy_guard=lazy, deterministic=True),
                    out_dir=tmp_path / "b", resume=True)
    assert resumed.steps == 8
    for (k, va), vb in zip(full.raw_model.state_dict().items(),
                           resumed.raw_model.state_dict().values()):
        assert torch.equal(va, vb), k
    for va, vb in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(va, vb)  # the EMA too


def test_deterministic_kernels_hold_during_training_only(digits, monkeypatch, tmp_path):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True
    seen = []

    def look(model, step):
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(),
                     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                     os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
    try:
        train(_task(), digits.images, digits.labels, _cfg(max_steps=2, deterministic=True),
              out_dir=tmp_path / "a", on_checkpoint=look)
        inside = seen[-1]
        look(None, 0)
        train(_task(), digits.images, digits.labels, _cfg(max_steps=2), out_dir=tmp_path / "b",
              on_checkpoint=look)
    finally:
        torch.backends.cudnn.benchmark = False
    assert inside == (True, False, True, False, ":4096:8")
    assert seen[-2] == seen[-1] == (False, False, False, True, None)  # restored; off by default


def test_an_op_without_deterministic_variant_is_a_clear_error(digits):
    class Alerting(torch.nn.Module):  # what PyTorch raises for such an op under the strict mode
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def training_loss(self, batch, generator=None):
            raise RuntimeError("kthvalue CUDA does not have a deterministic implementation, but "
                               "you set 'torch.use_deterministic_algorithms(True)'. You can ...")

    with pytest.raises(DifflabError, match=r"^deterministic training: kthvalue CUDA has no "):
        train(Alerting(), digits.images, digits.labels, _cfg(max_steps=1, deterministic=True))
    with pytest.raises(RuntimeError, match="kthvalue"):  # not asked for: PyTorch's own error
        train(Alerting(), digits.images, digits.labels, _cfg(max_steps=1))


def test_resume_without_checkpoint_is_a_clear_error(digits, tmp_path):
    with pytest.raises(DifflabError, match="no training checkpoint"):
        train(_task(), digits.images, digits.labels, _cfg(max_steps=2), out_dir=tmp_path,
              resume=True)


def test_resume_refuses_other_settings_or_data(digits, tmp_path):
    """A checkpoint continues only its own run: a changed budget, LR, batch size or data set
    is one clear error naming what changed, not a silently different run; reporting settings
    may change; a hand-broken state.json is a CheckpointError."""
    import json

    from difflab.errors import CheckpointError

    x, y = digits.images[:64], digits.labels[:64]
    train(_task(), x, y, _cfg(max_steps=2), out_dir=tmp_path)
    for change, match in (({"max_steps": 4}, "max_steps=2 \\(now 4\\)"),
                          ({"lr": 0.05, "batch_size": 8}, "batch_size=.*lr=")):
        with pytest.raises(DifflabError, match=match):
            train(_task(), x, y, _cfg(**{"max_steps": 2, **change}), out_dir=tmp_path,
                  resume=True)
    with pytest.raises(DifflabError, match="other data"):
        train(_task(), x.flip(0), y, _cfg(max_steps=2), out_dir=tmp_path, resume=True)
    done = train(_task(), x, y, _cfg(max_steps=2, progress=True, checkpoint_minutes=1.0),
                 out_dir=tmp_path, resume=True)
    assert done.steps == 2
    state = tmp_path / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    del meta["history"]
    state.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="history"):
        train(_task(), x, y, _cfg(max_steps=2), out_dir=tmp_path, resume=True)


def test_checkpoints_by_time_and_on_ctrl_c_resume_exactly(digits, tmp_path):
    """By default a checkpoint is written every few minutes (here: every step), and Ctrl-C
    (SIGINT) lets the step in progress finish, writes a checkpoint and stops; resumed, the run
    ends bit for bit where the uninterrupted one does."""
    import signal

    x, y = digits.images[:64], digits.labels[:64]
    seen = []
    train(_task(), x, y, _cfg(max_steps=4, checkpoint_minutes=1e-9), out_dir=tmp_path / "t",
          on_checkpoint=lambda m, step: seen.append(step))
    assert seen == [1, 2, 3, 4]
    full = train(_task(), x, y, _cfg(max_steps=6)).raw_model.state_dict()

    def ctrl_c(model, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="at step 3; checkpoint in .*--resume"):
        train(_task(), x, y, _cfg(max_steps=6, checkpoint_every=2), out_dir=tmp_path / "c",
              on_checkpoint=ctrl_c)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = train(_task(seed=1), x, y, _cfg(max_steps=6, checkpoint_every=2),
                    out_dir=tmp_path / "c", resume=True)
    assert resumed.steps == 6
    for k, v in resumed.raw_model.state_dict().items():
        assert torch.equal(v, full[k]), k


def test_nonfinite_losses_are_skipped_then_stop(digits):
    class NaNTask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def training_loss(self, batch, generator=None):
            return {"loss": self.w * float("nan")}

    with pytest.raises(DifflabError, match="non-finite"):
        train(NaNTask(), digits.images, digits.labels, _cfg(max_steps=50, max_nonfinite=3,
                                                            channels_last=False))


def test_minutes_budget_calibrates_steps(digits):
    res = train(_task(), digits.images, digits.labels, _cfg(minutes=0.05, warmup_steps=5))
    assert res.steps > 5 and res.seconds < 30


class _Sleepy(torch.nn.Module):
    """One weight; each step sleeps ``delays[i]`` seconds (the last delay repeats): a machine
    whose speed changes, in wall-clock time that compute does not disturb."""

    def __init__(self, delays):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.delays, self.calls = list(delays), 0

    def training_loss(self, batch, generator=None):
        import time

        time.sleep(self.delays[min(self.calls, len(self.delays) - 1)])
        self.calls += 1
        return {"loss": (self.w - 1).pow(2).sum() + 0 * batch["images"].mean()}


def test_minutes_budget_survives_a_slow_start_and_a_resume(digits, tmp_path):
    """A wall-clock budget is spent, not cut short by an early low estimate (0.1 s steps for
    30 steps, then 0.02 s: it had stopped at 58 steps after 3.7 of 6 s), and a resumed run
    keeps the budget (it had run the old estimate to the end, 10.6 s of a 3-s budget, on a
    machine 5× slower)."""
    x, y = digits.images[:32], digits.labels[:32]
    cfg = _cfg(minutes=0.1, warmup_steps=2, ema_decay=None)
    res = train(_Sleepy([0.1] * 30 + [0.02]), x, y, cfg)
    assert 5.5 < res.seconds < 7.0, res.seconds

    class Stop(Exception):
        pass

    def stop_at_40(model, step):
        if step == 40:
            raise Stop

    cfg = _cfg(minutes=0.05, warmup_steps=2, ema_decay=None, checkpoint_every=40)
    with pytest.raises(Stop):
        train(_Sleepy([0.01]), x, y, cfg, out_dir=tmp_path, on_checkpoint=stop_at_40)
    res = train(_Sleepy([0.05]), x, y, cfg, out_dir=tmp_path, resume=True)
    assert 2.7 < res.seconds < 3.6, res.seconds  # elapsed before + after the resume


def test_the_final_loss_is_the_mean_of_the_last_logged_steps():
    from difflab.training import TrainResult

    hist = [{"step": i, "loss": float(i)} for i in range(1, 201)] + [{"step": 201}]
    res = TrainResult(model=None, raw_model=None, steps=201, seconds=1.0, history=hist)
    assert res.final() == sum(range(102, 201)) / 99  # the last 100 entries, 99 with a loss
    assert res.final("loss", n=2) == 200.0 and res.final("accuracy") is None


def test_step_budget_estimates_from_the_latest_window_and_stops_at_the_budget():
    """StepBudget on a simulated clock (100-s budget): the first estimate at step 15 from the
    rate since step 5; after a slow start (5 steps/s, then 20) the estimate at step 60 follows
    the latest window, not the slow average; an estimate reached early is renewed; the budget
    is a hard stop."""
    from difflab.training.budget import StepBudget

    budget, total, t = StepBudget(100.0), None, 0.0
    for step in range(1, 61):
        t += 0.2 if step <= 15 else 0.05
        total, spent = budget.total(step, total, t, t)
        assert not spent
        if step < 15:
            assert total is None
        if step == 15:  # 10 steps in 2 s since step 5, 97 s left
            assert abs(total - (15 + 97 * 5)) <= 1
        if step == 30:  # 25 steps in 2.75 s since step 5: still half the slow start's
            assert abs(total - (30 + 96.25 * 25 / 2.75)) <= 1
    assert abs(total - (60 + 94.75 * 20)) <= 1  # 30 steps in 1.5 s since step 30
    t += 0.05
    renewed, spent = budget.total(61, 61, t, t)  # the estimate reached with time left
    assert renewed > 61 + 90 * 10 and not spent
    assert budget.total(62, renewed, 100.0, 100.0) == (62, True)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(lr=-1.0), dict(lr_schedule="step"),
                                 dict(mixed_precision="fp8"), dict(ema_decay=1.0),
                                 dict(minutes=float("nan"))])
def test_bad_train_config(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_empty_dataset_is_an_error():
    with pytest.raises(DifflabError, match="empty"):
        train(_task(), torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), _cfg())
