"""``reslab scaling``: test accuracy against training-set size, on nested subsets of one data set.

Each fraction trains a fresh model with ``TrainConfig.train_fraction`` (a stratified subset drawn from a
seeded per-class permutation, so the 0.1 subset lies inside the 0.2 subset, and so on) and the same recipe,
epochs and seed; the test split is always the full one. Error against data size on a log axis shows how far
the model is from saturating its data (cf. Hestness et al. 2017, "Deep Learning Scaling is Predictable,
Empirically": power-law regions appear as straight lines on log-log axes).

Epochs are held fixed, so a smaller subset also gets proportionally fewer optimiser steps; pass
``iterations`` in ``overrides`` (``reslab scaling --iterations N``) to hold the number of steps fixed instead.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np


def parse_fractions(text: str | list[float]) -> list[float]:
    values = [float(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip()]
    if not values or any(not 0 < v <= 1 for v in values):
        raise ValueError(f"--fractions {text!r}: give comma-separated fractions in (0, 1], e.g. 0.1,0.2,0.4,0.8,1.0")
    return sorted(set(values))


def subset_sizes(data: str, fractions: list[float], seed: int, val_fraction: float = 0.0) -> tuple[int, list[int]]:
    """(full train size, subset size per fraction), computed with the trainer's own subset rule."""
    from reslab.data import load_data
    from reslab.data.sources import stratified_split

    splits = load_data(data, val_fraction=val_fraction, seed=seed, progress=False)
    labels = splits.train.labels
    return len(labels), [len(labels) if f >= 1 else len(stratified_split(labels, f, seed)[1]) for f in fractions]


def scaling(model: str, data: str = "digits", *, fractions: list[float] | str = (0.1, 0.2, 0.4, 0.8, 1.0),
            epochs: int | None = None, recipe: str | None = None, seed: int = 0, out: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``model`` on each fraction of ``data``'s train split and plot test accuracy against size.

    Sub-runs go to ``OUT/fraction-<f>/``; ``scaling.json`` and ``scaling.png`` to ``OUT`` (default
    ``runs/scaling-<model>-<data name>``).
    """
    from reslab.train import train
    from reslab.train.config import TrainConfig, resolve_config
    from reslab.train.rundir import environment_info, write_json

    if "train_fraction" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise ValueError("reslab scaling needs TrainConfig.train_fraction, which this reslab does not have")
    fractions = parse_fractions(fractions if not isinstance(fractions, tuple) else list(fractions))
    target = Path(out) if out else Path("runs") / f"scaling-{model}-{Path(data.split(':')[-1]).name or data}"
    target.mkdir(parents=True, exist_ok=True)
    flags = {"model": model, "data": data, "seed": seed, "epochs": epochs, "recipe": recipe, "progress": False,
             **(overrides or {})}
    if flags["recipe"] is None and data == "digits":
        flags["recipe"] = "quick"  # as `reslab train`: the digits train with the quick recipe
    base = resolve_config(flags)
    full, sizes = subset_sizes(data, fractions, seed, base.val_fraction)
    points = []
    for f, n in zip(fractions, sizes):
        cfg = dataclasses.replace(base, train_fraction=f, out=str(target / f"fraction-{f:g}"))
        summary = train(cfg)
        final = summary.final
        points.append({"fraction": f, "train_images": n, "run": summary.run_dir,
                       "test_top1": final.get("test_top1"), "test_loss": final.get("test_loss"),
                       "steps": summary.steps, "wall_seconds": summary.wall_seconds})
        print(f"fraction {f:g}: {n} images, test top-1 {100 * final.get('test_top1', float('nan')):.2f}%")
    length = f"{base.iterations} iterations" if base.iterations else f"{base.epochs} epochs"
    figure = plot_scaling(points, target / "scaling.png", f"{model} on {data}, {length} per fraction, seed {seed}")
    result = {"model": model, "data": data, "full_train_images": full, "epochs": base.epochs,
              "iterations": base.iterations, "recipe": base.recipe, "seed": seed, "points": points,
              "config": base.to_dict(), "figures": [str(figure)], "environment": environment_info(None)}
    write_json(target / "scaling.json", result)
    result["written_to"] = str(target / "scaling.json")
    return result


def plot_scaling(points: list[dict], path: Path, title: str) -> Path:
    from reslab.evaluate.analyze import pyplot, save_figure

    plt = pyplot()
    n = np.array([p["train_images"] for p in points], dtype=float)
    acc = np.array([100 * (p["test_top1"] if p["test_top1"] is not None else np.nan) for p in points])
    fig, (ax_acc, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(n, acc, "o-")
    for x, y, p in zip(n, acc, points):
        ax_acc.annotate(f"{p['fraction']:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax_acc.set(xscale="log", xlabel="training images (log scale)", ylabel="test top-1 accuracy (%)",
               title="accuracy against data size")
    ax_err.plot(n, 100 - acc, "o-", color="tab:red")
    ax_err.set(xscale="log", yscale="log", xlabel="training images (log scale)", ylabel="test top-1 error (%, log)",
               title="error against data size (log-log)")
    from matplotlib.ticker import NullFormatter

    for ax in (ax_acc, ax_err):
        ax.set_xticks(n, [f"{int(v)}" for v in n], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
    ax_err.yaxis.set_minor_formatter(NullFormatter())
    ax_err.set_yticks(*zip(*[(v, f"{v:g}") for v in (1, 2, 5, 10, 20, 50, 100)
                            if np.nanmin(100 - acc) / 2 <= v <= np.nanmax(100 - acc) * 2]))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
