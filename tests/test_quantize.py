"""INT8 quantization: a small digits run keeps its accuracy, the int8 model runs in ONNX Runtime, CLI works."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from reslab.deploy.quantize import agreement, measure_throughput, onnx_logits, quantize

from conftest import train_quick_digits


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return train_quick_digits(tmp_path_factory.mktemp("quantize") / "run")


def test_quantize_keeps_accuracy(digits_run, tmp_path):
    r = quantize(digits_run, calibration_images=128, out=tmp_path / "q", bench=False)
    acc = r["accuracy"]
    assert acc["count"] == 359  # the whole digits test split
    assert acc["top1_fp32"] >= 0.9, acc  # a trained model, so near-ties do not decide the comparison
    assert acc["top1_drop_points"] <= 1.0, acc  # the bar
    assert acc["top1_agreement"] >= 0.97, acc
    int8 = tmp_path / "q" / "model.int8.onnx"
    graph = onnx.load(str(int8)).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # really quantized (QDQ)
    assert r["size_bytes"]["int8"] < 0.5 * r["size_bytes"]["fp32"]
    report = json.loads((tmp_path / "q" / "quantize.json").read_text())
    assert report["method"]["calibration_images"] == 128 and "environment" in report
    card = json.loads((tmp_path / "q" / "model.json").read_text())
    assert card["format"] == "onnx-int8" and card["classes"] == [str(i) for i in range(10)]
    # The int8 file runs in ONNX Runtime on any batch size.
    h, w = card["preprocessing"]["input_size"]
    logits = onnx_logits(int8, [torch.randn(3, 1, h, w)])
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()


def test_agreement_and_throughput_helpers():
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    same = agreement(ref, ref.clone(), torch.tensor([0, 0]))
    assert same["top1_agreement"] == 1.0 and same["logits_relative_l2"] == 0.0 and same["top1_reference"] == 0.5
    tp = measure_throughput(lambda: None, 8, repeats=3, min_seconds=0.01, warmup=0)
    assert tp["images_per_s"] > 0 and tp["min"] <= tp["images_per_s"] <= tp["max"]


def test_quantize_cli(digits_run, tmp_path, capsys):
    from reslab.cli import main

    code = main(["quantize", str(digits_run), "--calibration-images", "64", "--eval-images", "100",
                 "--repeats", "1", "--out", str(tmp_path / "c")])
    assert code == 0
    out = capsys.readouterr().out
    assert "int8" in out and "images/s" in out
    report = json.loads((tmp_path / "c" / "quantize.json").read_text())
    assert set(report["throughput"]) == {"fp32_eager", "bf16_eager", "fp32_onnxruntime", "int8_onnxruntime"}
    assert main(["quantize", str(digits_run), "--calibration-images", "0"]) == 2
