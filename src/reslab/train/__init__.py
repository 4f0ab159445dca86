"""Training: one typed config, recipes, the loop, schedules, checkpoints and the run directory."""
from reslab.train.config import ConfigError, TrainConfig, list_recipes, resolve_config
from reslab.train.engine import TrainingError
from reslab.train.loop import TrainSummary, train

__all__ = ["ConfigError", "TrainConfig", "TrainSummary", "TrainingError", "list_recipes", "resolve_config", "train"]
