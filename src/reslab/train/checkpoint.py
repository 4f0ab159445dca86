"""Checkpoints that survive crashes and never execute pickled code.

A checkpoint is a folder:
```
model.safetensors   weights (safetensors: plain tensors, no code)
ema.safetensors     EMA weights, when EMA is on
state.pt            optimizer, scaler, RNG and data-order state (loaded with weights_only=True)
manifest.json       format version, architecture, classes, preprocessing, step, and a SHA-256 per file
```
Writing goes to a temporary sibling folder (files fsynced), then the old folder is moved to ``<name>.prev``
and the new one renamed into place; loading verifies every checksum and falls back to ``<name>.prev``
when the current one is missing, truncated or corrupt.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from reslab.train.rundir import fsync_dir

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible; the message names the file and what to do."""


@dataclass
class Checkpoint:
    path: Path
    manifest: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    train_state: dict[str, Any] | None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_file(folder: Path, name: str, data: bytes) -> str:
    with open(folder / name, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return _sha256(data)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors needs contiguous, unshared tensors on the CPU.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(path: str | Path, *, model_state: dict[str, torch.Tensor], manifest: dict[str, Any],
                    ema_state: dict[str, torch.Tensor] | None = None,
                    train_state: dict[str, Any] | None = None) -> Path:
    """Atomically write a checkpoint folder at ``path`` (keeping the previous one as ``<path>.prev``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        files = {"model.safetensors": _write_file(tmp, "model.safetensors", st_save(_contiguous(model_state)))}
        if ema_state is not None:
            files["ema.safetensors"] = _write_file(tmp, "ema.safetensors", st_save(_contiguous(ema_state)))
        if train_state is not None:
            buf = io.BytesIO()
            torch.save(train_state, buf)
            files["state.pt"] = _write_file(tmp, "state.pt", buf.getvalue())
        full = {"format_version": FORMAT_VERSION, **manifest, "files": files}
        _write_file(tmp, "manifest.json", json.dumps(full, indent=2, default=str).encode())
        fsync_dir(tmp)
        prev = path.with_name(path.name + ".prev")
        if path.exists():
            if prev.exists():
                shutil.rmtree(prev)
            os.replace(path, prev)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _read_verified(folder: Path, load_train_state: bool) -> Checkpoint:
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} is not a reslab checkpoint (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path} is corrupt ({e}); the checkpoint cannot be trusted") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format {version!r} is not supported by this reslab "
                              f"(expects {FORMAT_VERSION}); upgrade reslab or re-export the weights")
    blobs = {}
    for name, digest in manifest.get("files", {}).items():
        if name == "state.pt" and not load_train_state:
            continue
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; the checkpoint is incomplete")
        data = f.read_bytes()
        if _sha256(data) != digest:
            raise CheckpointError(f"{f} is corrupt or truncated (checksum mismatch)")
        blobs[name] = data
    if "model.safetensors" not in blobs:
        raise CheckpointError(f"{folder}: manifest lists no model.safetensors")
    train_state = None
    if "state.pt" in blobs:
        train_state = torch.load(io.BytesIO(blobs["state.pt"]), map_location="cpu", weights_only=True)
    return Checkpoint(folder, manifest, st_load(blobs["model.safetensors"]),
                      st_load(blobs["ema.safetensors"]) if "ema.safetensors" in blobs else None, train_state)


def load_checkpoint(path: str | Path, *, load_train_state: bool = True, fallback: bool = True) -> Checkpoint:
    """Read and verify a checkpoint folder; on corruption fall back to ``<path>.prev`` with a warning."""
    path = Path(path)
    try:
        return _read_verified(path, load_train_state)
    except CheckpointError as first:
        prev = path.with_name(path.name + ".prev")
        if fallback and prev.is_dir():
            warnings.warn(f"{first}; falling back to the previous checkpoint {prev}", stacklevel=2)
            return _read_verified(prev, load_train_state)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist") from None
        raise


def find_checkpoint(run_or_checkpoint: str | Path, prefer: str = "best") -> Path:
    """Resolve a run directory or a checkpoint folder to a checkpoint folder (``best`` first, then ``last``)."""
    p = Path(run_or_checkpoint)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: give a run directory (runs/...) or a checkpoint folder")
    if p.is_file():
        if p.name == "manifest.json" or p.suffix == ".safetensors":
            return p.parent
        raise CheckpointError(f"{p} is a file, not a reslab run or checkpoint folder "
                              "(for torchvision .pth weights use `reslab finetune --weights`)")
    if (p / "manifest.json").is_file() or (p.with_name(p.name + ".prev") / "manifest.json").is_file():
        return p
    order = [prefer, "last" if prefer == "best" else "best"]
    for name in order:
        for candidate in (p / "checkpoints" / name, p / "checkpoints" / f"{name}.prev"):
            if (candidate / "manifest.json").is_file():
                return p / "checkpoints" / name
    raise CheckpointError(f"{p} holds no checkpoint (expected {p}/checkpoints/best or last); "
                          "is it a reslab run directory?")


def load_model(run_or_checkpoint: str | Path, *, device: str | torch.device = "cpu", prefer: str = "best",
               use_ema: bool = True):
    """Rebuild the model a run or checkpoint describes and load its weights (EMA weights when present).

    Returns ``(model in eval mode, manifest)``; the manifest carries classes and preprocessing.
    """
    from reslab.models import create_model

    path = find_checkpoint(run_or_checkpoint, prefer=prefer)
    ckpt = load_checkpoint(path, load_train_state=False)
    m = ckpt.manifest
    try:
        model = create_model(m["model"], num_classes=m["num_classes"], in_chans=m["in_chans"],
                             **m.get("model_kwargs", {}))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}/manifest.json does not describe a model this reslab can build: {e}") from None
    state = ckpt.ema_state if use_ema and ckpt.ema_state is not None else ckpt.model_state
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit {m['model']} with {m['num_classes']} classes "
                              f"({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), m
