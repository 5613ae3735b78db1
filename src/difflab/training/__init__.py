"""Training: the one loop, EMA, checkpoints, objectives."""

from difflab.training.loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
