"""Sampling loops gluing model + scheduler (+ text encoder, + VAE)."""

from difflab.pipelines.image import ImagePipeline, SampleOutput, TrajectoryStep

__all__ = ["ImagePipeline", "SampleOutput", "TrajectoryStep"]
