"""Measuring models: sample quality, likelihood, subspaces.

==========================  ===================================================================
module                      what it measures
==========================  ===================================================================
``fid``                     Fréchet distance and KID between feature sets; ``fid_of_images``,
                            ``reference_fid`` (real / blurred / noise baselines)
``precision_recall``        improved precision and recall (Kynkäänniemi et al. 2019)
``features``                the per-data-set feature classifier, trained once and cached
``inception``               the FID Inception-v3, for the user's own standard weights file
``diffusion_nll``           the DDPM variational bound in bits/dim (Ho et al. 2020, eq. 5)
``likelihood``              VAE ELBO and IWAE bounds
``subspace``                principal angles between subspaces
==========================  ===================================================================

The light, math-only entry points are re-exported here; ``features`` (which trains a network)
and ``inception`` are imported from their modules.
"""

from difflab.metrics.diffusion_nll import bundle_nll, diffusion_nll, gaussian_kl, vlb_tables
from difflab.metrics.fid import (
    compute_fid,
    fid_from_features,
    fid_of_images,
    fit_gaussian,
    frechet_distance,
    gaussian_blur,
    kid,
    reference_fid,
)
from difflab.metrics.precision_recall import precision_recall

__all__ = [
    "bundle_nll",
    "compute_fid",
    "diffusion_nll",
    "fid_from_features",
    "fid_of_images",
    "fit_gaussian",
    "frechet_distance",
    "gaussian_blur",
    "gaussian_kl",
    "kid",
    "precision_recall",
    "reference_fid",
    "vlb_tables",
]
