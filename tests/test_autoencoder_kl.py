"""AutoencoderKL: parity with diffusers (same state_dict, same numbers), API, training, I/O."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from difflab.errors import ConfigError
from difflab.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflab.models.base import MODEL_REGISTRY
from difflab.models.distributions import DiagonalGaussian


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(**kw) -> AutoencoderKL:
    torch.manual_seed(0)
    cfg = dict(in_channels=1, image_size=8, block_out_channels=(8, 16), layers_per_block=1,
               latent_channels=2, norm_num_groups=4)
    return AutoencoderKL(AutoencoderKLConfig(**{**cfg, **kw}))


def config_from_diffusers(d: dict) -> AutoencoderKLConfig:
    """Test helper: the difflab config equivalent to a diffusers AutoencoderKL config."""
    assert d["in_channels"] == d["out_channels"] and d["act_fn"] == "silu"
    assert set(d["down_block_types"]) == {"DownEncoderBlock2D"}
    assert set(d["up_block_types"]) == {"UpDecoderBlock2D"}
    return AutoencoderKLConfig(
        in_channels=d["in_channels"], image_size=d["sample_size"],
        block_out_channels=tuple(d["block_out_channels"]),
        layers_per_block=d["layers_per_block"], latent_channels=d["latent_channels"],
        norm_num_groups=d["norm_num_groups"],
        mid_block_add_attention=d["mid_block_add_attention"],
        use_quant_conv=d["use_quant_conv"], use_post_quant_conv=d["use_post_quant_conv"],
        scaling_factor=d["scaling_factor"])


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err <= rel, err


@pytest.mark.parametrize("kw", [
    dict(in_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
         norm_num_groups=8, mid_block_add_attention=True, sample_size=16),
    dict(in_channels=1, block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=3,
         norm_num_groups=8, mid_block_add_attention=False, use_quant_conv=False, sample_size=16),
], ids=["attention", "no-attention-no-quant-conv"])
def test_parity_with_diffusers(kw):
    diffusers = pytest.importorskip("diffusers")
    n = len(kw["block_out_channels"])
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(out_channels=kw["in_channels"],
                                  down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **kw).eval()
    ours = AutoencoderKL(config_from_diffusers(dict(ref.config))).eval()
    # identical module names: the diffusers state_dict loads strictly, key for key, no mapping
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)

    x = torch.randn(2, kw["in_channels"], 16, 16, generator=gen(1))
    with torch.no_grad():
        q_ref, q = ref.encode(x).latent_dist, ours.encode(x).latent_dist
        assert_rel_close(q.mean, q_ref.mean)
        assert_rel_close(q.logvar, q_ref.logvar)
        assert_rel_close(q.kl(), q_ref.kl())
        assert_rel_close(q.sample(gen(2)), q_ref.sample(gen(2)))
        z = torch.randn(q.mean.shape, generator=gen(3))
        assert_rel_close(ours.decode(z).sample, ref.decode(z).sample)
        assert_rel_close(ours(x).sample, ref(x).sample)


def test_latent_dist_api_and_shapes():
    vae = tiny(block_out_channels=(8, 16, 16), image_size=16)
    assert vae.config.down_factor == 4 and vae.config.latent_size == 4
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    q = vae.encode(x).latent_dist
    assert isinstance(q, DiagonalGaussian)
    assert q.mean.shape == q.logvar.shape == (3, 2, 4, 4)
    assert torch.equal(q.sample(gen(5)), q.sample(gen(5))) and torch.equal(q.mode(), q.mean)
    assert q.kl().shape == (3,)
    assert vae.decode(q.sample(gen())).sample.shape == x.shape
    assert vae(x, sample_posterior=True, generator=gen()).sample.shape == x.shape


def digits() -> torch.Tensor:
    return torch.tensor(load_digits().data, dtype=torch.float32).view(-1, 1, 8, 8) / 8.0 - 1.0


def test_training_lowers_the_loss_and_scaling_factor():
    vae = tiny(mid_block_add_attention=False)
    x = digits()
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    g = gen(0)
    losses = []
    for _ in range(40):
        out = vae.training_loss({"images": x[torch.randint(len(x), (64,), generator=g)]}, g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert set(out) == {"loss", "recon", "kl"}
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, (losses[:3], losses[-3:])

    s = vae.compute_scaling_factor(x[:256], generator=gen(1), batch_size=100)
    assert vae.config.scaling_factor == s > 0
    g = gen(1)  # the same draws as compute_scaling_factor: scaled latents have unit std
    with torch.no_grad():
        z = torch.cat([vae.eval().encode(x[:256][i:i + 100]).latent_dist.sample(g)
                       for i in range(0, 256, 100)])
    assert (z * s).double().std().item() == pytest.approx(1.0, rel=1e-6)


def test_training_loss_is_seeded_and_l2_works():
    vae = tiny(recon_loss="l2", kl_weight=1e-4)
    batch = {"images": digits()[:8]}
    a, b = vae.training_loss(batch, gen(4)), vae.training_loss(batch, gen(4))
    assert torch.equal(a["loss"], b["loss"])


def test_save_load_identical_outputs(tmp_path):
    vae = tiny()
    vae.compute_scaling_factor(digits()[:32], generator=gen(0))
    vae.save_pretrained(tmp_path / "vae")
    again = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert again.config == vae.config and again.config.scaling_factor != 1.0
    x = digits()[:4]
    assert torch.equal(again(x).sample, vae(x).sample)
    assert torch.equal(again.encode(x).latent_dist.logvar, vae.encode(x).latent_dist.logvar)
    assert MODEL_REGISTRY["AutoencoderKL"] is AutoencoderKL


@pytest.mark.parametrize("kwargs,field", [
    ({"norm_num_groups": 3}, "norm_num_groups"), ({"image_size": 30}, "image_size"),
    ({"block_out_channels": ()}, "block_out_channels"), ({"recon_loss": "lpips"}, "recon_loss"),
    ({"kl_weight": -1e-6}, "kl_weight"), ({"latent_channels": 0}, "latent_channels"),
    ({"scaling_factor": 0.0}, "scaling_factor"), ({"use_quant_conv": 1}, "use_quant_conv")])
def test_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        AutoencoderKLConfig(**kwargs)


def test_config_json_round_trip():
    cfg = AutoencoderKLConfig(block_out_channels=(16, 32), in_channels=3, image_size=32)
    assert AutoencoderKLConfig.from_dict(cfg.to_dict()) == cfg
