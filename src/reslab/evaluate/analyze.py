"""``reslab analyze``: what a trained model gets wrong, beyond its accuracy.

For one split of a data set it writes, into ``RUN/analysis/`` by default:

- ``analyze.json``: the confusion matrix, per-class precision / recall / F1 / support, macro and
  weighted averages, the most confused class pairs and the highest-loss images;
- ``confusion.png``: the row-normalised confusion matrix;
- ``confused_pairs.png``: example images of the most confused (true, predicted) pairs;
- ``top_losses.png``: the highest-loss images with true and predicted labels and probabilities,
  for mistake review (fastai's ``plot_top_losses`` in spirit);
- and, unless ``calibration=False``, everything ``reslab calibrate`` writes (see calibration.py).

The helpers at the top (run directory, output folder, model outputs, image display) are shared by the
other analysis modules.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------
# Shared helpers: where a run lives, where analyses go, the model's outputs on a split
# ---------------------------------------------------------------------------------------------------------


def run_dir_of(run: str | Path) -> Path:
    """Where results about ``run`` are written: the run directory of a run or of a checkpoint folder inside
    one, or an exported / quantized folder itself."""
    from reslab.deploy.artifact import artifact_card, training_run_dir

    return Path(run) if artifact_card(run) is not None else training_run_dir(run)


def analysis_dir(run: str | Path, out: str | Path | None = None) -> Path:
    """``out`` if given, else ``RUN/analysis/`` (created)."""
    target = Path(out) if out else run_dir_of(run) / "analysis"
    target.mkdir(parents=True, exist_ok=True)
    return target


def run_config(run: str | Path) -> dict[str, Any]:
    """The run's saved ``config.yaml`` as a dict ({} for a bare checkpoint folder); for an exported or
    quantized folder, that of the run it came from."""
    import yaml

    from reslab.deploy.artifact import training_run_dir

    run_dir = training_run_dir(run)
    path = run_dir / "config.yaml" if run_dir else None
    return (yaml.safe_load(path.read_text()) or {}) if path and path.is_file() else {}


@torch.no_grad()
def model_logits(model: torch.nn.Module, card: dict, images, *, device: torch.device,
                 batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits and labels of ``model`` on an ``ImageArray``, with the model's stored preprocessing."""
    from reslab.evaluate.evaluate import model_loader

    logits, labels = [], []
    for x, y in model_loader(card, images, device=device, batch_size=batch_size):
        logits.append(model(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


def pick_split(splits, split: str):
    images = {"test": splits.test, "val": splits.val, "train": splits.train}.get(split)
    if images is None:
        raise ValueError(f"--split {split}: the data has no such split (choose test, val or train)")
    return images


def display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """A uint8 HWC image as matplotlib wants it: (H, W) with a grey colormap for one channel."""
    if image.shape[-1] == 1:
        return image[..., 0], "gray"
    return image, None


def pyplot():
    """matplotlib.pyplot on the Agg backend (figures are files; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class ``i`` predicted as ``j``."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def per_class_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined, as sklearn)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    predicted, support = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def most_confused_pairs(cm: np.ndarray, k: int = 5) -> list[tuple[int, int, int]]:
    """The ``k`` largest off-diagonal entries as (true, predicted, count), largest first, count > 0."""
    off = np.array(cm, dtype=np.int64)
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    pairs = [(int(i), int(j), int(off[i, j])) for i, j in zip(*np.unravel_index(order, off.shape))]
    return [p for p in pairs if p[2] > 0]


def classification_summary(labels: np.ndarray, probs: np.ndarray, classes: list[str], *,
                           top_pairs: int = 6) -> dict[str, Any]:
    """Confusion matrix, per-class and averaged precision/recall/F1, and the most confused pairs."""
    preds = probs.argmax(1)
    cm = confusion_matrix(labels, preds, len(classes))
    m = per_class_metrics(cm)
    weights = m["support"] / max(1, m["support"].sum())
    return {
        "count": int(len(labels)),
        "accuracy": float((preds == labels).mean()),
        "confusion_matrix": cm.tolist(),
        "per_class": {c: {"precision": float(m["precision"][i]), "recall": float(m["recall"][i]),
                          "f1": float(m["f1"][i]), "support": int(m["support"][i])}
                      for i, c in enumerate(classes)},
        "macro": {k: float(m[k].mean()) for k in ("precision", "recall", "f1")},
        "weighted": {k: float((m[k] * weights).sum()) for k in ("precision", "recall", "f1")},
        "most_confused": [{"true": classes[i], "predicted": classes[j], "count": n}
                          for i, j, n in most_confused_pairs(cm, top_pairs)],
    }


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str = "") -> Path:
    plt = pyplot()
    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    side = min(12, max(4, 0.45 * n + 2))
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=6 if n > 12 else 8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix (row-normalised colour, counts)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    return save_figure(fig, path)


def plot_confused_pairs(images: np.ndarray, labels: np.ndarray, preds: np.ndarray, probs: np.ndarray,
                        classes: list[str], pairs: list[tuple[int, int, int]], path: Path,
                        per_pair: int = 6) -> Path:
    """One row per confused pair: the most confidently wrong examples of true ``i`` predicted ``j``."""
    plt = pyplot()
    rows = max(1, len(pairs))
    fig, axes = plt.subplots(rows, per_pair, figsize=(1.5 * per_pair, 1.7 * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (i, j, count) in enumerate(pairs):
        idx = np.flatnonzero((labels == i) & (preds == j))
        idx = idx[np.argsort(-probs[idx, j], kind="stable")][:per_pair]
        for c, k in enumerate(idx):
            img, cmap = display_image(images[k])
            axes[r, c].imshow(img, cmap=cmap, interpolation="nearest")
            axes[r, c].set_title(f"p={probs[k, j]:.2f}", fontsize=7)
        axes[r, 0].text(-0.1, 0.5, f"{classes[i]} → {classes[j]}\n({count}×)", transform=axes[r, 0].transAxes,
                        ha="right", va="center", fontsize=8)
    fig.suptitle("most confused pairs: true → predicted (examples by confidence)", fontsize=9)
    return save_figure(fig, path)


def plot_top_losses(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, losses: np.ndarray,
                    classes: list[str], order: np.ndarray, path: Path, cols: int = 6) -> Path:
    plt = pyplot()
    rows = max(1, int(np.ceil(len(order) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, k in zip(axes.flat, order):
        img, cmap = display_image(images[k])
        p = probs[k].argmax()
        ax.imshow(img, cmap=cmap, interpolation="nearest")
        ax.set_title(f"true {classes[labels[k]]} ({probs[k, labels[k]]:.2f})\n"
                     f"pred {classes[p]} ({probs[k, p]:.2f})\nloss {losses[k]:.2f}", fontsize=7)
    fig.suptitle("highest-loss images: true (p) / predicted (p)", fontsize=9)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------


def analyze(run: str | Path, data: str | None = None, *, split: str = "test", out: str | Path | None = None,
            device: str = "auto", top_losses: int = 24, top_pairs: int = 6, calibration: bool = True,
            val_fraction: float = 0.1, n_bins: int = 15) -> dict[str, Any]:
    """Confusion matrix, per-class metrics, confused pairs and top-loss images of a run on ``split`` of ``data``.

    With ``calibration`` it also fits and stores a temperature (see :func:`reslab.evaluate.calibration.calibrate`).
    Returns the ``analyze.json`` dict, with ``figures`` listing the PNGs written.
    """
    from reslab.deploy.artifact import load_for_inference
    from reslab.evaluate.evaluate import load_data_for_model
    from reslab.train.rundir import environment_info, write_json

    loaded = load_for_inference(run, device=device)
    model, card, dev = loaded.model, loaded.card, loaded.device
    target = analysis_dir(run, out)
    splits = load_data_for_model(card, data)
    images = pick_split(splits, split)
    logits, labels_t = model_logits(model, card, images, device=dev)
    probs = torch.softmax(logits, 1).numpy()
    labels = labels_t.numpy()
    losses = torch.nn.functional.cross_entropy(logits, labels_t, reduction="none").numpy()
    classes = list(card["classes"])

    result: dict[str, Any] = {"run": str(run_dir_of(run)), "checkpoint": str(loaded.source),
                              "data": data or card["data"], "split": split, "classes": classes}
    result.update(classification_summary(labels, probs, classes, top_pairs=top_pairs))
    order = np.argsort(-losses, kind="stable")[:top_losses]
    files = images.files
    result["top_losses"] = [{"index": int(k), "file": files[k] if files else None,
                             "true": classes[labels[k]], "predicted": classes[int(probs[k].argmax())],
                             "p_true": float(probs[k, labels[k]]), "p_predicted": float(probs[k].max()),
                             "loss": float(losses[k])} for k in order]
    cm = np.array(result["confusion_matrix"])
    pairs = most_confused_pairs(cm, top_pairs)
    figures = [
        plot_confusion(cm, classes, target / "confusion.png",
                       title=f"{card['model']} on {split} ({100 * result['accuracy']:.1f}% top-1)"),
        plot_confused_pairs(images.images, labels, probs.argmax(1), probs, classes, pairs,
                            target / "confused_pairs.png"),
        plot_top_losses(images.images, labels, probs, losses, classes, order, target / "top_losses.png"),
    ]
    result["figures"] = [str(f) for f in figures]
    result["environment"] = environment_info(str(dev))
    write_json(target / "analyze.json", result)
    if calibration:
        from reslab.evaluate.calibration import calibrate

        cal = calibrate(run, data, out=target, device=device, val_fraction=val_fraction, n_bins=n_bins,
                        _loaded=loaded)
        result["calibration"] = {k: cal[k] for k in ("temperature", "fitted_on", "test_ece_before",
                                                      "test_ece_after")}
        result["figures"] += cal["figures"]
    result["written_to"] = str(target / "analyze.json")
    return result
