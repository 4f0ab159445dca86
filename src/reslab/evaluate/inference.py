"""reslab's inference path on a CPU: what ``reslab predict`` and ``reslab serve`` run, and what
``reslab bench infer`` times against eager fp32 and ONNX Runtime (docs/performance.md, "Inference").

The optimisations, in the order they apply:

1. BatchNorm folded into the preceding convolution (inference only: the eval-mode affine map is constant);
2. channels_last (NHWC) memory format, the layout oneDNN's convolutions run natively;
3. bf16 weights and activations on CPUs with native bf16 dot products (AVX512-BF16 / AMX), logits in fp32;
4. TorchScript trace + ``torch.jit.freeze``, which removes the Python overhead per layer (this is what makes
   batch-1 latency fast) and lets oneDNN fuse conv + add + ReLU; or ``torch.compile`` (inductor, with
   freezing) when ``compile=True``.

That is the path in bf16. In fp32 (a CPU without native bf16, or ``--amp off``) the default is the model exported
to ONNX and run by ONNX Runtime (:func:`onnxruntime_runner`), which was the fastest fp32 path on every CPU measured:
1.33x eager for ResNet-20 and 1.86x for ResNet-50 on a 2-core AVX2 AMD EPYC, where the folded TorchScript path
gave 1.13x and 1.24x (docs/performance.md, "Inference"); the TorchScript path remains the fallback without
onnxruntime (``pip install reslab[export]``) or for a model that does not export.

On a GPU the path is the loaded model under autocast (the GPU has no per-layer Python overhead to remove
at useful batch sizes, and cuDNN picks its own layouts).
"""
from __future__ import annotations

import copy
import inspect
import warnings
from typing import Callable

import torch
import torch.nn as nn


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every BatchNorm2d that directly follows a Conv2d folded into it.

    Folding (Ioffe & Szegedy 2015, §3.2: at inference BN is a fixed affine map) is done with torch.fx, so
    any model the tracer reads works; a model it cannot trace is returned unchanged (still correct).
    """
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    # ClassifierNet.forward(x, pre_logits=False): the flag is a Python branch, so trace the logits branch.
    concrete = {"pre_logits": False} if "pre_logits" in inspect.signature(model.forward).parameters else None
    try:
        return fuse(torch.fx.symbolic_trace(model, concrete_args=concrete))
    except Exception:  # not symbolically traceable: BN stays (jit.freeze folds it later)
        return model


def fast_inference_model(model: nn.Module, example: torch.Tensor, *, bf16: bool = True, script: bool = True,
                         compile: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` prepared for CPU inference: a callable from an fp32 NCHW batch to fp32 logits.

    ``bf16``: run weights and activations in bfloat16 (``reslab bench infer`` reports its agreement with fp32).
    ``script``: trace and freeze with TorchScript (removes per-layer Python overhead).
    ``compile``: use ``torch.compile`` (inductor, weight freezing) instead of TorchScript.
    """
    dtype = torch.bfloat16 if bf16 else torch.float32
    net = fold_batchnorm(model).to(memory_format=torch.channels_last).to(dtype)
    example = example.to(dtype).contiguous(memory_format=torch.channels_last)
    if compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # fold weights as constants and pre-pack them for oneDNN
        compiled = torch.compile(net)
        with torch.no_grad():
            compiled(example)
        runner = compiled
    elif script:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            runner = torch.jit.freeze(torch.jit.trace(net, example, check_trace=False))
            runner(example)
            runner(example)  # the profiling executor optimises on the second call
    else:
        runner = net

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return runner(x.to(dtype).contiguous(memory_format=torch.channels_last)).float()

    return run


def onnxruntime_runner(model: nn.Module, example: torch.Tensor,
                       threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` exported to ONNX (batch dimension free; TorchScript-based exporter, about 2 s for ResNet-50 on 2
    cores) and run by ONNX Runtime with all graph optimisations: an fp32 NCHW batch to fp32 logits, equal to
    the model's within 1e-4 (the export parity test). Raises ImportError without onnxruntime."""
    import importlib.util
    import tempfile

    from reslab.deploy.export import export_onnx, onnx_session

    if importlib.util.find_spec("onnxruntime") is None:  # before spending the export on it
        raise ImportError("onnxruntime is not installed (pip install reslab[export])")
    with tempfile.TemporaryDirectory(prefix="reslab-ort-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(copy.deepcopy(model).eval(), example[:1].float().contiguous(), f"{tmp}/model.onnx",
                           dynamic_batch=True)
        session = onnx_session(path, threads=threads or torch.get_num_threads())  # reads the file now
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().float().contiguous().numpy()})[0])

    return run


def inference_runner(model: nn.Module, example: torch.Tensor, *, device: torch.device,
                     amp_dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The callable ``reslab predict`` and ``reslab serve`` run: an input batch (on ``device``) to fp32 logits.

    On a CPU: in bf16 when ``amp_dtype`` is bf16 (``--amp auto`` on a CPU with native bf16),
    :func:`fast_inference_model`; in fp32, :func:`onnxruntime_runner` where onnxruntime is installed and the
    model exports, else :func:`fast_inference_model` in fp32. A model TorchScript cannot trace keeps the folded,
    channels_last eager path. Elsewhere: the model under autocast.
    """
    if device.type == "cpu":
        bf16 = amp_dtype == torch.bfloat16
        if not bf16:
            try:
                return onnxruntime_runner(model, example)
            except ImportError:
                pass  # onnxruntime is optional (reslab[export]): the TorchScript fp32 path below
            except Exception as exc:  # noqa: BLE001 - a model the exporter cannot take: same numbers below
                warnings.warn(f"ONNX export of {type(model).__name__} failed ({exc}); using the TorchScript path")
        try:
            return fast_inference_model(model, example, bf16=bf16)
        except Exception as exc:  # noqa: BLE001 - any tracing failure: same numbers, without the frozen graph
            warnings.warn(f"TorchScript could not trace {type(model).__name__} ({exc}); running it eagerly")
            return fast_inference_model(model, example, bf16=bf16, script=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(x).float()

    return run
