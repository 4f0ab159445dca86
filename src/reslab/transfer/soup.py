"""Model soups: average the weights of several networks fine-tuned from the same start.

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time":
- uniform soup (§2, Eq. 1): theta = mean_i theta_i over all ingredients;
- greedy soup (§2, Recipe 1): sort the ingredients by held-out accuracy, best first; add each to the soup only if
  the held-out accuracy of the averaged weights does not drop.
Averaging only makes sense for models in one basin, i.e. fine-tuned from the same pre-trained weights
(§3.3, Figure 3); the architecture, the class list and every tensor shape must match, which is checked.

BatchNorm running statistics (``running_mean``, ``running_var``) are averaged like the weights; integer buffers
(``num_batches_tracked``) take the first ingredient's value. Averaged statistics are only an approximation to
those of the averaged network (the variance of a mean of features is not the mean of variances), which for
models in one basin is small; re-estimating them on training data would be the exact alternative.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from reslab.train.checkpoint import checkpoint_run_dir, find_checkpoint, load_checkpoint


class SoupError(ValueError):
    """The runs cannot be averaged (different architectures, classes or data); the message names them."""


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating tensors (weights and BN statistics); other tensors from the first state."""
    if not states:
        raise SoupError("a soup needs at least one ingredient")
    out = {}
    for key, first in states[0].items():
        if first.dtype.is_floating_point:
            out[key] = torch.stack([s[key].to(torch.float64) for s in states]).mean(0).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def _ingredient(run: str | Path) -> dict[str, Any]:
    ckpt = load_checkpoint(find_checkpoint(run), load_train_state=False)
    state = ckpt.ema_state if ckpt.ema_state is not None else ckpt.model_state
    run_dir = checkpoint_run_dir(ckpt.path)
    config = {}
    if (run_dir / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return {"run": str(run), "checkpoint": str(ckpt.path), "manifest": ckpt.manifest, "state": state,
            "config": config}


def check_compatible(ingredients: list[dict[str, Any]]) -> list[str]:
    """Raise SoupError unless all ingredients share architecture, classes and tensor shapes; returns warnings
    (different starting weights, or different held-out splits)."""
    first = ingredients[0]
    m0 = first["manifest"]
    for ing in ingredients[1:]:
        m = ing["manifest"]
        for key, what in (("model", "architecture"), ("model_kwargs", "model options"), ("in_chans", "input channels"),
                          ("classes", "class list")):
            if m.get(key) != m0.get(key):
                a, b = m0.get(key), m.get(key)
                if key == "classes":
                    a, b = f"{len(a or [])} classes {list(a or [])[:4]}...", f"{len(b or [])} classes {list(b or [])[:4]}..."
                raise SoupError(f"cannot average {first['run']} and {ing['run']}: different {what} ({a} vs {b}); "
                                "soups need runs fine-tuned from the same start on the same classes")
        if ing["state"].keys() != first["state"].keys():
            raise SoupError(f"cannot average {first['run']} and {ing['run']}: different parameter names")
        shapes = [k for k, v in ing["state"].items() if v.shape != first["state"][k].shape]
        if shapes:
            raise SoupError(f"cannot average {first['run']} and {ing['run']}: different shapes for {shapes[:3]}")
    warnings = []
    starts = {ing["config"].get("init_from") for ing in ingredients}
    if len(starts) > 1:
        warnings.append(f"ingredients start from different weights ({sorted(map(str, starts))}); "
                        "averaging models from different starts usually fails (Wortsman et al. 2022, §3.3)")
    splits = {(ing["config"].get("data"), ing["config"].get("val_fraction"), ing["config"].get("seed"))
              for ing in ingredients}
    if len(splits) > 1:
        warnings.append("ingredients were trained with different data/val-fraction/seed, so some held-out images "
                        "were training images of another ingredient: greedy selection is optimistic")
    return warnings


def _evaluate_state(model, state, loaders, device, num_classes) -> dict[str, float]:
    from reslab.train.engine import evaluate_loader

    model.load_state_dict(state)
    return {split: evaluate_loader(model, loader, device=device, amp_dtype=None, num_classes=num_classes)["top1"]
            for split, loader in loaders.items()}


def soup(runs: Sequence[str | Path], data: str | None = None, *, greedy: bool = True, out: str | Path | None = None,
         device: str = "auto", batch_size: int = 512) -> dict[str, Any]:
    """``reslab soup``: uniform (and greedy) soup of ``runs``; accuracies on val and test; the chosen soup
    (greedy when asked, else uniform) is written as a reslab run directory at ``out``."""
    from reslab.data import load_data
    from reslab.evaluate.evaluate import model_loader
    from reslab.models import create_model
    from reslab.train.checkpoint import save_checkpoint
    from reslab.train.engine import select_device
    from reslab.train.rundir import environment_info, write_json

    if len(runs) < 2:
        raise SoupError("a soup needs at least two runs")
    ingredients = [_ingredient(r) for r in runs]
    warnings = check_compatible(ingredients)
    card = {k: v for k, v in ingredients[0]["manifest"].items() if k not in ("files", "format_version", "step",
                                                                               "epoch", "metrics")}
    cfg0 = ingredients[0]["config"]
    val_fraction = float(cfg0.get("val_fraction") or 0.0)
    if val_fraction <= 0:
        raise SoupError(f"{runs[0]} has no validation split (val_fraction 0): a greedy soup selects on held-out "
                        "data; fine-tune with --val-fraction > 0 (reslab finetune holds out 10 % by default)")
    dev = select_device(device)
    prep = card["preprocessing"]
    h, w = prep["stored_size"]
    spec = data or card["data"]
    splits = load_data(spec, val_fraction=val_fraction, seed=int(cfg0.get("seed", 0)), image_size=h if h == w else None,
                       channels=prep["channels"], progress=False)
    if list(splits.classes) != list(card["classes"]):
        raise SoupError(f"--data {spec}: its classes differ from the runs' {len(card['classes'])} classes")
    loaders = {"val": model_loader(card, splits.val, device=dev, batch_size=batch_size),
               "test": model_loader(card, splits.test, device=dev, batch_size=batch_size)}
    model = create_model(card["model"], num_classes=card["num_classes"], in_chans=card["in_chans"],
                         **card.get("model_kwargs", {})).to(dev).eval()
    n_cls = card["num_classes"]

    for ing in ingredients:
        ing["accuracy"] = _evaluate_state(model, ing["state"], loaders, dev, n_cls)
    uniform_state = average_states([ing["state"] for ing in ingredients])
    result: dict[str, Any] = {
        "data": spec, "val_fraction": val_fraction,
        "ingredients": [{"run": ing["run"], "val_top1": ing["accuracy"]["val"], "test_top1": ing["accuracy"]["test"]}
                        for ing in ingredients],
        "uniform": {**{f"{k}_top1": v for k, v in _evaluate_state(model, uniform_state, loaders, dev, n_cls).items()},
                    "runs": [ing["run"] for ing in ingredients]},
        "warnings": warnings,
    }
    best = max(ingredients, key=lambda ing: ing["accuracy"]["val"])
    result["best_ingredient"] = {"run": best["run"], "val_top1": best["accuracy"]["val"],
                                 "test_top1": best["accuracy"]["test"]}
    chosen_state, chosen = uniform_state, "uniform"
    if greedy:
        order = sorted(ingredients, key=lambda ing: ing["accuracy"]["val"], reverse=True)
        members, soup_state, soup_acc = [order[0]], order[0]["state"], order[0]["accuracy"]
        for ing in order[1:]:
            candidate = average_states([m["state"] for m in members + [ing]])
            acc = _evaluate_state(model, candidate, loaders, dev, n_cls)
            if acc["val"] >= soup_acc["val"]:  # Recipe 1: keep the ingredient unless held-out accuracy drops
                members, soup_state, soup_acc = members + [ing], candidate, acc
        result["greedy"] = {"val_top1": soup_acc["val"], "test_top1": soup_acc["test"],
                            "runs": [m["run"] for m in members]}
        chosen_state, chosen = soup_state, "greedy"
    result["written"] = chosen
    result["environment"] = environment_info(str(dev))

    out = Path(out) if out else Path(runs[0]).resolve().parent / f"soup-{chosen}"
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"val_top1": result[chosen]["val_top1"], "test_top1": result[chosen]["test_top1"]}
    manifest = {**card, "metrics": metrics, "soup": {"kind": chosen, "runs": result[chosen]["runs"]}}
    for name in ("last", "best"):
        save_checkpoint(out / "checkpoints" / name, model_state=chosen_state, manifest=manifest)
    import yaml

    from reslab.train.rundir import atomic_write_text

    atomic_write_text(out / "config.yaml", yaml.safe_dump({**cfg0, "out": str(out)}, sort_keys=False))
    (out / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "step": 0, **metrics}) + "\n")
    write_json(out / "model.json", {**card, "metrics": metrics, "run": str(out)})
    write_json(out / "summary.json", {"run_dir": str(out), "status": "finished", "model": card["model"],
                                      "data": card["data"], "final": metrics, "best": metrics,
                                      "params": card.get("params"), "macs": card.get("macs"), "soup": result,
                                      "environment": result["environment"]})
    write_json(out / "soup.json", result)
    result["out"] = str(out)
    return result
