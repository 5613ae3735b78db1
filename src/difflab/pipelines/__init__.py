"""Sampling loops gluing model + scheduler (+ text encoder, + VAE)."""

from difflab.pipelines.image import ImagePipeline, SampleOutput, TrajectoryStep
from difflab.pipelines.text_to_image import TextToImage

__all__ = ["ImagePipeline", "SampleOutput", "TextToImage", "TrajectoryStep"]
