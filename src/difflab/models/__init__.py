"""Networks: autoencoders, VAEs, the SD-style AutoencoderKL, U-Nets, the CLIP text model.

Importing this package registers every model class by name (``MODEL_REGISTRY``) so that
``load_model(folder)`` can rebuild any difflab checkpoint folder.
"""

from difflab.models.autoencoder import (
                                        Autoencoder,
                                        AutoencoderConfig,
                                        LinearAutoencoder,
                                        LinearAutoencoderConfig,
)
from difflab.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflab.models.base import MODEL_REGISTRY, ModelMixin, load_model
from difflab.models.classifier import FeatureClassifier, FeatureClassifierConfig
from difflab.models.clip import CLIPConfig, CLIPModel
from difflab.models.clip_text import CLIPTextConfig, CLIPTextModel
from difflab.models.unet import UNet2DModel, UNetConfig
from difflab.models.unet_condition import UNet2DConditionConfig, UNet2DConditionModel
from difflab.models.vae import VAE, VAEConfig

__all__ = [
    "MODEL_REGISTRY", "VAE", "Autoencoder", "AutoencoderConfig", "AutoencoderKL",
    "AutoencoderKLConfig", "CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPTextModel",
    "FeatureClassifier", "FeatureClassifierConfig",
    "LinearAutoencoder", "LinearAutoencoderConfig", "ModelMixin", "UNet2DConditionConfig",
    "UNet2DConditionModel", "UNet2DModel", "UNetConfig", "VAEConfig", "load_model",
]
