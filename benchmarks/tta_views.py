"""Which test-time augmentation: a trained run's held-out images under a grid of translated and mirrored views.

reslab's TTA (``--tta-flip --tta-shift 1``) is airbench's (Jordan 2024, §3.6): the image and copies shifted by
(+1, +1) and (-1, -1) pixels, each with its mirror, weighted 1/2, 1/4, 1/4. This script computes the logits of
every view of a 3x3 grid of 1-pixel shifts (each with its mirror) once, and reports the top-1 of several ways
to combine them on the same images, so that a richer TTA is judged on the validation split, at no training cost:

    python benchmarks/tta_views.py RUN --data /tmp/cifar10 --out benchmarks/results/tta-views.json

RUN must have held out a validation split (``--val-fraction``); ``--split test`` is there for a final check only.
"""
from __future__ import annotations

import argparse
import time

import torch

from reslab.bench import write_result
from reslab.deploy.artifact import load_for_inference
from reslab.evaluate.evaluate import load_data_for_model, model_loader
from reslab.train.config import load_config_file
from reslab.train.engine import _translate, retain_freed_memory

SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def view_logits(model, loader) -> tuple[dict, torch.Tensor]:
    """{(dy, dx, mirrored): logits} over every batch of ``loader``, and the labels."""
    logits, labels = {(dy, dx, m): [] for dy, dx in SHIFTS for m in (False, True)}, []
    with torch.no_grad():
        for x, y in loader:
            labels.append(y)
            for dy, dx in SHIFTS:
                shifted = x if (dy, dx) == (0, 0) else _translate(x, dy, dx)
                logits[(dy, dx, False)].append(model(shifted).float())
                logits[(dy, dx, True)].append(model(torch.flip(shifted, dims=[3])).float())
    return {k: torch.cat(v) for k, v in logits.items()}, torch.cat(labels)


def combinations(logits: dict) -> dict[str, torch.Tensor]:
    """Named TTA schemes as weighted sums of the views (each position averaged over its mirror)."""
    def pos(dy, dx):
        return (logits[(dy, dx, False)] + logits[(dy, dx, True)]) / 2

    diagonal = (pos(1, 1) + pos(-1, -1)) / 2
    anti = (pos(1, -1) + pos(-1, 1)) / 2
    axes = (pos(1, 0) + pos(-1, 0) + pos(0, 1) + pos(0, -1)) / 4
    return {
        "none": logits[(0, 0, False)],
        "flip (2 views)": pos(0, 0),
        "flip + shift 1, airbench (6 views; reslab's --tta-shift 1)": pos(0, 0) / 2 + diagonal / 2,
        "flip + 4 diagonal shifts (10 views)": pos(0, 0) / 2 + (diagonal + anti) / 4,
        "flip + 3x3 grid, equal weights (18 views)": (pos(0, 0) + 2 * diagonal + 2 * anti + 4 * axes) / 9,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a training run folder")
    p.add_argument("--data", default=None, help="the data (default: the run's own)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/tta-views.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    loaded = load_for_inference(args.run, device="cpu")
    cfg = load_config_file(loaded.run_dir / "config.yaml")
    splits = load_data_for_model(loaded.card, args.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    images = getattr(splits, args.split)
    if images is None:
        raise SystemExit(f"{args.run}: the run held out no validation split; train it with --val-fraction")
    started = time.time()
    logits, labels = view_logits(loaded.model, model_loader(loaded.card, images, device=torch.device("cpu"),
                                                            batch_size=args.batch_size))
    top1 = {name: float((l.argmax(1) == labels).float().mean()) for name, l in combinations(logits).items()}
    for name, acc in top1.items():
        print(f"{acc:.2%}  {name}")
    result = {"run": str(args.run), "split": args.split, "images": int(labels.numel()), "top1": top1,
              "seconds": round(time.time() - started, 1)}
    print("written to", write_result("tta-views", result, args.out))
    return result


if __name__ == "__main__":
    main()
