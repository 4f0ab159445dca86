"""Checkpoints that survive crashes and never execute pickled code.

A checkpoint is a folder:
```
model.safetensors   weights (safetensors: plain tensors, no code)
ema.safetensors     EMA weights, when EMA is on
state.pt            optimizer, scaler, RNG and data-order state (loaded with weights_only=True)
manifest.json       format version, architecture, classes, preprocessing, step, and a SHA-256 per file
```
Writing goes to a temporary sibling folder (files fsynced), which then takes the place of ``<name>`` while the
old folder becomes ``<name>.prev``. On Linux the two folders are swapped in one atomic ``renameat2(EXCHANGE)``,
so ``<name>`` exists at every instant; elsewhere two renames leave a brief window in which only ``<name>.prev``
exists, which ``has_checkpoint`` and ``load_checkpoint`` both accept. Loading verifies every checksum and falls
back to ``<name>.prev`` when the current one is missing, truncated or corrupt.

Nothing here executes pickled code: weights are safetensors, ``state.pt`` is read with ``weights_only=True``
and so are torchvision ``.pth`` files (``load_torchvision_weights``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from reslab.train.rundir import fsync_dir

FORMAT_VERSION = 1
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.pt")


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
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
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
        _publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _publish(tmp: Path, path: Path) -> None:
    """Make the complete folder ``tmp`` the checkpoint ``path``; the old one becomes ``path.prev``."""
    prev = path.with_name(path.name + ".prev")
    if path.exists() and _exchange(tmp, path):
        # ``path`` is now the new checkpoint and ``tmp`` holds the old one: keep it as the fallback.
        if prev.exists():
            shutil.rmtree(prev)
        os.replace(tmp, prev)
    else:
        if path.exists():
            if prev.exists():
                shutil.rmtree(prev)
            os.replace(path, prev)
        os.replace(tmp, path)
    fsync_dir(path.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def has_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` (or its ``.prev`` fallback) holds a checkpoint folder to resume from."""
    path = Path(path)
    return any((p / "manifest.json").is_file() for p in (path, path.with_name(path.name + ".prev")))


def _read_verified(folder: Path, load_train_state: bool) -> Checkpoint:
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} is not a reslab checkpoint (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path} is corrupt ({e}); the checkpoint cannot be trusted") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise CheckpointError(f"{manifest_path} is not a reslab checkpoint manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format {version!r} is not supported by this reslab "
                              f"(expects {FORMAT_VERSION}); upgrade reslab or re-export the weights")
    blobs = {}
    for name, digest in manifest.get("files", {}).items():
        if name not in CHECKPOINT_FILES:
            raise CheckpointError(f"{manifest_path} lists an unexpected file {name!r}; the checkpoint cannot be trusted")
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
        try:
            train_state = torch.load(io.BytesIO(blobs["state.pt"]), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise CheckpointError(f"{folder / 'state.pt'} cannot be read safely (it holds more than tensors and "
                                  f"plain values: {_first_line(e)}); it was not written by reslab") from None
    return Checkpoint(folder, manifest, _read_safetensors(folder / "model.safetensors", blobs["model.safetensors"]),
                      _read_safetensors(folder / "ema.safetensors", blobs["ema.safetensors"])
                      if "ema.safetensors" in blobs else None, train_state)


def _read_safetensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_checkpoint(path: str | Path, *, load_train_state: bool = True, fallback: bool = True) -> Checkpoint:
    """Read and verify a checkpoint folder; on corruption fall back to ``<path>.prev`` with a warning."""
    path = Path(path)
    try:
        return _read_verified(path, load_train_state)
    except CheckpointError as first:
        prev = path.with_name(path.name + ".prev")
        if fallback and prev.is_dir():
            if path.exists():  # a missing current folder is the normal instant between two renames
                warnings.warn(f"{first}; falling back to the previous checkpoint {prev}", stacklevel=2)
            try:
                return _read_verified(prev, load_train_state)
            except CheckpointError as second:
                raise CheckpointError(f"{first}; the previous checkpoint is unusable too ({second}); "
                                      "start a new run (another --out)") from None
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist") from None
        raise


def checkpoint_run_dir(checkpoint: Path) -> Path:
    """The run directory a checkpoint folder (``RUN/checkpoints/NAME``) belongs to; a standalone checkpoint
    folder is its own."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


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
    hint = "is it a reslab run directory?"
    from reslab.deploy.artifact import artifact_card

    if artifact_card(p) is not None:  # `eval`, `predict`, `serve`, `analyze`, ... run such folders themselves
        hint = ("it is an exported or quantized model file: this command needs float weights, so give the training "
                "run it came from (model.json: source_checkpoint)")
    raise CheckpointError(f"{p} holds no checkpoint (expected {p}/checkpoints/best or last); {hint}")


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


# ----------------------------------------------------------------------------------------------------------
# torchvision weights (for fine-tuning)


def load_torchvision_weights(path: str | Path, model: torch.nn.Module, *, classifier: str = "fc") -> dict[str, list[str]]:
    """Load a torchvision ResNet ``.pth`` state_dict into a reslab model, never unpickling code.

    The file is read with ``torch.load(weights_only=True)``; ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers
    and DDP's ``module.`` prefix are accepted. reslab's ImageNet ResNets use torchvision's parameter names
    (He et al. 2016, Table 1), so every tensor must fit, except the classifier (``classifier`` prefix), which is
    left freshly initialised when its shape differs (fine-tuning to another number of classes).

    Returns ``{"loaded": [...], "skipped": [...]}``; raises ``CheckpointError`` naming the file and the
    mismatching tensors when the weights belong to another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a PyTorch weights file that can be read safely "
                              f"(weights_only=True: {_first_line(e)})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    head = classifier + "."
    missing = sorted(k for k in own if k not in state and not k.startswith(head))
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k].shape and not k.startswith(head))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise CheckpointError(f"{path}: the weights do not fit {type(model).__name__} ({'; '.join(parts)}); "
                              "is it the same architecture and number of input channels?")
    skipped = sorted(k for k in own if k.startswith(head) and (k not in state or state[k].shape != own[k].shape))
    loaded = {k: v for k, v in state.items() if k not in skipped}
    model.load_state_dict({**own, **loaded})
    return {"loaded": sorted(loaded), "skipped": skipped}
