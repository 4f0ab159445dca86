"""reslab model zoo: importing this package registers every architecture family."""
from .base import ClassifierNet, StageInfo
from .complexity import count_macs, count_params, model_summary
from .registry import create_model, list_models, model_entry, register_model

# Family modules register their builders on import.
from . import resnet, resnet_cifar  # noqa: E402,F401  (isort: skip)
from . import inception_resnet, mobilenet_v2, preact_resnet, resnet9, resnext, simplenet, wide_resnet  # noqa: E402,F401

__all__ = [
    "ClassifierNet",
    "StageInfo",
    "count_macs",
    "count_params",
    "create_model",
    "list_models",
    "model_entry",
    "model_summary",
    "register_model",
]
