"""INT8 with PyTorch's own kernels: FX graph-mode static quantization, frozen to a TorchScript file.

The second runtime of ``reslab quantize`` (``--runtime pytorch``). Same scheme as the ONNX Runtime path
(:mod:`reslab.deploy.quantize`): int8 symmetric per-channel weights of the BN-folded convs, uint8 asymmetric
per-tensor activations with min/max ranges from calibration images (Jacob et al. 2018, §3), but run by
one of PyTorch's quantized engines (oneDNN/FBGEMM, which use AVX-512 VNNI or AMX-INT8 where the CPU has
them). Conv+ReLU and the residual add+ReLU are fused into single quantized ops, and ``torch.jit.freeze``
removes the per-layer Python dispatch, which is what small networks such as the CIFAR ResNet-20 are bound by.

Which engine: ``x86`` (FBGEMM and oneDNN kernels, picked per op) where the CPU has VNNI or AMX-INT8, ``onednn``
elsewhere (:func:`default_engine`). On a 2-core AVX2 AMD EPYC (no VNNI; 2026-12-05, trained resnet20, 7-bit
activations) oneDNN ran 1.56x faster than ``x86`` at each one's fastest batch (3,525 vs 2,266 images/s) with
the same top-1 (81.26 / 81.27 % against fp32's 81.47 % on the 10,000 test images; docs/deploy.md). The packed
weights belong to the engine they were made for, so the file records it (an extra file in the archive) and
:func:`load_torch_int8` and :func:`torch_int8_logits` switch to it.

Why FX graph mode and not PT2E: in torch 2.14 the PT2E ``X86InductorQuantizer`` lives in the separate
``torchao`` package, which (0.18) fails to annotate residual blocks ("Input partition has more than one
output node", docs/deploy.md), and its speed comes from Inductor compilation. FX graph mode ships with
torch, needs no compiler, and its result is one ``.pt`` file that ``torch.jit.load`` reads without reslab.
The input stays float32 NCHW (the card's contract); the file quantizes it and switches to channels_last
(NHWC, the layout the int8 convolutions run natively) itself.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

ENGINES = ("x86", "onednn")
_ENGINE_FILE = "quantized_engine"  # the extra file of the TorchScript archive that names the engine


def default_engine() -> str:
    """PyTorch's quantized engine for this CPU: ``x86`` with VNNI or AMX-INT8, ``onednn`` without (module
    docstring)."""
    from reslab.deploy.quantize import cpu_has_vnni

    return "x86" if cpu_has_vnni() else "onednn"


def _use_engine(engine: str) -> None:
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(f"quantized engine {engine!r} is not available in this PyTorch build "
                         f"(supported: {', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = engine


class _Logits(nn.Module):
    """``model(x)`` with the input moved to channels_last: a plain forward FX can trace (reslab models take
    keyword options such as ``pre_logits`` that symbolic tracing cannot branch on)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def _qconfig_mapping(reduce_range: bool):
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping

    activation = MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                                          reduce_range=reduce_range)
    weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


def quantize_torch(model: nn.Module, calibration: Iterable[torch.Tensor], *,
                   reduce_range: bool = False, engine: str | None = None) -> torch.jit.ScriptModule:
    """Static int8 ``model`` for PyTorch's quantized ``engine`` (default: :func:`default_engine`), calibrated
    on ``calibration`` (normalised float32 NCHW batches), traced and frozen; its ``quantized_engine``
    attribute names the engine. ``reduce_range``: 7-bit activations, which keep the 16-bit accumulation of
    CPUs without VNNI from saturating (both engines: 86-91 % top-1 agreement with fp32 without it on AVX2,
    96 % with it)."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    calibration = list(calibration)
    if not calibration:
        raise ValueError("PyTorch int8 quantization needs at least one calibration batch")
    engine = engine or default_engine()
    _use_engine(engine)
    net = _Logits(copy.deepcopy(model).cpu().float().eval()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX graph mode's deprecation notice
        try:
            prepared = prepare_fx(net, _qconfig_mapping(reduce_range), (calibration[0][:1],))
        except Exception as e:  # control flow on tensors, unsupported ops
            raise ValueError(f"{type(model).__name__} cannot be traced for PyTorch int8 quantization ({e}); "
                             f"use --runtime onnxruntime") from e
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        quantized = convert_fx(prepared)
        with torch.inference_mode():
            module = torch.jit.freeze(torch.jit.trace(quantized, calibration[0], check_trace=False).eval())
    module.quantized_engine = engine
    return module


def save_torch_int8(module: torch.jit.ScriptModule, path: str | Path) -> Path:
    """Write the frozen int8 module atomically (a crash never leaves a half-written ``.pt``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice; the format stays readable
        torch.jit.save(module, str(tmp), _extra_files={_ENGINE_FILE: module.quantized_engine})
    tmp.replace(path)
    return path


def load_torch_int8(path: str | Path) -> torch.jit.ScriptModule:
    """Read a file written by :func:`save_torch_int8`, with the quantized engine it was made for (files
    written before the engine was recorded were all made for ``x86``). The engine is set before the module
    is read, because loading re-packs the int8 weights for the engine in use."""
    import zipfile

    with zipfile.ZipFile(path) as archive:  # a TorchScript file is a zip archive: <name>/extra/<extra file>
        names = [n for n in archive.namelist() if n.endswith(f"/extra/{_ENGINE_FILE}")]
        engine = archive.read(names[0]).decode() if names else "x86"
    _use_engine(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path)).eval()
    module.quantized_engine = engine
    return module


def torch_int8_logits(module: torch.jit.ScriptModule, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """fp32 logits of the int8 ``module`` on ``batches``, run by the engine it was made for."""
    _use_engine(getattr(module, "quantized_engine", "x86"))
    with torch.inference_mode():
        return torch.cat([module(x.float()) for x in batches])
