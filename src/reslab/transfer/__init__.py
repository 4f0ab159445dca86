"""Representations and transfer: features of a trained network for one's own images, linear probes and kNN,
fine-tuning, model soups, Matryoshka (nested-embedding) evaluation, and synthetic glyph data.

Each function below is also a ``reslab`` subcommand (reslab/transfer/commands.py); see docs/transfer.md.
"""
from reslab.transfer.features import extract_features, features, layer_names, load_features, save_features
from reslab.transfer.finetune import finetune, finetune_config, freeze_modules, load_initial_weights
from reslab.transfer.probe import knn_accuracy, knn_predict, linear_probe, probe
from reslab.transfer.retrieval import map_at_k, retrieve
from reslab.transfer.soup import SoupError, average_states, check_compatible, soup
from reslab.transfer.synth import render_glyph, synth_glyphs

__all__ = [
    "features", "extract_features", "layer_names", "save_features", "load_features",
    "probe", "linear_probe", "knn_predict", "knn_accuracy",
    "finetune", "finetune_config", "freeze_modules", "load_initial_weights",
    "soup", "average_states", "check_compatible", "SoupError",
    "retrieve", "map_at_k",
    "synth_glyphs", "render_glyph",
]
