"""reslab: deep residual learning for image recognition (He et al. 2016) and the work built on it.

Build models by name, train them fast and reproducibly, evaluate, explain, compress and serve them.

>>> import reslab
>>> model = reslab.create_model("resnet20", num_classes=10)
>>> summary = reslab.train(reslab.TrainConfig(model="resnet20", data="digits", epochs=5))
"""
from reslab.models import count_macs, count_params, create_model, list_models
from reslab.train import TrainConfig, TrainSummary, resolve_config, train


def evaluate(*args, **kwargs):
    """See :func:`reslab.evaluate.evaluate`."""
    from reslab.evaluate import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def predict(*args, **kwargs):
    """See :func:`reslab.evaluate.predict`."""
    from reslab.evaluate import predict as _predict

    return _predict(*args, **kwargs)


__all__ = ["TrainConfig", "TrainSummary", "count_macs", "count_params", "create_model", "evaluate",
           "list_models", "predict", "resolve_config", "train"]
__version__ = "0.1.0"
