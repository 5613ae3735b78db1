"""Shared building blocks of difflab's networks."""

from difflab.nn.blocks import (
    Downsample,
    ResnetBlock,
    SelfAttention,
    Upsample,
    dense_gradient,
    padded_conv,
    time_projections,
    upsample_nearest2x,
)
from difflab.nn.embeddings import TimestepEmbedding, timestep_embedding

__all__ = ["Downsample", "ResnetBlock", "SelfAttention", "TimestepEmbedding", "Upsample",
           "dense_gradient", "padded_conv", "time_projections", "timestep_embedding",
           "upsample_nearest2x"]
