"""Training: the one loop, EMA, checkpoints, objectives."""

from difflab.training.loop import TrainConfig, TrainResult, is_main_process, train

__all__ = ["TrainConfig", "TrainResult", "is_main_process", "train"]
