"""Exported and quantized model folders as models ``reslab eval``, ``predict``, ``serve``, ``analyze``,
``calibrate``, ``robustness`` and ``report`` can run.

``reslab export`` and ``reslab quantize`` write a folder with the model file and ``model.json``, the card:
classes, preprocessing, and ``format`` + ``file`` naming what to load. :func:`load_artifact` turns such a
folder into a module from a normalised fp32 NCHW batch to fp32 logits, run by the runtime the file was made
for (ONNX Runtime for ``onnx``/``onnx-int8``, PyTorch's quantized engine for ``torchscript-int8``), so the
deployed file itself is what gets evaluated and served, not the float checkpoint it came from.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

FORMATS = ("onnx", "onnx-int8", "torchscript", "torchscript-int8")


def artifact_card(path: str | Path) -> dict[str, Any] | None:
    """The card of an exported or quantized model folder, or None when ``path`` is not one (a run directory,
    a checkpoint folder, anything else). A run directory's own ``model.json`` has no ``format``."""
    card_path = Path(path) / "model.json"
    if not card_path.is_file():
        return None
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return card if isinstance(card, dict) and "format" in card and "file" in card else None


class DeployedModel(nn.Module):
    """An exported or quantized model file behind the ``nn.Module`` call interface (inference only).

    ``runtime`` names what runs it; ``card`` is the folder's ``model.json``. A file exported with a fixed batch
    of 1 (``reslab export`` without ``--dynamic-batch``) is run one image at a time.
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], card: dict[str, Any], runtime: str,
                 path: Path):
        super().__init__()
        self._run, self.card, self.runtime, self.path = run, card, runtime, path
        self.fixed_batch = card.get("dynamic_batch") is False
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().contiguous()
        if self.fixed_batch and x.shape[0] != 1:
            return torch.cat([self._run(x[i:i + 1]) for i in range(x.shape[0])])
        return self._run(x)


def load_artifact(path: str | Path, *, threads: int | None = None) -> tuple[DeployedModel, dict[str, Any]]:
    """Load the model file of an exported or quantized folder ``path``; returns ``(module, card)``."""
    path = Path(path)
    card = artifact_card(path)
    if card is None:
        raise ValueError(f"{path} is not an exported or quantized model folder (no model.json with 'format' "
                         "and 'file'; `reslab export` and `reslab quantize` write them)")
    fmt, file = card["format"], path / str(card["file"])
    if Path(str(card["file"])).name != str(card["file"]):  # the card describes files beside it, nothing elsewhere
        raise ValueError(f"{path / 'model.json'}: file {card['file']!r} must be a file name in that folder")
    if fmt not in FORMATS:
        raise ValueError(f"{path / 'model.json'}: format {fmt!r} is not one this reslab runs "
                         f"({', '.join(FORMATS)})")
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: {path / 'model.json'} names it as the {fmt} model file")
    if fmt.startswith("onnx"):
        import importlib.util

        from reslab.deploy.export import onnx_session

        if importlib.util.find_spec("onnxruntime") is None:
            raise ValueError(f"{file} is an ONNX model: running it needs onnxruntime; install with: "
                             "pip install 'reslab[export]'")
        session = onnx_session(file, threads=threads or torch.get_num_threads())
        name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

        return DeployedModel(run, card, "onnxruntime", file), card
    if fmt == "torchscript-int8":
        from reslab.deploy.quantize_torch import load_torch_int8, torch_int8_logits

        module = load_torch_int8(file)
        return DeployedModel(lambda x: torch_int8_logits(module, [x]), card,
                             f"pytorch int8 ({module.quantized_engine})", file), card
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(str(file)).eval()

    def run_script(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    return DeployedModel(run_script, card, "torchscript", file), card


def training_run_dir(path: str | Path) -> Path | None:
    """The training run whose config and calibration apply to ``path``: a run directory (or checkpoint folder)
    itself, or the run a deployed folder's ``source_checkpoint`` names (None when that is not on this machine)."""
    from reslab.train.checkpoint import checkpoint_run_dir, find_checkpoint

    card = artifact_card(path)
    if card is None:
        return checkpoint_run_dir(find_checkpoint(path))
    source = card.get("source_checkpoint")
    return checkpoint_run_dir(Path(source)) if source and Path(source).is_dir() else None


@dataclass
class LoadedModel:
    """What ``reslab eval``, ``predict``, ``serve``, ``analyze``, ``calibrate`` and ``robustness`` run: a trained
    run's float model, or a deployed file."""

    model: nn.Module  # in eval mode
    card: dict[str, Any]  # classes, preprocessing, metrics (+ format, file for a deployed file)
    source: Path  # the checkpoint folder or the model file loaded
    run_dir: Path | None  # the training run whose config and calibration apply (None: not on this machine)
    deployed: bool  # an exported or quantized file (CPU only, no gradients)
    device: torch.device  # where its inputs go


def load_for_inference(run: str | Path, *, device: str | torch.device = "auto") -> LoadedModel:
    """A run directory or checkpoint folder (its best weights, on ``device``), or an exported or quantized
    model folder (:func:`load_artifact`; it runs on the CPU whatever ``device`` says)."""
    from reslab.train.checkpoint import find_checkpoint, load_model
    from reslab.train.engine import select_device

    if artifact_card(run) is None:
        requested = select_device(str(device))
        model, card = load_model(run, device=requested)
        return LoadedModel(model, card, find_checkpoint(run), training_run_dir(run), False, requested)
    module, card = load_artifact(run)
    return LoadedModel(module, card, module.path, training_run_dir(run), True, torch.device("cpu"))
