"""The peer names the GPU benchmarks share (benchmarks/_common.py): unet_train.py's --peers,
train_loop.py's --configs and profile_step.py's --variant must mean the same model, settings
and inductor options, and a misspelt name must stop the script before a GPU minute is spent."""

import sys
from pathlib import Path

import pytest
import torch

from difflab.models.unet import UNetConfig
from difflab.nn import Upsample, fused

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import parse_variant  # noqa: E402
from train_loop import loop_variant  # noqa: E402

CFG = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(False, True),
                 norm_num_groups=8, sample_size=8)


def test_suffixes_in_any_order_give_the_same_variant():
    a = parse_variant("difflab-fold-gncl-rr6-ck")
    b = parse_variant("difflab-ck-rr6-gncl-fold")
    assert a.flags == b.flags and a.base == b.base == "difflab"
    assert a.inductor_options == {"realize_reads_threshold": 6, "combo_kernels": True}
    assert parse_variant("difflab-gncl").inductor_options is None
    layouts = [parse_variant(n).channels_last
               for n in ("difflab", "difflab-nchw", "diffusers", "diffusers-cl")]
    assert layouts == [True, False, False, True]


@pytest.mark.parametrize("name", ["difflab-gncl-rr7", "ddpm", "diffusers-fold", "difflab-cl"])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError, match=repr(name)):
        parse_variant(name)


def test_train_loop_configs_name_the_same_variants():
    v = loop_variant("bf16-ro-gncl-rr6")
    assert v.flags == {"gncl", "rr6"} and v.inductor_options == {"realize_reads_threshold": 6}
    assert loop_variant("bf16-ro-det").flags == frozenset()
    with pytest.raises(ValueError, match="unknown suffix 'r06'"):
        loop_variant("bf16-r06")


def test_fold_is_set_per_model_and_switches_per_call(monkeypatch):
    monkeypatch.setattr(fused, "COMPILED_CHANNELS_LAST_GROUP_NORM", frozenset())
    monkeypatch.setattr(fused, "LOW_PRECISION_GPU_GROUP_NORM", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    folded = parse_variant("difflab-fold").build(CFG, "cuda")
    plain = parse_variant("difflab").build(CFG, "cuda")
    ups = [m for m in folded.modules() if isinstance(m, Upsample)]
    assert ups and all("cuda" in m.fold_on and "cpu" in m.fold_on for m in ups)
    assert all("cuda" not in m.fold_on for m in plain.modules() if isinstance(m, Upsample))
    assert "cuda" not in Upsample.fold_on  # the class default is untouched
    parse_variant("difflab-gncl-gn16-bench").apply("cuda")
    assert fused.COMPILED_CHANNELS_LAST_GROUP_NORM == {"cuda"}
    assert fused.LOW_PRECISION_GPU_GROUP_NORM and torch.backends.cudnn.benchmark
    parse_variant("difflab").apply("cuda")  # the next peer of an interleaved run
    assert fused.COMPILED_CHANNELS_LAST_GROUP_NORM == frozenset()
    assert not fused.LOW_PRECISION_GPU_GROUP_NORM and not torch.backends.cudnn.benchmark
