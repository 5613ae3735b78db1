"""Training options: torch.compile in place (names and numbers unchanged), precision per run."""

import pytest
import torch

from difflab.data import load_dataset
from difflab.errors import CheckpointError, ConfigError, DifflabError
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


class _Flaky(torch.nn.Module):
    """A data-independent quadratic whose loss is NaN on chosen calls."""

    def __init__(self, bad_calls):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((4,), 2.0))
        self.bad, self.calls = set(bad_calls), 0

    def training_loss(self, batch, generator=None):
        self.calls += 1
        loss = (self.w - 1.0).pow(2).sum()
        loss = loss.reshape(1)  # a (1,)-shaped loss, as some tasks return, must be fine too
        return {"loss": loss * float("nan") if self.calls in self.bad else loss}


def _flaky_run(bad, steps=None, **kw):
    digits = load_dataset("digits")
    cfg = TrainConfig(**{**dict(batch_size=8, lr=0.1, warmup_steps=0, lr_schedule="constant",
                               progress=False, max_nonfinite=10, channels_last=False,
                               ema_decay=0.5, lazy_guard=True, max_steps=steps), **kw})
    return train(_Flaky(bad), digits.images[:64], digits.labels[:64], cfg)


def test_lazy_guard_skips_bad_steps_on_the_device():
    """The sync-free guard (fused AdamW's found_inf, EMA weight 0): NaN steps change nothing,
    and they do not count — max_steps is the number of updates made, the history numbered by
    them, as with the synced guard (before, a skipped step used up one of max_steps on the
    GPU and none on the CPU)."""
    first_bad = _flaky_run(set(range(1, 10)), 2)  # 9 skipped, then two updates
    assert first_bad.skipped_nonfinite == 9 and first_bad.steps == 2
    clean = _flaky_run(set(), 2)
    for name in ("raw_model", "model"):  # the weights and the EMA copy as if never skipped
        assert torch.equal(getattr(first_bad, name).w, getattr(clean, name).w)
    flaky, clean = _flaky_run({2, 3, 20}, 24), _flaky_run(set(), 24)  # > 16: two read-backs
    assert flaky.skipped_nonfinite == 3 and flaky.steps == 24
    assert [h["step"] for h in flaky.history] == list(range(1, 25))
    assert torch.equal(flaky.raw_model.w, clean.raw_model.w)  # Adam's step count undone too
    assert [h["loss"] for h in flaky.history] == [h["loss"] for h in clean.history]
    synced = _flaky_run({2, 3, 20}, 24, lazy_guard=False)
    assert synced.skipped_nonfinite == 3 and synced.history == flaky.history
    assert torch.equal(synced.raw_model.w, flaky.raw_model.w)


def test_lazy_guard_skips_keep_the_lr_schedule_of_updates_made():
    """With warm-up and cosine decay, skipped steps in the lazy guard's read-back window do not
    move the schedule on: each update takes the LR of the number of updates made before it (a
    device count), as with the synced guard — same weights, same EMA, bit for bit (before, the
    steps between a skip and the read-back ran one step ahead per skip)."""
    kw = dict(lr=0.05, warmup_steps=3, lr_schedule="cosine", min_lr_ratio=0.1, max_steps=24)
    lazy = _flaky_run({2, 5, 6, 20}, **kw)
    synced = _flaky_run({2, 5, 6, 20}, lazy_guard=False, **kw)
    assert lazy.skipped_nonfinite == synced.skipped_nonfinite == 4
    assert lazy.history == synced.history
    for name in ("raw_model", "model"):
        assert torch.equal(getattr(lazy, name).w, getattr(synced, name).w), name


def test_lazy_guard_trains_exactly_like_the_synced_guard():
    """The GPU's default guard (fused AdamW's found_inf, EMA weight, losses read back in
    batches) is the CPU's synced guard step for step when every step is finite: same losses,
    same weights, same EMA."""
    digits = load_dataset("digits")
    runs = []
    for lazy in (False, True):
        torch.manual_seed(0)
        task = DiffusionObjective(UNet2DModel(UNetConfig(**TINY)), DiffusionConfig())
        cfg = TrainConfig(batch_size=16, max_steps=30, warmup_steps=2, ema_decay=0.9, seed=0,
                          progress=False, lazy_guard=lazy)
        runs.append(train(task, digits.images, digits.labels, cfg))
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    for name in ("raw_model", "model"):  # the last iterate and the EMA
        a, b = (getattr(r, name).state_dict() for r in runs)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_lazy_guard_stops_after_too_many_nonfinite():
    with pytest.raises(DifflabError, match="3 non-finite losses or gradients in a row"):
        _flaky_run(set(range(1, 200)), 100, max_nonfinite=3)


# these test the CPU's precision and layout choices: on a machine with a GPU the loop trains there
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the loop trains on the GPU here")


@cpu_only
@pytest.mark.parametrize("kernel", [True, False])
def test_cpu_bf16_layout_follows_the_group_norm_kernel_and_fp32(monkeypatch, kernel):
    """Under CPU bf16 the loop trains channels-last when difflab's GroupNorm kernel is there,
    NCHW when it is not (PyTorch's channels-last bf16 GroupNorm is slow on CPU), and either
    run follows the fp32 one: same data, same seed, close losses."""
    import difflab.nn.fused as fused
    import difflab.training.loop as loop

    if kernel and not fused.fused_group_norm_available():
        pytest.skip(f"no C++ toolchain here: {fused._state.get('reason')}")
    monkeypatch.setattr(loop, "fused_group_norm_available", lambda: kernel)
    if not kernel:
        monkeypatch.setitem(fused._state, "module", None)
    digits = load_dataset("digits")
    runs = {}
    for mp in ("no", "bf16"):
        torch.manual_seed(0)
        task = DiffusionObjective(UNet2DModel(UNetConfig(**TINY)), DiffusionConfig())
        cfg = TrainConfig(batch_size=32, max_steps=60, lr=2e-3, warmup_steps=5, seed=0,
                          mixed_precision=mp, channels_last=True, progress=False)
        runs[mp] = train(task, digits.images[:512], digits.labels[:512], cfg)
    w32 = runs["no"].raw_model.unet.down_blocks[0].resnets[0].conv1.weight
    w16 = runs["bf16"].raw_model.unet.down_blocks[0].resnets[0].conv1.weight
    assert w32.is_contiguous(memory_format=torch.channels_last) and not w32.is_contiguous()
    assert w16.is_contiguous(memory_format=torch.channels_last) is kernel
    assert w16.dtype == torch.float32  # fp32 master weights
    tail = {mp: sum(h["loss"] for h in r.history[-20:]) / 20 for mp, r in runs.items()}
    first = runs["no"].history[0]["loss"]
    assert tail["no"] < 0.7 * first and tail["bf16"] < 0.7 * first  # both learn
    assert abs(tail["bf16"] - tail["no"]) < 0.15 * tail["no"]


@cpu_only
@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_precision_trains_in_what_the_cpu_supports(monkeypatch, has_bf16):
    """``mixed_precision="auto"`` resolves per machine, the result says which precision ran,
    and an auto run is the same run as asking for that precision explicitly."""
    import difflab.perf as perf

    monkeypatch.setattr(perf, "cpu_has_bf16_dot_products", lambda cpuinfo=None: has_bf16)
    digits = load_dataset("digits")
    losses = {}
    for mp in ("auto", "bf16" if has_bf16 else "no"):
        torch.manual_seed(0)
        task = DiffusionObjective(UNet2DModel(UNetConfig(**TINY)), DiffusionConfig())
        cfg = TrainConfig(batch_size=8, max_steps=3, mixed_precision=mp, progress=False,
                          ema_decay=None)
        res = train(task, digits.images[:32], digits.labels[:32], cfg)
        assert res.precision == ("bf16" if has_bf16 else "no")
        losses[mp] = [h["loss"] for h in res.history]
    assert losses["auto"] == losses["bf16" if has_bf16 else "no"]


@cpu_only
def test_fp16_on_a_cpu_says_it_trains_in_float32():
    digits = load_dataset("digits")
    torch.manual_seed(0)
    task = DiffusionObjective(UNet2DModel(UNetConfig(**TINY)), DiffusionConfig())
    cfg = TrainConfig(batch_size=8, max_steps=1, mixed_precision="fp16", progress=False)
    with pytest.warns(UserWarning, match="fp16 autocast needs a CUDA GPU"):
        res = train(task, digits.images[:16], digits.labels[:16], cfg)
    assert res.precision == "no"


def test_compile_options_are_added_to_the_modes_settings_per_device(monkeypatch):
    """training.loop.COMPILE_OPTIONS[device type] goes on top of the mode's inductor settings
    (CUDA graphs for reduce-overhead kept); other device types compile with the mode alone."""
    from difflab.training import loop

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(kw))
    task = DiffusionObjective(UNet2DModel(UNetConfig(**TINY)), DiffusionConfig())
    monkeypatch.setattr(loop, "COMPILE_OPTIONS", {"cuda": {"realize_reads_threshold": 6}})
    loop._compile_networks(task, "reduce-overhead", "cuda")
    loop._compile_networks(task, "reduce-overhead", "cpu")
    loop._compile_networks(task, "default", "cuda")
    assert calls == [{"options": {"triton.cudagraphs": True, "realize_reads_threshold": 6}},
                     {"mode": "reduce-overhead"},
                     {"options": {"realize_reads_threshold": 6}}]


# bf16 weights kept between steps (TrainConfig.bf16_weights, difflab.training.precision)
ATTN = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(False, True),
            norm_num_groups=8, attention_head_dim=16, sample_size=8)


class _Killed(Exception):
    pass


def _kill_at(step):
    """An ``on_checkpoint`` that stops the run right after the checkpoint of ``step``."""
    def hook(model, at):
        if at == step:
            raise _Killed
    return hook


def _bf16_run(bf16_weights, steps, out=None, resume=False, lazy=None, ema=0.9,
              channels_last=True, on_checkpoint=None):
    digits = load_dataset("digits")
    torch.manual_seed(0)
    task = DiffusionObjective(UNet2DModel(UNetConfig(**ATTN)), DiffusionConfig())
    cfg = TrainConfig(batch_size=16, lr=3e-3, warmup_steps=2, progress=False, seed=0,
                      max_steps=steps, mixed_precision="bf16", bf16_weights=bf16_weights,
                      lazy_guard=lazy, ema_decay=ema, grad_clip=0.5, checkpoint_every=2,
                      channels_last=channels_last)
    return train(task, digits.images[:256], digits.labels[:256], cfg, out_dir=out,
                 resume=resume, on_checkpoint=on_checkpoint)


@pytest.mark.parametrize("lazy,channels_last", [(None, True), (True, False)])
def test_bf16_weights_train_exactly_like_autocasts_casts(lazy, channels_last):
    """The same run, bit for bit: autocast's per-step casts and the kept bf16 copies round the
    same way, and the optimizer, clipping, guard and EMA see the float32 masters. The trained
    module comes back float32 (its conv weights were bf16 while training)."""
    plain = _bf16_run(False, 5, lazy=lazy, channels_last=channels_last)
    kept = _bf16_run(True, 5, lazy=lazy, channels_last=channels_last)
    for a, b in ((plain.raw_model, kept.raw_model), (plain.model, kept.model)):  # + the EMA
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for k in sa:
            assert sb[k].dtype == sa[k].dtype == torch.float32, k
            assert torch.equal(sa[k], sb[k]), k
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in kept.history]


def test_bf16_weights_checkpoint_float32_and_resume_exactly(tmp_path):
    """Checkpoints hold the float32 masters (not their bf16 copies): a 4-step run stopped after
    its step-2 checkpoint and resumed ends where the same stop-and-resume ends with autocast's
    casts, and where the uninterrupted run ends."""
    from difflab.io import load_tensors

    ends = []
    # (the last: a run without them resumed with them, as the default now is: allowed, the
    # same numbers)
    for kept, resumed in ((True, True), (False, False), (False, None)):
        out = tmp_path / f"{kept}-{resumed}"
        with pytest.raises(_Killed):
            _bf16_run(kept, 4, out=out, on_checkpoint=_kill_at(2))
        saved = load_tensors(out / "checkpoint" / "model.safetensors")
        assert saved and all(v.dtype == torch.float32 for v in saved.values())
        ends.append(_bf16_run(resumed, 4, out=out, resume=True))
    assert ends[0].steps == 4 and [e.bf16_weights for e in ends] == [True, False, True]
    whole = _bf16_run(True, 4).raw_model.state_dict()
    for k, v in ends[0].raw_model.state_dict().items():
        for other in ends[1:]:
            assert torch.equal(v, other.raw_model.state_dict()[k]), k
        assert torch.equal(v, whole[k]), k


def test_bf16_weights_need_bf16_precision():
    digits = load_dataset("digits")
    task = DiffusionObjective(UNet2DModel(UNetConfig(**TINY)), DiffusionConfig())
    cfg = TrainConfig(batch_size=8, max_steps=1, mixed_precision="no", bf16_weights=True,
                      progress=False)
    with pytest.raises(ConfigError, match="bf16_weights needs bf16"):
        train(task, digits.images[:32], digits.labels[:32], cfg)


@pytest.mark.parametrize("precision,asked,held", [("bf16", None, True), ("bf16", False, False),
                                                   ("no", None, False), ("bf16", True, True)])
def test_bf16_weights_are_on_by_default_wherever_they_apply(precision, asked, held):
    """The same training bit for bit (above), fewer kernels on a GPU: on by default with bf16
    in one process, off without bf16 (no error), off when switched off."""
    digits = load_dataset("digits")
    torch.manual_seed(0)
    task = DiffusionObjective(UNet2DModel(UNetConfig(**TINY)), DiffusionConfig())
    cfg = TrainConfig(batch_size=8, max_steps=1, mixed_precision=precision,
                      bf16_weights=asked, progress=False)
    res = train(task, digits.images[:32], digits.labels[:32], cfg)
    assert res.bf16_weights is held
    assert all(p.dtype == torch.float32 for p in res.raw_model.parameters())  # float32 after


class _Idle(torch.nn.Module):
    """A matrix, a bias and a scalar that the loss does not depend on: AdamW's moments stay 0,
    so only weight decay can move them."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3, 3))
        self.b = torch.nn.Parameter(torch.ones(3))
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def training_loss(self, batch, generator=None):
        return {"loss": 0.0 * (self.w.sum() + self.b.sum() + self.scale)}


def test_weight_decay_leaves_biases_gains_and_scalars_alone(tmp_path):
    """--weight-decay shrinks matrices and kernels, not 1-D or scalar parameters (biases, norm
    gains, CLIP's logit scale); a checkpoint saved with one parameter group does not resume
    into two silently."""
    digits = load_dataset("digits")
    cfg = TrainConfig(batch_size=8, lr=0.1, warmup_steps=0, lr_schedule="constant",
                      weight_decay=0.5, max_steps=3, progress=False, channels_last=False)
    res = train(_Idle(), digits.images[:16], digits.labels[:16], cfg)
    assert torch.allclose(res.raw_model.w, torch.full((3, 3), (1 - 0.1 * 0.5) ** 3))
    assert torch.equal(res.raw_model.b, torch.ones(3))
    assert float(res.raw_model.scale.detach()) == 2.0
    plain = TrainConfig(batch_size=8, max_steps=2, progress=False, channels_last=False,
                        checkpoint_every=1)
    train(_Idle(), digits.images[:16], digits.labels[:16], plain, out_dir=tmp_path)
    with pytest.raises(CheckpointError, match="parameter group"):
        train(_Idle(), digits.images[:16], digits.labels[:16],
              TrainConfig(**{**plain.to_dict(), "weight_decay": 0.1, "max_steps": 4}),
              out_dir=tmp_path, resume=True)


def _ema_pair(dtype2=torch.float32):
    from difflab.training.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8),
                                torch.nn.Conv2d(8, 4, 1)).to(memory_format=torch.channels_last)
    model[1].to(dtype2)
    return model, EMA(model, decay=0.9)


def test_ema_copy_is_one_flat_buffer_and_a_device_weighted_step_matches_the_scalar_one():
    """The EMA copy's parameters are views of one buffer in their own layouts; a step with a
    0/1 device weight (the lazy guard's) is one lerp over it and gives the scalar step's bits;
    weight 0 leaves the copy exactly as it was."""
    from difflab.training.ema import EMA

    model, flat = _ema_pair()
    _, plain = _ema_pair()
    ema_w = list(flat.model.parameters())
    assert flat._flat is not None and flat._flat.numel() == sum(p.numel() for p in ema_w)
    assert all(p.untyped_storage().data_ptr() == flat._flat.untyped_storage().data_ptr()
               for p in ema_w)
    assert ema_w[0].is_contiguous(memory_format=torch.channels_last)
    made = torch.zeros((), dtype=torch.float64)  # the caller's device count of updates made
    for step in range(12):  # through the warm-up (its weights ≥ 0.5 use lerp's other form)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        before = [p.clone() for p in flat.model.parameters()]
        ok = torch.tensor(step != 4)
        assert flat._flat_matches(ema_w, [p.detach() for p in model.parameters()])
        flat.update(model, weight=ok, made=made)
        if step == 4:  # skipped: unchanged, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(before, flat.model.parameters()))
            plain.update(model, weight=ok, made=made)
            continue
        plain.num_updates = int(made)  # the scalar step at the same warm-up count
        made += ok
        EMA.update(plain, model)
        for a, b in zip(flat.model.parameters(), plain.model.parameters()):
            assert torch.equal(a, b)
    sd = flat.state_dict()  # views of one buffer save and load as separate tensors
    assert sd["0.weight"].is_contiguous(memory_format=torch.channels_last)


def test_ema_falls_back_per_tensor_when_the_buffer_cannot_hold_them():
    """Mixed dtypes: no flat buffer; a parameter replaced from outside: the copy is updated
    per tensor, the replaced one included (never a stale buffer)."""
    model, mixed = _ema_pair(torch.float64)
    assert mixed._flat is None
    first = torch.zeros((), dtype=torch.float64)  # no update made before
    mixed.update(model, weight=torch.tensor(True), made=first)
    model, ema = _ema_pair()
    ema.model[2].weight.data = ema.model[2].weight.data.clone()  # no longer in the buffer
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, weight=torch.tensor(True), made=first)
    want = 1.0 - 1 / 10  # the first step's weight 1 − d₀, d₀ = 1/10
    for p_ema, p in zip(ema.model.parameters(), model.parameters()):
        assert torch.allclose(p_ema, (p - 1.0) + want, atol=1e-6)


def test_ema_keeps_its_lookups_and_follows_tensors_replaced_between_steps():
    """A step reuses what the first one looked up (no module walk) while the same tensors come
    in, and follows a source parameter moved to another layout, a parameter of the copy
    replaced by a new object and a replaced buffer: each step equals lerp on the tensors the
    models hold at that step, bit for bit."""
    from difflab.training.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8),
                                torch.nn.Conv2d(8, 4, 1)).to(memory_format=torch.channels_last)
    model[1].register_buffer("scale", torch.ones(8))
    ema = EMA(model, decay=0.9)
    made = torch.zeros((), dtype=torch.float64)

    def step():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        before = [p.clone() for p in ema.model.parameters()]
        w = (1.0 - torch.clamp((1 + made) / (10 + made), max=0.9)).float()
        ema.update(model, weight=torch.tensor(True), made=made,
                   params=list(model.parameters()))  # a fresh list each step
        made.add_(1)
        for b, p, e in zip(before, model.parameters(), ema.model.parameters()):
            assert torch.equal(e, torch.lerp(b, p.detach(), w))
        assert torch.equal(ema.model[1].scale, model[1].scale)

    step()
    plan = ema._plan
    assert plan is not None and plan.views is not None  # the flat path, looked up once
    step()
    assert ema._plan is plan and plan.views is not None  # reused: a fresh list, same tensors
    model[0].weight.data = model[0].weight.data.contiguous()  # moved: another layout
    step()
    assert ema._plan is plan and plan.views is None  # checked again: per tensor now
    ema.model[2].weight = torch.nn.Parameter(ema.model[2].weight.detach().clone(),
                                             requires_grad=False)  # a new object in the copy
    model[1].scale = torch.full((8,), 3.0)  # a replaced buffer
    step()
    assert ema._plan is not plan


@pytest.mark.parametrize("stage", ["clip", "autoencoder"])
def test_bf16_weights_train_the_ldm_stages_exactly_like_autocasts_casts(stage):
    """bf16 weight copies are the default for every bf16 run, so also for latent diffusion's
    CLIP and autoencoder stages (other modules than the U-Net): the same weights, bit for bit."""
    from difflab.runs.clip import CaptionedCLIP, build_clip
    from difflab.runs.ldm import LDMConfig, build_vae

    digits = load_dataset("digits")
    runs = []
    for kept in (False, True):
        torch.manual_seed(0)
        if stage == "clip":
            model, tokenizer, captioner = build_clip(digits, None)
            task = CaptionedCLIP(model, captioner, tokenizer)
        else:
            task = build_vae(digits, LDMConfig())
        cfg = TrainConfig(batch_size=32, max_steps=3, lr=1e-3, warmup_steps=1, seed=0,
                          mixed_precision="bf16", bf16_weights=kept, ema_decay=0.9,
                          progress=False)
        runs.append(train(task, digits.images[:128], digits.labels[:128], cfg))
    assert [r.bf16_weights for r in runs] == [False, True]
    for name in ("raw_model", "model"):
        a, b = (getattr(r, name).state_dict() for r in runs)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
