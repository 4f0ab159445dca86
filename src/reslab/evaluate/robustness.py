"""``reslab robustness``: accuracy under the 15 common corruptions at 5 severities, and the mean corruption error.

Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", §3 ("Robustness metrics"): with ``E^f_{s,c}`` the top-1 error of model ``f`` on corruption
``c`` at severity ``s``,

- corruption error ``CE^f_c = sum_s E^f_{s,c} / sum_s E^base_{s,c}`` (normalised by a baseline model, AlexNet
  in the paper; here any run given with ``baseline``), and ``mCE`` its mean over the 15 corruptions;
- relative CE ``sum_s (E^f_{s,c} - E^f_clean) / sum_s (E^base_{s,c} - E^base_clean)``, the degradation
  relative to the model's own clean error, and its mean (relative mCE).

Without a baseline, the unnormalised mean corruption error (mean of ``E^f_{s,c}`` over c and s) is reported.
The corrupted images are generated on the fly (reslab.evaluate.corruptions), deterministically for a seed,
from a fixed random subset of ``limit`` test images (all of them with ``limit=None``); the model and the
baseline see exactly the same corrupted images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from reslab.evaluate.corruptions import CORRUPTIONS, SEVERITIES, corrupt


def corruption_errors(errors: dict[str, list[float]], clean: float, base_errors: dict[str, list[float]] | None = None,
                      base_clean: float | None = None) -> dict[str, Any]:
    """CE, mCE, relative CE and relative mCE (in %) from per-corruption lists of errors over severities."""
    out: dict[str, Any] = {"mean_error": float(np.mean([np.mean(v) for v in errors.values()]))}
    if base_errors is None:
        return out
    ce, rel = {}, {}
    for c, e in errors.items():
        b = base_errors[c]
        ce[c] = 100 * float(np.sum(e) / max(1e-12, np.sum(b)))
        denom = float(np.sum(np.asarray(b) - base_clean))
        rel[c] = 100 * float(np.sum(np.asarray(e) - clean) / denom) if abs(denom) > 1e-12 else None
    out.update({"ce": ce, "mce": float(np.mean(list(ce.values()))), "relative_ce": rel,
                "relative_mce": float(np.mean([v for v in rel.values() if v is not None])) if any(
                    v is not None for v in rel.values()) else None})
    return out


def _accuracy(model, card, device, images: np.ndarray, labels: np.ndarray) -> float:
    from reslab.data import ImageArray
    from reslab.evaluate.analyze import model_logits

    logits, y = model_logits(model, card, ImageArray(images, labels, None), device=device)
    return float((logits.argmax(1) == y).float().mean())


def robustness(run: str | Path, data: str | None = None, *, baseline: str | Path | None = None, split: str = "test",
               limit: int | None = 1000, corruptions: list[str] | None = None, severities=SEVERITIES, seed: int = 0,
               out: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Evaluate a run (and optionally a baseline run) on corrupted copies of a split; write JSON and figures."""
    from reslab.deploy.artifact import load_for_inference
    from reslab.evaluate.analyze import analysis_dir, pick_split, run_dir_of
    from reslab.evaluate.evaluate import load_data_for_model
    from reslab.train.rundir import environment_info, write_json

    names = list(corruptions or CORRUPTIONS)
    unknown = [c for c in names if c not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"--corruptions: unknown {unknown}; choose from {', '.join(CORRUPTIONS)}")
    loaded = load_for_inference(run, device=device)  # a run, or an exported / quantized folder
    model, card, dev = loaded.model, loaded.card, loaded.device
    images = pick_split(load_data_for_model(card, data), split)
    base = None
    if baseline is not None:
        base_loaded = load_for_inference(baseline, device=device)
        base_model, base_card = base_loaded.model, base_loaded.card
        if list(base_card["classes"]) != list(card["classes"]):
            raise ValueError(f"--baseline {baseline}: its classes differ from the run's; a baseline must share them")
        if list(base_card["preprocessing"]["stored_size"]) != list(card["preprocessing"]["stored_size"]) or \
                base_card["preprocessing"]["channels"] != card["preprocessing"]["channels"]:
            raise ValueError(f"--baseline {baseline}: it expects images stored at a different size or channel "
                             "count; both models must read the same corrupted images")
        base = (base_model, base_card, base_loaded.device)
    index = np.arange(len(images))
    if limit and len(images) > limit:
        index = np.sort(np.random.default_rng(seed).choice(len(images), size=limit, replace=False))
    clean_images, labels = np.ascontiguousarray(images.images[index]), images.labels[index]

    clean = 1 - _accuracy(model, card, dev, clean_images, labels)
    base_clean = 1 - _accuracy(*base, clean_images, labels) if base else None
    errors: dict[str, list[float]] = {}
    base_errors: dict[str, list[float]] = {}
    for name in names:
        errors[name], base_errors[name] = [], []
        for s in severities:
            corrupted = corrupt(clean_images, name, s, seed=seed)
            errors[name].append(1 - _accuracy(model, card, dev, corrupted, labels))
            if base:
                base_errors[name].append(1 - _accuracy(*base, corrupted, labels))
        print(f"{name:>18}: error " + " ".join(f"{100 * e:5.1f}" for e in errors[name]) + " %")
    summary = corruption_errors(errors, clean, base_errors if base else None, base_clean)
    target = analysis_dir(run, out)
    figures = [plot_heatmap(errors, clean, list(severities), target / "robustness.png",
                            f"{card['model']}: top-1 accuracy under corruption ({len(labels)} {split} images)")]
    figures.append(plot_examples(clean_images, names, list(severities), seed, target / "corruption_examples.png"))
    result = {
        "run": str(run_dir_of(run)), "checkpoint": str(loaded.source), "data": data or card["data"],
        "split": split, "images": int(len(labels)), "seed": seed, "severities": list(severities),
        "clean_error": clean,
        "errors": errors,
        "accuracy": {c: [1 - e for e in v] for c, v in errors.items()},
        "mean_corruption_error_unnormalised": summary["mean_error"],
        "baseline": None if base is None else {"run": str(run_dir_of(baseline)), "clean_error": base_clean,
                                               "errors": base_errors},
        "ce": summary.get("ce"), "mce": summary.get("mce"), "relative_ce": summary.get("relative_ce"),
        "relative_mce": summary.get("relative_mce"),
        "metric_note": ("CE and mCE in % of the baseline's errors (Hendrycks & Dietterich 2019, §3)" if base else
                        "no --baseline: mCE needs one; mean_corruption_error_unnormalised is the mean top-1 error "
                        "over corruptions and severities"),
        "figures": [str(f) for f in figures], "environment": environment_info(str(dev)),
    }
    write_json(target / "robustness.json", result)
    result["written_to"] = str(target / "robustness.json")
    return result


def plot_heatmap(errors: dict[str, list[float]], clean: float, severities: list[int], path: Path, title: str) -> Path:
    from reslab.evaluate.analyze import pyplot, save_figure

    plt = pyplot()
    names = list(errors)
    acc = 100 * (1 - np.array([errors[n] for n in names]))
    table = np.concatenate([np.full((len(names), 1), 100 * (1 - clean)), acc, acc.mean(1, keepdims=True)], 1)
    fig, ax = plt.subplots(figsize=(7, 0.38 * len(names) + 1.6))
    im = ax.imshow(table, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(table.shape[1]), ["clean"] + [f"s{s}" for s in severities] + ["mean"])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            ax.text(j, i, f"{table[i, j]:.0f}", ha="center", va="center", fontsize=7)
    ax.set_title(f"{title}\nmean over corruptions and severities: {acc.mean():.1f}%", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="top-1 accuracy (%)")
    return save_figure(fig, path)


def plot_examples(images: np.ndarray, names: list[str], severities: list[int], seed: int, path: Path) -> Path:
    """One test image under every corruption and severity (first image of the subset)."""
    from reslab.evaluate.analyze import display_image, pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(len(names), len(severities) + 1, figsize=(1.1 * (len(severities) + 1), 1.1 * len(names)),
                             squeeze=False)
    for i, name in enumerate(names):
        row = [images[0]] + [corrupt(images[0], name, s, seed=seed) for s in severities]
        for j, img in enumerate(row):
            im, cmap = display_image(img)
            axes[i, j].imshow(im, cmap=cmap, interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    for j, label in enumerate(["clean"] + [f"severity {s}" for s in severities]):
        axes[0, j].set_title(label, fontsize=7)
    return save_figure(fig, path)
