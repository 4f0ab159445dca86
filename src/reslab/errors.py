"""Errors that reach users as one clear line (the CLI prints them without a traceback; RESLAB_DEBUG=1 shows it)."""
from reslab.train.checkpoint import CheckpointError
from reslab.train.config import ConfigError
from reslab.train.engine import TrainingError

USER_ERRORS = (ConfigError, TrainingError, CheckpointError, ValueError, FileNotFoundError, NotADirectoryError,
               PermissionError)
