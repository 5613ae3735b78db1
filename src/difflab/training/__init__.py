"""Training: the one loop, EMA, checkpoints, objectives."""

from difflab.training.loop import TrainConfig, TrainResult, train
from difflab.training.processes import close_process_group, is_main_process

__all__ = ["TrainConfig", "TrainResult", "close_process_group", "is_main_process", "train"]
