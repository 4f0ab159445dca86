"""Evaluation of trained runs: metrics, prediction, curves (and later analyses)."""
from reslab.evaluate.evaluate import evaluate, predict

__all__ = ["evaluate", "predict"]
