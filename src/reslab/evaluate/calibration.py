"""``reslab calibrate``: how far a model's confidence is from its accuracy, and temperature scaling to fix it.

Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern Neural Networks":
- expected calibration error (their Eq. 3): predictions are binned by confidence (``n_bins`` = 15 equal-width
  bins, as in the paper) and ``ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|``;
- reliability diagrams (their Fig. 1): accuracy per confidence bin against the diagonal;
- temperature scaling (their §4.2): one scalar ``T > 0`` dividing the logits, fitted by minimising the NLL on a
  held-out validation set. It never changes the predicted class, only the confidence.

The temperature is fitted on the run's own validation split when it had one (``reslab train --val-fraction``);
otherwise a ``val_fraction`` of the train split is carved out with the run's seed, which the JSON states,
because the model has seen those images and looks more confident on them than on new data (the temperature
then tends to be too low). The fitted value is written to ``RUN/calibration.json`` so that prediction can
divide its logits by it (:func:`stored_temperature`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CALIBRATION_FILE = "calibration.json"


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: count, mean confidence and accuracy (NaN for empty bins)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins are (lo, hi]; confidence is always > 0, so the first bin's open lower edge loses nothing.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, weights=confidence, minlength=n_bins) / count
        acc = np.bincount(which, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": conf, "accuracy": acc}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE of Guo et al. 2017, Eq. 3 (equal-width bins on the top-1 confidence)."""
    b = reliability_bins(probs, labels, n_bins)
    filled = b["count"] > 0
    n = b["count"].sum()
    return float(np.sum(b["count"][filled] / n * np.abs(b["accuracy"][filled] - b["confidence"][filled])))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017, §4.2).

    A bounded 1-D search over log T (the NLL is smooth and unimodal in it), so the result is deterministic.
    """
    from scipy.optimize import minimize_scalar

    logits, labels = torch.as_tensor(logits).double(), torch.as_tensor(labels).long()
    res = minimize_scalar(lambda log_t: nll(logits, labels, math.exp(log_t)),
                          bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-6})
    return float(math.exp(res.x))


def stored_temperature(run: str | Path) -> float:
    """The temperature ``reslab calibrate`` stored with a run (1.0 when it was never calibrated). An exported or
    quantized folder uses its own (``reslab calibrate FOLDER``), else the one of the run it came from."""
    import json

    from reslab.deploy.artifact import training_run_dir
    from reslab.evaluate.analyze import run_dir_of

    for folder in (run_dir_of(run), training_run_dir(run)):
        if folder is not None and (folder / CALIBRATION_FILE).is_file():
            return float(json.loads((folder / CALIBRATION_FILE).read_text())["temperature"])
    return 1.0


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def _draw_reliability(ax, probs: np.ndarray, labels: np.ndarray, n_bins: int, title: str) -> None:
    b = reliability_bins(probs, labels, n_bins)
    edges, width = b["edges"], 1.0 / n_bins
    centers = edges[:-1] + width / 2
    filled = b["count"] > 0
    acc = np.where(filled, b["accuracy"], 0.0)
    conf = np.where(filled, b["confidence"], 0.0)
    ax.bar(centers, acc, width=width, edgecolor="k", linewidth=0.5, color="tab:blue", label="accuracy")
    ax.bar(centers[filled], (conf - acc)[filled], bottom=acc[filled], width=width, color="tab:red", alpha=0.3,
           edgecolor="tab:red", hatch="//", linewidth=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ece = expected_calibration_error(probs, labels, n_bins)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{title}\nECE {100 * ece:.2f}%  (n={len(labels)})")
    ax.legend(loc="upper left", fontsize=7)


def plot_reliability(before: np.ndarray, after: np.ndarray, labels: np.ndarray, temperature: float, path: Path,
                     n_bins: int = 15, split: str = "test") -> Path:
    from reslab.evaluate.analyze import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.3))
    _draw_reliability(axes[0], before, labels, n_bins, f"before (T = 1), {split}")
    _draw_reliability(axes[1], after, labels, n_bins, f"after temperature scaling (T = {temperature:.3f}), {split}")
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------


def _validation_split(run, card: dict, data: str | None, val_fraction: float, seed: int | None):
    """(splits with a val split, description of where it came from)."""
    from reslab.evaluate.analyze import run_config
    from reslab.evaluate.evaluate import load_data_for_model

    cfg = run_config(run)
    run_vf, run_seed = float(cfg.get("val_fraction") or 0.0), int(cfg.get("seed") or 0)
    same_data = data is None or data == card["data"]
    if same_data and run_vf > 0:
        splits = load_data_for_model(card, None, val_fraction=run_vf, seed=run_seed)
        return splits, {"source": "run_val_split", "val_fraction": run_vf, "seed": run_seed,
                        "note": "the run's own validation split, held out of training"}
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction}: the run has no validation split, so one must be carved "
                         "from the train split; give a fraction in (0, 1), e.g. 0.1")
    seed = run_seed if seed is None else seed
    splits = load_data_for_model(card, data, val_fraction=val_fraction, seed=seed)
    note = ("carved from the train split the model was trained on: it saw these images, so it is more confident "
            "on them than on new data and the fitted temperature is likely too low; train with --val-fraction "
            "for an honest fit") if same_data else f"carved from the train split of {data}"
    return splits, {"source": "carved_from_train", "val_fraction": val_fraction, "seed": seed, "note": note}


def calibrate(run: str | Path, data: str | None = None, *, out: str | Path | None = None, device: str = "auto",
              val_fraction: float = 0.1, seed: int | None = None, n_bins: int = 15, store: bool = True,
              _loaded=None) -> dict[str, Any]:
    """Fit a temperature on validation data, measure ECE/NLL before and after on the test split, draw
    reliability diagrams, and (``store``) write the temperature to ``RUN/calibration.json``.

    Returns the ``analysis/calibration.json`` dict.
    """
    from reslab.deploy.artifact import load_for_inference
    from reslab.evaluate.analyze import analysis_dir, model_logits, run_dir_of
    from reslab.train.rundir import environment_info, write_json

    loaded = _loaded or load_for_inference(run, device=device)  # analyze() hands over what it already loaded
    model, card, dev = loaded.model, loaded.card, loaded.device
    target = analysis_dir(run, out)
    splits, fitted_on = _validation_split(run, card, data, val_fraction, seed)
    val_logits, val_labels = model_logits(model, card, splits.val, device=dev)
    test_logits, test_labels = model_logits(model, card, splits.test, device=dev)
    temperature = fit_temperature(val_logits, val_labels)

    def metrics(logits, labels, t):
        probs = torch.softmax(logits.double() / t, 1).numpy()
        return {"ece": expected_calibration_error(probs, labels.numpy(), n_bins), "nll": nll(logits, labels, t),
                "accuracy": float((probs.argmax(1) == labels.numpy()).mean())}, probs

    val_before, _ = metrics(val_logits, val_labels, 1.0)
    val_after, _ = metrics(val_logits, val_labels, temperature)
    test_before, p_before = metrics(test_logits, test_labels, 1.0)
    test_after, p_after = metrics(test_logits, test_labels, temperature)
    figure = plot_reliability(p_before, p_after, test_labels.numpy(), temperature, target / "reliability.png",
                              n_bins)
    result = {
        "run": str(run_dir_of(run)), "checkpoint": str(loaded.source), "data": data or card["data"],
        "method": "temperature scaling (Guo et al. 2017, §4.2): softmax(logits / T), T fitted by NLL",
        "temperature": temperature, "fitted_on": fitted_on, "n_bins": n_bins,
        "val_count": len(val_labels), "test_count": len(test_labels),
        "val_before": val_before, "val_after": val_after, "test_before": test_before, "test_after": test_after,
        "test_ece_before": test_before["ece"], "test_ece_after": test_after["ece"],
        "figures": [str(figure)], "environment": environment_info(str(dev)),
    }
    write_json(target / "calibration.json", result)
    if store:
        write_json(run_dir_of(run) / CALIBRATION_FILE,
                   {"temperature": temperature, "fitted_on": fitted_on, "checkpoint": result["checkpoint"],
                    "usage": "divide the logits by temperature before the softmax"})
    result["written_to"] = str(target / "calibration.json")
    return result
