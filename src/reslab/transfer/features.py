"""Embeddings of a trained network for a data set of one's own: the pooled output of any stage.

"CNN Features off-the-shelf" (Razavian et al. 2014, §2) takes a network trained on one task and reads the
activations of a late layer as a generic image descriptor. Here every stage named in ``model.stage_info`` can be
read, global-average-pooled to one vector per image; the default, ``pre_logits``, is the pooled final feature map
(``forward_head(pre_logits=True)``), the input of the classifier.

The data is decoded and normalised the way the *model* expects (its stored size, channels, mean and std from the
checkpoint manifest), but keeps its own classes: a probe or kNN on new classes needs nothing from the old head.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

PRE_LOGITS = "pre_logits"  # the default layer: the pooled input of the classifier


def layer_names(model: nn.Module) -> list[str]:
    """Readable layers of ``model``: its stages (``stage_info``) and ``pre_logits``."""
    return [info.name for info in model.stage_info] + [PRE_LOGITS]


def load_data_as_model(card: dict, data: str | None, *, val_fraction: float = 0.0, seed: int = 0):
    """``data`` (default: the model's own data) decoded to the model's stored size and channels, own classes kept."""
    from reslab.data import load_data

    prep = card["preprocessing"]
    h, w = prep["stored_size"]
    return load_data(data or card["data"], image_size=h if h == w else None, channels=prep["channels"],
                     val_fraction=val_fraction, seed=seed, progress=False)


def model_batches(card: dict, images, *, device, batch_size: int = 256):
    """Batches of ``images`` normalised with the model's own statistics (not the new data's)."""
    from reslab.evaluate.evaluate import model_loader

    return model_loader(card, images, device=device, batch_size=batch_size)


@torch.no_grad()
def extract_features(model: nn.Module, loader, *, layer: str = PRE_LOGITS) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (N, C) of ``layer`` and labels (N,) for every batch of ``loader`` (model in eval mode).

    Stage outputs are caught with a forward hook, so a stage can be read without editing the model's forward.
    """
    names = layer_names(model)
    if layer not in names:
        raise ValueError(f"--layer {layer!r} is not a layer of {type(model).__name__}; choose one of {', '.join(names)}")
    model.eval()
    caught: list[torch.Tensor] = []
    hook = None
    if layer != PRE_LOGITS:
        hook = model.get_submodule(layer).register_forward_hook(lambda mod, inp, out: caught.append(out))
    feats, labels = [], []
    try:
        for x, y in loader:
            if layer == PRE_LOGITS:
                f = model.forward_head(model.forward_features(x), pre_logits=True)
            else:
                caught.clear()
                model.forward_features(x)
                f = model.pool(caught[-1])
            feats.append(f.float().cpu())
            labels.append(y.cpu())
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def split_features(model, card, images, *, layer: str = PRE_LOGITS, device="cpu", batch_size: int = 256):
    """Features and labels of one ``ImageArray``."""
    return extract_features(model, model_batches(card, images, device=device, batch_size=batch_size), layer=layer)


def save_features(path: str | Path, features: np.ndarray, labels: np.ndarray, meta: dict[str, Any]) -> list[str]:
    """Write features by extension: ``.npy`` (+ ``<name>.json`` sidecar with labels, files, classes) or
    ``.safetensors`` (tensors ``features`` and ``labels``; files, classes, layer as JSON strings in its metadata).
    Returns the paths written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, features.astype(np.float32))
        sidecar = path.with_suffix(".json")
        sidecar.write_text(json.dumps({**meta, "labels": labels.tolist()}, indent=1))
        return [str(path), str(sidecar)]
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"features": np.ascontiguousarray(features, dtype=np.float32),
                   "labels": np.ascontiguousarray(labels, dtype=np.int64)}, str(path),
                  metadata={k: json.dumps(v) for k, v in meta.items()})
        return [str(path)]
    raise ValueError(f"--out {path}: unknown extension {path.suffix!r}; use .npy or .safetensors")


def load_features(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read back what ``save_features`` wrote: (features, labels, metadata)."""
    path = Path(path)
    if path.suffix == ".npy":
        meta = json.loads(path.with_suffix(".json").read_text())
        return np.load(path), np.asarray(meta.pop("labels"), dtype=np.int64), meta
    from safetensors import safe_open
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="numpy") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return tensors["features"], tensors["labels"], meta


def features(run: str | Path, data: str | None, *, out: str | Path, layer: str = PRE_LOGITS, split: str = "train",
             device: str = "auto", batch_size: int = 256) -> dict[str, Any]:
    """``reslab features``: embeddings of one split of ``data`` by a trained run, saved to ``out``."""
    from reslab.train.checkpoint import find_checkpoint, load_model
    from reslab.train.engine import select_device

    dev = select_device(device)
    model, card = load_model(run, device=dev)
    splits = load_data_as_model(card, data)
    images = {"train": splits.train, "test": splits.test}.get(split)
    if images is None:
        raise ValueError(f"--split {split}: choose train or test")
    feats, labels = split_features(model, card, images, layer=layer, device=dev, batch_size=batch_size)
    files = images.files if images.files is not None else [f"{split}/{i:06d}" for i in range(len(labels))]
    meta = {"run": str(find_checkpoint(run)), "model": card["model"], "layer": layer, "split": split,
            "data": data or card["data"], "classes": list(splits.classes), "files": list(files)}
    written = save_features(out, feats, labels, meta)
    return {"count": int(len(labels)), "dim": int(feats.shape[1]), "layer": layer, "written": written}
