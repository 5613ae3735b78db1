"""Training: the one loop, EMA, checkpoints, objectives."""

from difflab.training.loop import (
    TrainConfig,
    TrainResult,
    close_process_group,
    is_main_process,
    train,
)

__all__ = ["TrainConfig", "TrainResult", "close_process_group", "is_main_process", "train"]
