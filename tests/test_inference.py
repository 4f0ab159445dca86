"""reslab's inference path (reslab.evaluate.inference), the one `reslab predict` and `reslab serve` run."""
from __future__ import annotations

import torch
import torch.nn as nn

from reslab.evaluate.inference import fold_batchnorm, inference_runner
from reslab.models import create_model


def _model_with_statistics(name: str = "resnet20") -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding has something to fold
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model


def test_folding_removes_every_batchnorm_and_keeps_the_function():
    model = _model_with_statistics()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_cpu_runner_fp32_matches_eager_at_any_batch_size():
    model = _model_with_statistics()
    run = inference_runner(model, torch.randn(1, 3, 32, 32), device=torch.device("cpu"), amp_dtype=None)
    for batch in (1, 7, 32):  # traced at batch 1, used at others (the server's micro-batches vary)
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            ref = model(x)
        got = run(x)
        assert got.dtype == torch.float32 and got.shape == (batch, 10)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_cpu_runner_fp32_is_onnxruntime_with_a_torchscript_fallback(monkeypatch):
    """fp32 on a CPU runs through ONNX Runtime (the fastest fp32 path measured); without onnxruntime, or for a
    model that does not export, the folded TorchScript path gives the same logits."""
    import builtins
    import sys

    import reslab.evaluate.inference as inference

    model = _model_with_statistics()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    calls = []
    real_ort = inference.onnxruntime_runner
    monkeypatch.setattr(inference, "onnxruntime_runner", lambda *a, **k: calls.append(1) or real_ort(*a, **k))
    torch.testing.assert_close(inference_runner(model, x, device=torch.device("cpu"), amp_dtype=None)(x), ref,
                               atol=1e-4, rtol=1e-4)
    assert calls == [1]

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name.startswith("onnxruntime"):
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    fallback = inference_runner(model, x, device=torch.device("cpu"), amp_dtype=None)
    assert calls == [1, 1]  # tried, then fell back
    torch.testing.assert_close(fallback(x), ref, atol=1e-4, rtol=1e-4)


def test_cpu_runner_in_bf16_when_amp_asks_for_it():
    model = _model_with_statistics()
    x = torch.randn(16, 3, 32, 32)
    run = inference_runner(model, x, device=torch.device("cpu"), amp_dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    got = run(x)
    assert got.dtype == torch.float32
    diff = (got - ref).abs().max().item()
    assert 0 < diff < 0.1 * ref.abs().max().item() + 0.05  # bf16 rounding: close to fp32, not identical


class _DataDependent(nn.Module):
    """A forward with Python control flow on tensor values: TorchScript's tracer cannot freeze it faithfully."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if bool(y.mean() > 1e9):  # never true; tracing warns and bakes in one branch
            return y.sum((2, 3)) * 0
        return y.mean((2, 3))


def test_runner_output_equals_the_model_for_a_branchy_forward():
    model = _DataDependent().eval()
    x = torch.randn(3, 3, 8, 8)
    run = inference_runner(model, x, device=torch.device("cpu"), amp_dtype=None)
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x), atol=1e-5, rtol=1e-5)
