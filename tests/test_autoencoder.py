"""Autoencoder (MLP / conv) and LinearAutoencoder: shapes, training, save/load, configs."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from difflab.errors import ConfigError
from difflab.models.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    LinearAutoencoder,
    LinearAutoencoderConfig,
)
from difflab.models.base import MODEL_REGISTRY, load_model


def digits() -> torch.Tensor:
    """scikit-learn digits as (1797, 1, 8, 8) in [-1, 1]."""
    return torch.tensor(load_digits().data, dtype=torch.float32).view(-1, 1, 8, 8) / 8.0 - 1.0


@pytest.mark.parametrize("arch,hidden,channels,size", [
    ("mlp", (32, 16), 1, 8), ("mlp", (32,), 3, 32),
    ("conv", (8, 16), 1, 8), ("conv", (8, 16), 1, 28), ("conv", (8, 16), 3, 32),
    ("conv", (8, 16, 16), 1, 28),  # 28 is padded to 32 for three stride-2 stages
])
def test_autoencoder_shapes(arch, hidden, channels, size):
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(arch=arch, hidden=hidden, in_channels=channels,
                                       image_size=size, latent_dim=6))
    x = torch.rand(3, channels, size, size) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (3, 6)
    assert ae.decode(z).shape == x.shape and ae(x).shape == x.shape
    out = ae.training_loss({"images": x, "labels": torch.zeros(3, dtype=torch.long)})
    assert out["loss"].dim() == 0
    torch.testing.assert_close(out["loss"], ((ae(x) - x) ** 2).mean())


@pytest.mark.parametrize("arch,hidden", [("mlp", (64,)), ("conv", (16, 32))])
def test_autoencoder_training_lowers_the_loss(arch, hidden):
    torch.manual_seed(0)
    x = digits()
    ae = Autoencoder(AutoencoderConfig(arch=arch, hidden=hidden, image_size=8, latent_dim=8))
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(120):
        batch = {"images": x[torch.randint(len(x), (128,), generator=g)]}
        loss = ae.training_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10, (losses[:3], losses[-3:])


def test_linear_autoencoder_is_linear_and_tied():
    torch.manual_seed(0)
    cfg = LinearAutoencoderConfig(in_channels=10, image_size=1, latent_dim=3, tied=True,
                                  center=False)
    ae = LinearAutoencoder(cfg)
    assert ae.W_enc is None and torch.equal(ae.encoder_weight, ae.W.T)
    assert sorted(n for n, _ in ae.named_parameters()) == ["W"]
    x, y = torch.randn(4, 10), torch.randn(4, 10)
    torch.testing.assert_close(ae(2 * x + 3 * y), 2 * ae(x) + 3 * ae(y))
    torch.testing.assert_close(ae(x), x @ ae.W @ ae.W.T)


def test_linear_autoencoder_centering_and_bias():
    torch.manual_seed(0)
    x = torch.randn(50, 6) + 5.0
    ae = LinearAutoencoder(LinearAutoencoderConfig(in_channels=6, image_size=1, latent_dim=2,
                                                   bias=True, center=True))
    ae.set_data_mean(x)
    torch.testing.assert_close(ae.data_mean, x.mean(0))
    torch.testing.assert_close(ae.encode(x.mean(0, keepdim=True)), ae.b_enc[None])
    images = torch.randn(5, 2, 3, 3)
    ae_img = LinearAutoencoder(LinearAutoencoderConfig(in_channels=2, image_size=3, latent_dim=4))
    assert ae_img(images).shape == images.shape and ae_img.encode(images).shape == (5, 4)
    assert ae_img.training_loss({"images": images})["loss"].dim() == 0
    plain = LinearAutoencoder(LinearAutoencoderConfig(in_channels=6, image_size=1, latent_dim=2,
                                                      center=False))
    with pytest.raises(ConfigError, match="center"):
        plain.set_data_mean(x)


@pytest.mark.parametrize("model", [
    lambda: Autoencoder(AutoencoderConfig(hidden=(16,), image_size=8, latent_dim=4)),
    lambda: Autoencoder(AutoencoderConfig(arch="conv", hidden=(4, 8), image_size=28)),
    lambda: LinearAutoencoder(LinearAutoencoderConfig(image_size=8, latent_dim=3, tied=True,
                                                      center=True)),
    lambda: LinearAutoencoder(LinearAutoencoderConfig(image_size=8, latent_dim=3, bias=True,
                                                      center=False)),
])
def test_save_load_identical_outputs(tmp_path, model):
    torch.manual_seed(0)
    ae = model()
    if isinstance(ae, LinearAutoencoder) and ae.config.center:
        ae.set_data_mean(torch.randn(20, 64))
    size = ae.config.image_size
    x = torch.rand(3, 1, size, size) * 2 - 1
    ae.save_pretrained(tmp_path / "ckpt")
    again = type(ae).from_pretrained(tmp_path / "ckpt")
    assert again.config == ae.config
    assert torch.equal(again(x), ae(x))
    assert torch.equal(load_model(tmp_path / "ckpt")(x), ae(x))


def test_registry_names():
    assert MODEL_REGISTRY["Autoencoder"] is Autoencoder
    assert MODEL_REGISTRY["LinearAutoencoder"] is LinearAutoencoder


@pytest.mark.parametrize("field,value", [
    ("arch", "transformer"), ("latent_dim", 0), ("hidden", ()), ("hidden", (8, -1)),
    ("in_channels", True), ("image_size", -28)])
def test_autoencoder_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        AutoencoderConfig(**{field: value})


@pytest.mark.parametrize("kwargs,field", [
    ({"latent_dim": 65, "image_size": 8}, "latent_dim"), ({"tied": "yes"}, "tied"),
    ({"latent_dim": 0}, "latent_dim")])
def test_linear_autoencoder_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LinearAutoencoderConfig(**kwargs)


def test_config_json_round_trip():
    cfg = AutoencoderConfig(arch="conv", hidden=(8, 16), image_size=32, in_channels=3)
    assert AutoencoderConfig.from_dict(cfg.to_dict()) == cfg
    lcfg = LinearAutoencoderConfig(latent_dim=5, tied=True, bias=True)
    assert LinearAutoencoderConfig.from_dict(lcfg.to_dict()) == lcfg
