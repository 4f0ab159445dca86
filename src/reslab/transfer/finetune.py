"""Fine-tuning a trained network on a small data set of one's own.

The recipe of "How transferable are features in deep neural networks?" (Yosinski et al. 2014, §4.1) and of
ULMFiT's discriminative fine-tuning (Howard & Ruder 2018, §3.2), for a ResNet:
1. start from the trained weights (a reslab run, or a torchvision ``.pth`` file read with ``weights_only=True``);
2. replace the classifier for the new class count (``reset_classifier``) when the classes differ;
3. optionally freeze the early stages (``--freeze stem,layer1``): their parameters stop learning and their
   BatchNorm layers keep the source statistics (eval mode), as frozen backbones do in detection (He et al. 2017);
4. train with a lower learning rate for the backbone than for the new head (``--head-lr-mult``).

Training itself is ``reslab.train.train`` with three TrainConfig fields (``init_from``, ``freeze``,
``backbone_lr_mult``), so the result is an ordinary run directory that eval, predict, probe and soup read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch.nn as nn

STEM = "stem"  # alias for the modules before the first stage (conv1, bn1, ... in the ResNets)
HEAD_PREFIX = "fc."


class _KeepEval:
    """Forward pre-hook: a frozen module runs in eval mode (BN uses and keeps its running statistics),
    whatever ``model.train()`` set."""

    def __call__(self, module: nn.Module, args) -> None:
        if module.training:
            module.eval()


def freezable_names(model: nn.Module) -> list[str]:
    """Names accepted by ``--freeze``: ``stem`` and the stages of ``model.stage_info``."""
    return [STEM] + [info.name for info in model.stage_info]


def _stem_modules(model: nn.Module) -> list[nn.Module]:
    if isinstance(getattr(model, "stem", None), nn.Module):
        return [model.stem]
    stages = {info.name.split(".")[0] for info in model.stage_info}
    return [m for name, m in model.named_children() if name not in stages and name != "fc"]


def freeze_modules(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Stop ``names`` (``stem``, ``layer1``, ...) from learning; returns the frozen parameter names."""
    names = list(names)
    valid = freezable_names(model)
    unknown = [n for n in names if n not in valid and n != "fc"]
    if unknown:
        raise ValueError(f"--freeze {','.join(unknown)}: not a stage of {type(model).__name__}; "
                         f"choose from {', '.join(valid)}")
    modules = []
    for name in names:
        modules += _stem_modules(model) if name == STEM else [model.get_submodule(name)]
    frozen_ids = set()
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
            frozen_ids.add(id(p))
        m.register_forward_pre_hook(_KeepEval())
    return [n for n, p in model.named_parameters() if id(p) in frozen_ids]


def load_initial_weights(model: nn.Module, source: str | Path, *, model_name: str, in_chans: int,
                         classes: list[str]) -> dict[str, Any]:
    """Copy the weights of ``source`` (a reslab run/checkpoint, or a torchvision ``.pth``) into ``model``.

    The classifier is kept only when the source was trained on the same classes (same names, same order);
    otherwise ``model`` keeps its fresh head (``reset_classifier``). Everything else must fit exactly.
    Returns ``{"source", "loaded", "reset"}``.
    """
    from reslab.train.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, load_torchvision_weights

    source = Path(source)
    if source.is_file() and source.suffix in (".pth", ".pt", ".bin"):
        report = load_torchvision_weights(source, model)
        return {"source": str(source), "loaded": len(report["loaded"]), "reset": report["skipped"]}
    ckpt = load_checkpoint(find_checkpoint(source), load_train_state=False)
    m = ckpt.manifest
    if m.get("model") != model_name:
        raise ValueError(f"--init-from {source}: it holds a {m.get('model')}, not a {model_name}; "
                         f"fine-tune with --model {m.get('model')}")
    if m.get("in_chans") != in_chans:
        raise ValueError(f"--init-from {source}: its stem takes {m.get('in_chans')} channels but the data has "
                         f"{in_chans}; convert the images (e.g. to RGB) first")
    state = ckpt.ema_state if ckpt.ema_state is not None else ckpt.model_state
    own = model.state_dict()
    keep_head = list(m.get("classes", [])) == list(classes)
    reset = [] if keep_head else sorted(k for k in own if k.startswith(HEAD_PREFIX))
    loaded = {k: v for k, v in state.items() if k not in reset}
    missing = sorted(set(own) - set(loaded) - set(reset))
    wrong = sorted(k for k in loaded if k in own and loaded[k].shape != own[k].shape)
    if missing or wrong:
        raise CheckpointError(f"--init-from {source}: the weights do not fit {model_name} "
                              f"(missing: {missing[:3]}, wrong shape: {wrong[:3]}); same --model-kwargs?")
    model.load_state_dict({**own, **loaded})
    return {"source": str(source), "loaded": len(loaded), "reset": reset}


def finetune_config(run: str | Path | None, data: str, *, weights: str | Path | None = None,
                    model: str | None = None, freeze: list[str] | None = None, epochs: int = 10, lr: float = 0.01,
                    head_lr_mult: float = 10.0, out: str | Path | None = None, **overrides):
    """The TrainConfig of a fine-tuning run: ``lr`` is the backbone's rate, the head gets ``lr * head_lr_mult``.

    Defaults follow common practice for small targets: SGD+momentum, cosine decay, weight decay 5e-4,
    10 % of train held out as validation (model selection and greedy soups need it).
    """
    from reslab.train.config import TrainConfig

    if head_lr_mult <= 0 or lr <= 0:
        raise ValueError("--lr and --head-lr-mult must be > 0")
    if (run is None) == (weights is None):
        raise ValueError("give a reslab RUN to start from, or --weights FILE.pth with --model NAME (not both)")
    if weights is not None:
        if not model:
            raise ValueError("--weights needs --model (the torchvision architecture, e.g. resnet18)")
        source, model_kwargs = str(weights), {}
    else:
        from reslab.train.checkpoint import find_checkpoint, load_checkpoint

        manifest = load_checkpoint(find_checkpoint(run), load_train_state=False).manifest
        if model and model != manifest["model"]:
            raise ValueError(f"--model {model}: {run} holds a {manifest['model']}")
        model, model_kwargs, source = manifest["model"], dict(manifest.get("model_kwargs", {})), str(run)
        model_kwargs.pop("drop_path_rate", None)  # a TrainConfig field of its own
    values = dict(model=model, model_kwargs=model_kwargs, data=data, init_from=source, freeze=list(freeze or []),
                  epochs=epochs, lr=lr * head_lr_mult, backbone_lr_mult=1.0 / head_lr_mult, schedule="cosine",
                  weight_decay=5e-4, val_fraction=0.1, out=str(out) if out else None)
    values.update(overrides)
    return TrainConfig(**values).validate()


def finetune(run: str | Path | None, data: str, **kwargs):
    """``reslab finetune``: train a copy of ``run`` (or of torchvision ``weights``) on ``data``; returns the
    TrainSummary of the new run directory."""
    from reslab.train import train

    return train(finetune_config(run, data, **kwargs))
