"""The peer names the GPU benchmarks share (benchmarks/_common.py): unet_train.py's --peers,
train_loop.py's --configs and profile_step.py's --variant must mean the same model, settings
and inductor options, and a misspelt name must stop the script before a GPU minute is spent."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflab.models.unet import UNetConfig
from difflab.nn import Upsample, blocks, fused

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import parse_variant  # noqa: E402
from train_loop import loop_variant  # noqa: E402

CFG = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(False, True),
                 norm_num_groups=8, sample_size=8)


def test_suffixes_in_any_order_give_the_same_variant():
    a = parse_variant("difflab-fold-gncl-rr6-ck")
    b = parse_variant("difflab-ck-rr6-gncl-fold")
    assert a.flags == b.flags and a.base == b.base == "difflab"
    assert a.inductor_options("cpu") == {"realize_reads_threshold": 6, "combo_kernels": True}
    assert parse_variant("difflab-gncl").inductor_options("cpu") is None
    assert parse_variant("difflab-gncl-nomix").inductor_options("cpu") == {
        "triton.mix_order_reduction": False}
    # on CUDA difflab's own inductor settings come first, a suffix overrides them; diffusers
    # compiles with inductor's own
    assert parse_variant("difflab").inductor_options("cuda") == {
        "realize_reads_threshold": 6, "max_pointwise_cat_inputs": 32}
    assert parse_variant("difflab-rr4-ck-pc8").inductor_options("cuda") == {
        "realize_reads_threshold": 4, "combo_kernels": True, "max_pointwise_cat_inputs": 8}
    assert parse_variant("diffusers").inductor_options("cuda") is None
    # -rng's own (default-valued) setting: dynamo does not guard on functorch's config, so
    # without it the peer would reuse an earlier peer's compile (seen on this CPU)
    assert parse_variant("difflab-rng").inductor_options("cpu") == {"fallback_random": False}
    layouts = [parse_variant(n).channels_last
               for n in ("difflab", "difflab-nchw", "diffusers", "diffusers-cl")]
    assert layouts == [True, False, False, True]


@pytest.mark.parametrize("name", ["difflab-gncl-rr7", "ddpm", "diffusers-fold", "difflab-cl",
                                  "difflab-fold-nofold", "difflab-gncl-gnpt", "difflab-rr4-rr6",
                                  "diffusers-gnpt", "difflab-pad8-nopad8", "diffusers-pad8"])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError, match=repr(name)):
        parse_variant(name)


def test_train_loop_configs_name_the_same_variants():
    v = loop_variant("bf16-ro-gncl-rr6")
    assert v.flags == {"gncl", "rr6"}
    assert v.inductor_options("cpu") == {"realize_reads_threshold": 6}
    assert loop_variant("bf16-ro-det").flags == frozenset()
    with pytest.raises(ValueError, match="unknown suffix 'r06'"):
        loop_variant("bf16-r06")


def test_train_loop_times_from_a_read_back():
    """With the sync-free guard the host runs ahead of the GPU between read-backs: the steady
    rate is timed from the start of the step after one (at or before half the run)."""
    from train_loop import steady_start

    from difflab.training import loop

    assert loop.READ_BACK_STEPS == 16
    assert [steady_start(n) for n in (60, 40, 100, 20, 8)] == [16, 16, 48, 10, 4]


def test_fold_is_set_per_model_and_switches_per_call(monkeypatch):
    """Each peer starts from what difflab ships for the device (CUDA: the layout-keeping
    GroupNorm in plain operators and the folded upsampling when compiled) and its suffixes
    switch one thing each; an interleaved run's next peer gets the shipped settings back."""
    monkeypatch.setattr(fused, "COMPILED_CHANNELS_LAST_GROUP_NORM", frozenset({"cuda"}))
    monkeypatch.setattr(fused, "CHANNELS_LAST_GROUP_NORM_FORM", "ops")
    monkeypatch.setattr(fused, "LOW_PRECISION_GPU_GROUP_NORM", False)
    monkeypatch.setattr(blocks, "GROUPED_TIME_PROJECTIONS", frozenset({"cuda"}))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    folded = parse_variant("difflab-fold").build(CFG, "cuda")
    plain = parse_variant("difflab").build(CFG, "cuda")
    old = parse_variant("difflab-nofold").build(CFG, "cuda")
    ups = [m for m in folded.modules() if isinstance(m, Upsample)]
    assert ups and all("cuda" in m.fold_on and "cpu" in m.fold_on for m in ups)
    shipped = [m for m in plain.modules() if isinstance(m, Upsample)]
    assert all(not m.folds("cuda") and "cuda" in m.fold_compiled_on for m in shipped)
    assert all(not m.folds("cuda") and not m.fold_compiled_on and m.folds("cpu")
               for m in old.modules() if isinstance(m, Upsample))
    assert "cuda" not in Upsample.fold_on and "cuda" in Upsample.fold_compiled_on  # untouched
    parse_variant("difflab-gncl-gn16-bench").apply("cuda")
    assert fused.COMPILED_CHANNELS_LAST_GROUP_NORM == {"cuda"}
    assert fused.LOW_PRECISION_GPU_GROUP_NORM and torch.backends.cudnn.benchmark
    assert fused.CHANNELS_LAST_GROUP_NORM_FORM == "function"
    parse_variant("difflab-gnpt").apply("cuda")
    assert fused.COMPILED_CHANNELS_LAST_GROUP_NORM == frozenset()
    parse_variant("difflab-gnops").apply("cpu")
    assert fused.COMPILED_CHANNELS_LAST_GROUP_NORM == {"cpu", "cuda"}
    assert fused.CHANNELS_LAST_GROUP_NORM_FORM == "ops"
    parse_variant("difflab-gnsum-tpsplit").apply("cuda")
    assert fused.CHANNELS_LAST_GROUP_NORM_FORM == "sums" and not blocks.GROUPED_TIME_PROJECTIONS
    parse_variant("difflab-tpgroup").apply("cpu")
    assert blocks.GROUPED_TIME_PROJECTIONS == {"cpu", "cuda"}
    monkeypatch.setattr(fused, "GROUP_NORM_TAKES_OFFSET", False)
    parse_variant("difflab-gnoff").apply("cuda")
    assert fused.GROUP_NORM_TAKES_OFFSET
    monkeypatch.setattr(blocks, "PADDED_NARROW_CONVOLUTIONS", frozenset())
    parse_variant("difflab-pad8").apply("cuda")
    assert blocks.PADDED_NARROW_CONVOLUTIONS == {"cuda"}
    parse_variant("difflab-nopad8").apply("cuda")
    assert blocks.PADDED_NARROW_CONVOLUTIONS == frozenset()
    parse_variant("difflab-pad8").apply("cuda")
    import torch._functorch.config as functorch_config

    monkeypatch.setattr(functorch_config, "functionalize_rng_ops", False)
    parse_variant("difflab-rng").apply("cuda")
    assert functorch_config.functionalize_rng_ops
    parse_variant("difflab").apply("cuda")  # the next peer of an interleaved run
    assert not functorch_config.functionalize_rng_ops
    assert blocks.PADDED_NARROW_CONVOLUTIONS == frozenset()  # shipped: not padded (untimed)
    assert fused.COMPILED_CHANNELS_LAST_GROUP_NORM == {"cuda"}
    assert fused.CHANNELS_LAST_GROUP_NORM_FORM == "sums"  # CUDA's since the sixteenth session
    assert blocks.GROUPED_TIME_PROJECTIONS == {"cuda"}
    assert not fused.LOW_PRECISION_GPU_GROUP_NORM and not torch.backends.cudnn.benchmark
    assert not fused.GROUP_NORM_TAKES_OFFSET


def test_per_kernel_extrapolation_matches_kernels_by_origin_not_order():
    """layout_check.py --extrapolate: inductor may order the backward's kernels differently at
    another batch size; each kernel is matched by the FX nodes it was made of, then its bytes
    are extrapolated linearly, and each is timed as no less than the per-kernel floor."""
    from layout_check import extrapolate, kernel_floor

    def compile_at(batch, order):
        kernels = {"w": {"bytes": 600, "ops": "convert_element_type"},  # a weight cast: fixed
                   "a": {"bytes": 1000 * batch, "ops": "mul"},  # an activation: grows
                   "s": {"bytes": 8 * batch + 64, "ops": "sum"}}
        kb = {k: kernels[k] for k in order}
        total = sum(v["bytes"] for v in kernels.values())
        g = {"bytes": total + 5000 * batch, "extern bytes": 5000 * batch, "fused kernel bytes": kb}
        empty = {"bytes": 0, "extern bytes": 0, "fused kernel bytes": {}}
        return {"traffic": {"forward": g, "backward": empty}}

    e = extrapolate(compile_at(4, "was"), compile_at(8, "saw"), 4, 128)
    got = {k["ops"]: k["bytes"] for k in e["fused kernels"]}
    assert got == {"convert_element_type": 600, "mul": 128_000, "sum": 8 * 128 + 64}
    assert e["fused bytes"] == 600 + 128_000 + 8 * 128 + 64
    f = kernel_floor(list(got.values()), bandwidth=1e9, min_s=10e-6)  # 10 µs = 10,000 bytes
    assert f["below the floor"] == 2
    assert f["ms"] == pytest.approx(1e3 * (2 * 10e-6 + 128_000 / 1e9))
    unmatched = compile_at(8, "saw")
    unmatched["traffic"]["forward"]["fused kernel bytes"].pop("s")
    assert "fused kernels" not in extrapolate(compile_at(4, "was"), unmatched, 4, 128)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_bf16_weight_copies_train_exactly_like_autocasts_casts(layout):
    """Candidate -w16 (bf16 weights kept between steps, float32 masters in AdamW) must be the
    same training as autocast casting the float32 weights every step: bit for bit, eager, on
    this CPU, three AdamW steps of a U-Net with attention and (folded) upsampling."""
    from unet_train import make_step

    cfg = UNetConfig(block_out_channels=(16, 32), layers_per_block=1,
                     attention_levels=(False, True), norm_num_groups=8, attention_head_dim=16,
                     sample_size=8, in_channels=3, out_channels=3)
    runs = []
    for w16 in (False, True):
        torch.manual_seed(0)
        variant = parse_variant("difflab" + ("-nchw" if layout == "nchw" else "")
                                + ("-w16" if w16 else ""))
        model = variant.build(cfg, "cpu")
        with torch.no_grad():  # off the zero-initialised output layers
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.02)
        step, model = make_step(model, 4, cfg, torch.device("cpu"), "bf16", variant)
        for _ in range(3):
            step()
        copies = step.bf16_weights
        assert (copies is not None) == w16
        if copies:
            assert all(p.dtype == torch.bfloat16 for p in copies.params)
            assert len(copies.params) > 10
            masters = {id(p): m for p, m in zip(copies.params, copies.masters)}
            state = {n: masters.get(id(p), p) for n, p in model.named_parameters()}
        else:
            state = dict(model.named_parameters())
        runs.append({n: p.detach().clone() for n, p in state.items()})
    assert runs[0].keys() == runs[1].keys()
    for n, p in runs[0].items():
        assert p.dtype == runs[1][n].dtype == torch.float32, n
        assert torch.equal(p, runs[1][n]), n


class _LoseGradient(torch.nn.Module):
    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return torch.zeros_like(grad)

    def forward(self, x):
        return self._Fn.apply(x)


def test_gradient_check_passes_bf16_and_flags_a_wrong_backward():
    """unet_train.py checks each difflab peer's gradients against eager float32 before timing
    it (a compiled candidate with a wrong backward looked 1.5× faster on an H100): bf16
    autocast's rounding passes, a backward that loses one block's gradient does not."""
    from unet_train import (
        GRAD_TOLERANCE,
        grad_error,
        make_step,
        off_zero_init,
        reference_grads,
        worst_gradients,
    )

    cpu = torch.device("cpu")
    want = reference_grads(CFG, 4, cpu)
    assert len(want) == len(list(parse_variant("difflab").build(CFG, "cpu").parameters()))
    assert all(float(g.abs().max()) > 0 for g in want.values() if g.dim() > 1)  # none blind

    def probe(broken: bool) -> dict:
        torch.manual_seed(0)
        variant = parse_variant("difflab")
        model = off_zero_init(variant.build(CFG, "cpu"))
        if broken:  # the gradient into the last block's second GroupNorm's output lost
            model.up_blocks[-1].resnets[-1].dropout = _LoseGradient()
        step, _ = make_step(model, 4, CFG, cpu, "bf16", variant)
        return step.probe()

    ok = grad_error(probe(False), want)
    assert 1e-4 < ok < GRAD_TOLERANCE  # bf16 rounding: not zero, well inside
    broken = probe(True)
    assert grad_error(broken, want) > 0.1
    # named: the lost block's own weights, whose gradients all came through that path
    worst = worst_gradients(broken, want)
    assert worst[0][1] > 0.9 and worst[0][0].startswith("up_blocks.1.resnets.1.")
    assert grad_error({}, want) == pytest.approx(1.0)  # a missing gradient counts as zero


def test_gradient_tolerance_follows_bf16_rounding_and_each_model_has_its_own_reference():
    """The tolerance is 5 %, or 1.5× eager bf16 autocast's own error where that is larger (a
    small model's bf16 rounding can come near 5 %); diffusers' gradients are checked against
    diffusers' own float32 model, not difflab's."""
    pytest.importorskip("diffusers")
    from unet_train import (
        GRAD_TOLERANCE,
        GradientCheck,
        grad_error,
        grad_tolerance,
        make_step,
        off_zero_init,
        reference_grads,
    )

    assert grad_tolerance(0.01) == GRAD_TOLERANCE
    assert grad_tolerance(0.054) == pytest.approx(0.081)
    cpu = torch.device("cpu")
    check = GradientCheck(CFG, 4, cpu)
    own = grad_error(reference_grads(CFG, 4, cpu, "difflab", "bf16"), reference_grads(CFG, 4, cpu))
    assert 1e-4 < own and check.tolerance("bf16") == grad_tolerance(own)
    assert check.tolerance("fp32") == GRAD_TOLERANCE
    torch.manual_seed(0)
    variant = parse_variant("diffusers")
    step, _ = make_step(off_zero_init(variant.build(CFG, "cpu")), 4, CFG, cpu, "bf16", variant)
    grads = step.probe()
    assert 1e-4 < check("diffusers", "bf16", grads) < GRAD_TOLERANCE
    # against difflab's float32 gradients (other initial weights) the same numbers are far off
    assert grad_error(grads, check.reference("difflab")) > 0.5


def test_layout_check_variants_set_the_group_norm_they_name():
    """layout_check.py's gncl is the hand-written backward, gnops the plain operators, whatever
    difflab ships (its default form became "ops" for CUDA: gncl had silently counted gnops)."""
    from contextlib import ExitStack

    from layout_check import variant_patches

    cpu = torch.device("cpu")
    shipped = (fused.COMPILED_CHANNELS_LAST_GROUP_NORM, fused.CHANNELS_LAST_GROUP_NORM_FORM)
    for variant, form in (("gncl", "function"), ("gncl-fold", "function"), ("gnops", "ops"),
                          ("gnsum-fold-w16-tpsplit", "sums"), ("difflab-gncl", "function"),
                          ("fold-gnsum", "sums")):  # the form's word anywhere in the name
        with ExitStack() as stack:
            for patch in variant_patches(variant, cpu, gpu_path=True):
                stack.enter_context(patch)
            assert fused.COMPILED_CHANNELS_LAST_GROUP_NORM == {"cpu"}
            assert fused.CHANNELS_LAST_GROUP_NORM_FORM == form
            assert bool(blocks.GROUPED_TIME_PROJECTIONS) == ("tpsplit" not in variant)
            assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled and blocks.GROUPED_TIME_PROJECTIONS == {"cuda"}
    with ExitStack() as stack:
        for patch in variant_patches("difflab", cpu, gpu_path=False):
            stack.enter_context(patch)
        assert (fused.COMPILED_CHANNELS_LAST_GROUP_NORM,
                fused.CHANNELS_LAST_GROUP_NORM_FORM) == shipped


def test_benchmark_names_are_checked_before_anything_runs():
    """A mode or variant a script does not know is an error, not a silently different row
    (fp16 ran float32; bogus ran plain difflab)."""
    from layout_check import check_variant
    from unet_train import check_mode

    for good in ("fp32", "bf16", "bf16-cl", "bf16-compile", "bf16-cl-ro"):
        assert check_mode(good) == good
    for bad in ("fp16", "bf16-compil", "bf16-ro-cl"):
        with pytest.raises(ValueError, match="unknown mode"):
            check_mode(bad)
    assert check_variant("gnsum-fold-w16") == "gnsum-fold-w16"
    for bad in ("bogus", "difflab-nofold"):
        with pytest.raises(ValueError, match="unknown word"):
            check_variant(bad)


def test_exact_reference_kernels_switch_cudnn_and_tf32_off_and_back():
    """The float32 reference is computed without cuDNN and TF32 (cuDNN's own gradients can be
    far off on H100s, pytorch/pytorch#150700); the process's settings come back after, and on
    a CPU the reference is the same numbers."""
    from unet_train import exact_kernels, reference_grads

    before = (torch.backends.cudnn.enabled, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with exact_kernels():
            assert not torch.backends.cudnn.enabled
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.enabled and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[1]
    # exactly as it was, not merely "TF32 off": inductor's graph cache key reads the setting
    # ("none", a fresh process's, vs "ieee", which allow_tf32 = False writes), and a compile
    # after the reference missed the cache that unet_train's warm-ups fill (a fresh process:
    # PyTorch refuses to mix the setting's old and new names in one)
    code = ("import sys, torch; sys.path.insert(0, 'benchmarks'); from unet_train import "
            "exact_kernels\nwith exact_kernels(): pass\n"
            "print(torch.backends.cuda.matmul.fp32_precision)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout
    assert out.split() == ["none"]
    cpu = torch.device("cpu")
    exact, plain = reference_grads(CFG, 2, cpu, exact=True), reference_grads(CFG, 2, cpu)
    assert exact.keys() == plain.keys()
    assert all(torch.equal(exact[k], plain[k]) for k in exact)


def test_gpu_rules_concatenate_simple_inputs_in_one_kernel_as_a_gpu_compile_does():
    """layout_check.py counts a GPU's compile on a CPU: with the GPU's concatenation rules, a
    concatenation of parameters (plain graph inputs) is one pointwise kernel up to inductor's
    max_pointwise_cat_inputs (8 by default) and one copy kernel per input above it — how the
    22 stacked time-projection weights are concatenated, and what CUDA's
    max_pointwise_cat_inputs=32 changes."""
    from contextlib import nullcontext

    from layout_check import gpu_realize_rules, graph_metrics, split_kernels
    from torch._inductor import config as inductor_config

    def kernels(n, rules, **options):
        pieces = [torch.randn(4, 3) for _ in range(n)]
        torch._dynamo.reset()
        with graph_metrics() as metrics, rules(), \
                inductor_config.patch(fx_graph_cache=False, **options):
            torch.compile(lambda x, *w: x @ torch.cat(w).t())(torch.randn(2, 3), *pieces)
        torch._dynamo.reset()
        (graph,) = metrics
        return len(split_kernels(graph)[1])

    assert kernels(6, nullcontext) == 6  # the CPU's rule: a copy per input
    assert kernels(6, gpu_realize_rules) == 1
    assert kernels(10, gpu_realize_rules) == 10
    assert kernels(10, gpu_realize_rules, max_pointwise_cat_inputs=32) == 1



def test_gradient_probes_drop_the_same_activations_whatever_ran_before():
    """unet_train.py's gradient probe draws dropout's masks from one seed: on a model with
    dropout an eager peer probed after others had drawn random numbers (its float32 gradients
    the reference's exactly) was 5.4 % "off" on an H100 before, and every peer but the first
    marked WRONG. A compiled peer draws its masks from inductor's generator: its tolerance is
    the error of eager with other masks."""
    from dataclasses import replace

    from unet_train import GradientCheck, grad_error, make_step, off_zero_init, reference_grads

    cpu = torch.device("cpu")
    cfg = replace(CFG, dropout=0.1)
    want = reference_grads(cfg, 4, cpu)
    torch.manual_seed(0)
    variant = parse_variant("difflab")
    step, _ = make_step(off_zero_init(variant.build(cfg, "cpu")), 4, cfg, cpu, "fp32", variant)
    torch.rand(1000)  # another peer's steps moved the generator
    assert grad_error(step.probe(), want) == 0
    other = grad_error(step.probe(seed=7), want)
    assert other > 0.02  # other masks: the noise a compiled peer cannot avoid
    check = GradientCheck(cfg, 4, cpu)
    assert check.tolerance("fp32") == 0.05  # eager: float32 is exact
    assert check.tolerance("fp32-compile") == pytest.approx(max(0.05, 1.5 * grad_error(
        reference_grads(cfg, 4, cpu, seed=1235), want)))
    assert GradientCheck(CFG, 4, cpu).tolerance("fp32-compile") == 0.05  # no dropout: no noise
    # an NCHW peer drops other activations than a channels-last one (masks in memory order),
    # so it is checked against the same model in its own layout, on the same noise
    from unet_train import reference_name

    assert [reference_name(p, m) for p, m in (
        ("difflab-nchw", "fp32"), ("difflab-fold", "bf16"), ("diffusers", "bf16"),
        ("diffusers-cl", "fp32"), ("diffusers", "bf16-cl"), ("difflab-nchw", "bf16-cl"))] == [
        "difflab-nchw", "difflab", "diffusers", "diffusers-cl", "diffusers-cl", "difflab"]
    torch.manual_seed(0)
    nchw = parse_variant("difflab-nchw")
    step, _ = make_step(off_zero_init(nchw.build(cfg, "cpu")), 4, cfg, cpu, "fp32", nchw)
    grads = step.probe()
    assert check("difflab-nchw", "fp32", grads) < 1e-5  # (was 0.46: other masks, other noise)
    assert grad_error(grads, want) > 0.02  # against the channels-last model's masks


def test_an_older_src_without_the_newer_switches_still_reads_as_shipped(monkeypatch):
    """gpu.sh part loop runs an earlier difflab's src (.before/src) with today's benchmarks:
    reading what it ships must not need switches added since (they read as off)."""
    import _common

    monkeypatch.delattr(blocks, "PADDED_NARROW_CONVOLUTIONS")
    assert _common._shipped()[4] == frozenset()


def test_warm_compiles_run_side_by_side_report_each_and_drop_their_autotuning(
        tmp_path, monkeypatch, capsys):
    """unet_train --warm-compiles: the warm-ups run N at a time; one that succeeds, fails or
    runs past the time allowed is reported in one line each (the latter two then compile in
    the main process); the autotuning results they wrote (timed on a shared GPU) are removed,
    older ones kept."""
    import argparse
    import time

    from unet_train import warm_compiles

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    old = tmp_path / "ab" / "old.best_config"
    old.parent.mkdir()
    old.write_text("{}")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    log = tmp_path / "log"
    scripts = {  # each peer's stand-in warm-up: when it ran (to see the overlap), then ...
        "ok": f"open('{tmp_path}/ab/new.best_config', 'w').write('{{}}')",
        "bad": "print('a compile error'); raise SystemExit(3)",
        "slow": "time.sleep(30)",
    }

    def command(args, mode, peer):
        return [sys.executable, "-c", f"import time; open('{log}', 'a').write("
                f"'{peer} %f\\n' % time.time()); time.sleep(1); " + scripts[peer]]

    t0 = time.time()
    warm_compiles(argparse.Namespace(), [("bf16-ro", p) for p in scripts], jobs=2, timeout=4,
                  command=command)
    out = capsys.readouterr().out
    assert time.time() - t0 < 15  # the slow one was stopped
    assert re.search(r"^bf16-ro ok: compiled in a subprocess in \d", out, re.M)
    assert re.search(r"^bf16-ro bad: warm-up FAILED after [\d.]+ s \(exit 3: a compile "
                     r"error\); it compiles here$", out, re.M)
    assert re.search(r"^bf16-ro slow: warm-up STOPPED after [\d.]+ s \(the warm-ups' 4 s were "
                     r"up\); it compiles here$", out, re.M)
    started = {line.split()[0]: float(line.split()[1]) for line in log.read_text().splitlines()}
    assert abs(started["ok"] - started["bad"]) < 0.9  # the first two side by side ...
    assert started["slow"] - min(started["ok"], started["bad"]) > 0.9  # ... the third after
    assert old.exists() and not (tmp_path / "ab" / "new.best_config").exists()
    assert "3 compiles, 2 at a time" in out and "1 autotuning results" in out
