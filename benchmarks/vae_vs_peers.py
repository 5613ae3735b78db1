"""Fashion-MNIST VAE: difflab vs pythae's VAE, same architecture, data, epochs and evaluator.

    python benchmarks/vae_vs_peers.py [--epochs 5] [--latent-dim 16] [--k 1000] [--n-test 1000]

Both models: MLP encoder 784-512-256-(2·latent) and decoder latent-256-512-784 with SiLU
(difflab's ``arch="mlp", hidden=(512, 256)``), a Bernoulli likelihood, Adam(W) at lr 1e-3,
batch 128, the same number of epochs, on the SAME binary data: Fashion-MNIST binarised once,
t ~ Bernoulli(p) with a fixed seed (difflab's VAE uses ``binarize="threshold"`` on it, which
leaves binary data unchanged). Each library trains with its own loop (difflab: the one
``difflab.training.train`` loop with warm-up, cosine LR, EMA; pythae: its ``BaseTrainer``).

Evaluation is one function for both: difflab's ``evaluate_likelihood`` (ELBO and IWAE NLL with k
importance samples, nats per image and bits/dim), applied to pythae's encoder/decoder through
:class:`PythaeAdapter`, so the two NLLs are the same estimator on the same test images.

Optionally (``--equal-time``, on by default) difflab is also trained for exactly the wall time
pythae took, to answer "match or beat the peer's NLL at equal training time".

Writes ``benchmarks/out/vae_vs_peers.json`` and prints a table. pythae (0.1.2) is a
benchmark-only dependency: ``pip install --no-deps pythae imageio`` (its ``dataclasses``
backport requirement is for Python 3.6 and must not be installed).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.data import load_dataset
from difflab.metrics.likelihood import elbo, evaluate_likelihood
from difflab.models.autoencoder import mlp  # the same stack as difflab's VAE
from difflab.models.distributions import DiagonalGaussian
from difflab.models.vae import VAE, VAEConfig
from difflab.training import TrainConfig, train

OUT = Path(__file__).parent / "out" / "vae_vs_peers.json"


# ------------------------------------------------------------------------------ shared pieces
def binarize_once(images: Tensor, seed: int) -> Tensor:
    """(N, C, H, W) in [-1, 1] → one fixed draw t ~ Bernoulli((x+1)/2), returned in {-1, 1}."""
    g = torch.Generator().manual_seed(seed)
    p = (images + 1) / 2
    return (torch.rand(p.shape, generator=g) < p).float() * 2 - 1


# ----------------------------------------------------------------------------------- pythae
def pythae_modules(d: int, hidden: tuple[int, ...], latent: int):
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self) -> None:
            BaseEncoder.__init__(self)
            self.net = mlp([d, *hidden, 2 * latent])

        def forward(self, x: Tensor):
            mu, logvar = self.net(x.flatten(1)).chunk(2, dim=1)
            return ModelOutput(embedding=mu, log_covariance=logvar)

    class Decoder(BaseDecoder):
        def __init__(self) -> None:
            BaseDecoder.__init__(self)
            self.net = mlp([latent, *reversed(hidden), d])  # Bernoulli logits

        def forward(self, z: Tensor):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)).view(-1, 1, 28, 28))

    return Encoder(), Decoder()


def train_pythae(train_x01: Tensor, *, hidden, latent, epochs, batch_size, lr, seed, workdir):
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE as PVAE
    from pythae.models import VAEConfig as PVAEConfig
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    torch.manual_seed(seed)
    enc, dec = pythae_modules(train_x01[0].numel(), hidden, latent)
    model = PVAE(PVAEConfig(input_dim=(1, 28, 28), latent_dim=latent, reconstruction_loss="bce"),
                 encoder=enc, decoder=dec)
    cfg = BaseTrainerConfig(output_dir=str(workdir), num_epochs=epochs, learning_rate=lr,
                            per_device_train_batch_size=batch_size, optimizer_cls="Adam",
                            seed=seed, no_cuda=True)
    ds = BaseDataset(train_x01, torch.zeros(len(train_x01)))
    trainer = BaseTrainer(model=model, train_dataset=ds, training_config=cfg)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return trainer._best_model.eval(), seconds  # pythae keeps the best epoch (on train loss)


class PythaeAdapter(nn.Module):
    """difflab's likelihood protocol (``metrics.likelihood.LatentVariableModel``) on a pythae
    VAE with the Bernoulli decoder above: data t = binary pixels, the pythae encoder sees t in
    {0, 1} (as in its training), log p(t|z) from the decoder's logits."""

    likelihood_kind = "Bernoulli on fixed-binarised pixels"

    def __init__(self, model: nn.Module, data_dim: int) -> None:
        super().__init__()
        self.model = model
        self.data_dim = data_dim

    def likelihood_targets(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return (x > 0).to(x.dtype)  # x is already binary, in {-1, 1}

    def encode(self, x: Tensor) -> DiagonalGaussian:
        out = self.model.encoder((x + 1) / 2)
        return DiagonalGaussian(out.embedding, out.log_covariance)

    def log_px_given_z(self, t: Tensor, z: Tensor) -> Tensor:
        logits = self.model.decoder.net(z)
        return -F.binary_cross_entropy_with_logits(logits, t.flatten(1),
                                                   reduction="none").sum(1)


# ---------------------------------------------------------------------------------- difflab
def train_difflab(train_x: Tensor, labels: Tensor, *, hidden, latent, batch_size, lr, seed,
                  epochs=None, minutes=None):
    torch.manual_seed(seed)
    model = VAE(VAEConfig(arch="mlp", in_channels=1, image_size=28, latent_dim=latent,
                          hidden=hidden, likelihood="bernoulli", binarize="threshold"))
    cfg = TrainConfig(epochs=epochs, minutes=minutes, batch_size=batch_size, lr=lr,
                      warmup_steps=100, seed=seed, progress=False, channels_last=False)
    t0 = time.perf_counter()
    res = train(model, train_x, labels, cfg, desc="difflab VAE")
    return res.model.eval(), time.perf_counter() - t0, res.steps


# -------------------------------------------------------------------------------------- main
def evaluate(model: nn.Module, test_x: Tensor, *, k: int, n_test: int, seed: int) -> dict:
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # −ELBO per image on the whole test set: its mean, median and worst
        nelbo = torch.cat([-elbo(model, x, g, targets=model.likelihood_targets(x, g))
                           for x in test_x.split(500)]).double()
    sub = evaluate_likelihood(model, test_x[:n_test], k=k, progress=False,
                              generator=torch.Generator().manual_seed(seed))
    return {"test_nelbo_nats_all": float(nelbo.mean()),
            "test_nelbo_nats_all_median": float(nelbo.median()),
            "test_nelbo_nats_all_max": float(nelbo.max()),
            "test_nelbo_worst_image": int(nelbo.argmax()),
            "test_nelbo_bpd_all": float(nelbo.mean()) / (784 * math.log(2)),
            "nelbo_nats": sub["nelbo_nats"], "nelbo_bpd": sub["nelbo_bits_per_dim"],
            "iwae_nll_nats": sub["iwae_nll_nats"], "iwae_nll_nats_sem": sub["iwae_nll_nats_sem"],
            "iwae_nll_bpd": sub["iwae_nll_bits_per_dim"], "k": k, "n_test": sub["num_images"],
            "eval_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--latent-dim", type=int, default=16)
    ap.add_argument("--hidden", default="512,256")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=1000, help="IWAE importance samples")
    ap.add_argument("--n-test", type=int, default=1000, help="test images for the IWAE NLL")
    ap.add_argument("--n-train", type=int, help="use only the first N training images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-equal-time", action="store_true",
                    help="skip the difflab run with pythae's wall-time budget")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    hidden = tuple(int(h) for h in args.hidden.split(","))

    train_ds, test_ds = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist",
                                                                             "test")
    if args.n_train:
        train_ds = train_ds.subset(args.n_train)
    train_x = binarize_once(train_ds.images, args.seed)
    test_x = binarize_once(test_ds.images, args.seed + 1)
    common = dict(hidden=hidden, latent=args.latent_dim, batch_size=args.batch_size, lr=args.lr,
                  seed=args.seed)
    ev = dict(k=args.k, n_test=args.n_test, seed=args.seed)
    rows = []

    import pythae

    p_model, p_s = train_pythae((train_x + 1) / 2, epochs=args.epochs,
                                workdir=Path("/tmp/difflab-pythae-bench"), **common)
    p_steps = args.epochs * math.ceil(len(train_x) / args.batch_size)
    rows.append({"library": f"pythae {pythae.__version__}" if hasattr(pythae, "__version__")
                 else "pythae 0.1.2", "budget": f"{args.epochs} epochs", "steps": p_steps,
                 "train_seconds": p_s,
                 "parameters": sum(p.numel() for p in p_model.parameters()),
                 **evaluate(PythaeAdapter(p_model, 784), test_x, **ev)})

    d_model, d_s, d_steps = train_difflab(train_x, train_ds.labels, epochs=args.epochs, **common)
    rows.append({"library": "difflab", "budget": f"{args.epochs} epochs", "steps": d_steps,
                 "train_seconds": d_s, "parameters": d_model.num_parameters,
                 **evaluate(d_model, test_x, **ev)})
    if not args.no_equal_time:
        e_model, e_s, e_steps = train_difflab(train_x, train_ds.labels, minutes=p_s / 60,
                                              **common)
        rows.append({"library": "difflab", "budget": f"{p_s:.0f} s (= pythae's time)",
                     "steps": e_steps, "train_seconds": e_s,
                     "parameters": e_model.num_parameters, **evaluate(e_model, test_x, **ev)})

    cols = [("library", "{}"), ("budget", "{}"), ("steps", "{}"), ("train_seconds", "{:.1f}"),
            ("test_nelbo_nats_all", "{:.2f}"), ("test_nelbo_nats_all_median", "{:.2f}"),
            ("test_nelbo_nats_all_max", "{:.4g}"), ("iwae_nll_nats", "{:.2f}"),
            ("iwae_nll_bpd", "{:.4f}"), ("nelbo_bpd", "{:.4f}")]
    print(f"Fashion-MNIST, fixed binarisation, MLP {hidden}, latent {args.latent_dim}; IWAE "
          f"k={args.k} on the first {args.n_test} test images; -ELBO on all {len(test_x)} "
          "test images: mean, median, worst image (nats)")
    print(" | ".join(c for c, _ in cols))
    for r in rows:
        print(" | ".join(f.format(r[c]) for c, f in cols))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_images": len(train_x), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
