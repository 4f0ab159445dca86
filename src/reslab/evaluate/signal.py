"""``reslab signal``: how the forward signal and the backward gradient travel through plain and residual nets.

For each depth, the residual network (``resnet<d>``) and its plain twin (the same layers without shortcuts,
He et al. 2016 §4.1 / Fig. 6) are built with their default initialisation; one batch goes forward in
training mode (BatchNorm on batch statistics, as in the first step of training) and the cross-entropy
against random labels goes backward. At the output of the stem and of every block we record

- the RMS of the activation, ``sqrt(mean(h^2))``,
- the RMS of the gradient of the loss with respect to that activation.

Plotted against block index (log scale), this is the picture of criticality in Roberts, Yaida & Hanin 2022,
"The Principles of Deep Learning Theory" (ch. 9 and 11): in a plain net each layer multiplies the signal by
a random Jacobian, so the gradient reaching early layers shrinks or grows geometrically with depth, while
in a residual net ``h_{l+1} = h_l + F(h_l)`` keeps an identity path and the gradient stays within a small
factor of its value at the top (Veit et al. 2016; Balduzzi et al. 2017, "The Shattered Gradients Problem").
With ``run`` (one run or several, e.g. a trained ``plain56`` and ``resnet56``), each trained model is measured on a
batch of its own test images with real labels and BN in eval mode, and drawn dotted: the same comparison after
training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the stem (its ReLU output) and of every block, in forward order."""
    if not hasattr(model, "stage_info"):
        raise ValueError(f"{type(model).__name__} has no stage_info: signal needs a reslab ClassifierNet")
    out = []
    stem_relu = getattr(model, "relu", None)
    if isinstance(stem_relu, nn.Module):
        out.append(("stem", stem_relu))
    for info in model.stage_info:
        for i, block in enumerate(getattr(model, info.name)):
            out.append((f"{info.name}.{i}", block))
    return out


def measure_signal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, train_mode: bool = True) -> dict[str, Any]:
    """Per-block activation RMS and gradient RMS of one forward/backward pass of ``model`` on ``(x, y)``."""
    modules = block_modules(model)
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def fn(module, inputs, output):
            if name == "stem" and name in acts:  # the stem ReLU module is reused by nothing else; keep the first
                return
            output.retain_grad()
            acts[name] = output
        return fn

    for name, module in modules:
        handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.train(train_mode)
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x.requires_grad_(False)), y)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    names = [n for n, _ in modules if n in acts]
    rms = lambda t: float(t.detach().float().pow(2).mean().sqrt())  # noqa: E731
    return {"blocks": names,
            "activation_rms": [rms(acts[n]) for n in names],
            "gradient_rms": [rms(acts[n].grad) if acts[n].grad is not None else float("nan") for n in names],
            "loss": float(loss.detach())}


def _pair_names(model: str, depths: list[int] | None) -> list[tuple[str, str, dict]]:
    """(label, registry name, kwargs) for each net to measure: per depth the residual one and its plain twin."""
    import re

    from reslab.models import list_models

    m = re.fullmatch(r"(resnet|plain)(\d+)", model)
    if depths:
        if not m:
            raise ValueError(f"--depths needs a model named resnet<depth> or plain<depth>, got {model!r}")
        names = [f"resnet{d}" for d in depths]
    else:
        names = [model if not m else f"resnet{m.group(2)}"]
        if m and int(m.group(2)) < 110 and "resnet110" in list_models("resnet110"):
            names.append("resnet110")  # the deeper pair, where plain nets fail in Fig. 6
    known = set(list_models("*"))
    out = []
    for name in names:
        if name not in known:
            raise ValueError(f"unknown model {name!r} (see `reslab models`)")
        depth = name.removeprefix("resnet")
        out.append((name, name, {}))
        out.append((f"plain{depth}" if name.startswith("resnet") else f"{name} (no shortcuts)", name,
                    {"shortcut": "plain"}))
    return out


def signal(model: str = "resnet56", *, run: str | Path | list[str | Path] | None = None,
           depths: list[int] | None = None,
           batch_size: int = 64, seed: int = 0, out: str | Path | None = None, device: str = "cpu",
           num_classes: int = 10) -> dict[str, Any]:
    """Measure and plot per-block signal and gradient RMS of plain vs residual nets at initialisation.

    Writes ``signal.json`` and ``signal.png`` into ``out`` (default ``RUN/analysis`` with a run, else
    ``runs/signal-<model>``).
    """
    from reslab.evaluate.analyze import analysis_dir
    from reslab.models import create_model, model_entry
    from reslab.train.engine import select_device
    from reslab.train.rundir import environment_info, write_json

    dev = select_device(device)
    entry = model_entry(model)
    in_chans, h, w = entry.input_size if hasattr(entry, "input_size") else entry["input_size"]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, in_chans, h, w, generator=gen)  # inputs as normalised data: zero mean, unit variance
    y = torch.randint(0, num_classes, (batch_size,), generator=gen)
    nets = []
    for label, name, kwargs in _pair_names(model, depths):
        torch.manual_seed(seed)
        net = create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs).to(dev)
        r = measure_signal(net, x.to(dev), y.to(dev))
        nets.append({"label": label, "model": name, "model_kwargs": kwargs, "state": "init", **r})
        del net
    runs = [] if run is None else [run] if isinstance(run, (str, Path)) else list(run)
    nets.extend(_trained(r, dev, batch_size, seed) for r in runs)
    target = Path(out) if out else (analysis_dir(runs[0]) if runs else Path("runs") / f"signal-{model}")
    target.mkdir(parents=True, exist_ok=True)
    figure = plot_signal(nets, target / "signal.png")
    result = {"model": model, "batch_size": batch_size, "seed": seed,
              "input": "standard normal images (as normalised data) and random labels; BN in training mode",
              "nets": nets, "figures": [str(figure)], "environment": environment_info(str(dev))}
    write_json(target / "signal.json", result)
    result["written_to"] = str(target / "signal.json")
    return result


def _trained(run, dev, batch_size: int, seed: int) -> dict[str, Any]:
    """The run's trained model on a batch of its own test images (labels real, BN in eval mode)."""
    from reslab.evaluate.evaluate import load_data_for_model, model_loader
    from reslab.train.checkpoint import load_model

    model, card = load_model(run, device=dev)
    splits = load_data_for_model(card, None)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(splits.test), size=min(batch_size, len(splits.test)), replace=False))
    x, y = next(iter(model_loader(card, splits.test.subset(idx), device=dev, batch_size=batch_size)))
    r = measure_signal(model.float(), x.contiguous(), y, train_mode=False)
    return {"label": f"{card['model']} trained ({Path(str(run)).name})", "model": card["model"],
            "model_kwargs": card.get("model_kwargs", {}), "state": "trained", **r}


def plot_signal(nets: list[dict], path: Path) -> Path:
    from reslab.evaluate.analyze import pyplot, save_figure

    plt = pyplot()
    fig, (ax_a, ax_g) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, net in enumerate(nets):
        plain = "plain" in net["label"] or net["model_kwargs"].get("shortcut") == "plain"
        trained = net["state"] == "trained"
        colour = ("0.55" if plain else "k") if trained else colours[(i // 2) % len(colours)]
        style = dict(color=colour, ls=":" if trained else ("--" if plain else "-"), lw=1.6,
                     marker="o" if plain else None, ms=2)
        xs = np.arange(len(net["blocks"]))
        ax_a.plot(xs, net["activation_rms"], label=net["label"], **style)
        ax_g.plot(xs, net["gradient_rms"], label=net["label"], **style)
    ax_a.set(yscale="log", xlabel="block (0 = stem)", ylabel="RMS of the block output", title="forward signal")
    ax_g.set(yscale="log", xlabel="block (0 = stem)", ylabel="RMS of d loss / d block output",
             title="backward gradient")
    for ax in (ax_a, ax_g):
        ax.grid(alpha=0.3, which="both")
    ax_g.legend(fontsize=7)
    trained = any(n["state"] == "trained" for n in nets)
    fig.suptitle("per-block signal at initialisation: plain (dashed) vs residual (solid)"
                 + ("; trained runs dotted (plain grey, residual black)" if trained else ""), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
