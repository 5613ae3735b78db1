"""Shared building blocks of difflab's networks."""

from difflab.nn.blocks import Downsample, ResnetBlock, SelfAttention, Upsample
from difflab.nn.embeddings import TimestepEmbedding, timestep_embedding

__all__ = ["Downsample", "ResnetBlock", "SelfAttention", "TimestepEmbedding", "Upsample",
           "timestep_embedding"]
