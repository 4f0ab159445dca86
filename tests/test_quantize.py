"""INT8 quantization: a small digits run keeps its accuracy, the int8 model runs in ONNX Runtime, CLI works."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from reslab.deploy.quantize import agreement, best_throughput, measure_throughput, onnx_logits, quantize

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
    # Each path at its own fastest batch: fp32 peaks at 64, int8 at 256.
    by_batch = {b: {"fp32_eager": {"images_per_s": f}, "int8_onnxruntime": {"images_per_s": q}}
                for b, f, q in [(16, 900.0, 1000.0), (64, 1000.0, 3000.0), (256, 500.0, 4500.0)]}
    best = best_throughput(by_batch)
    assert best["paths"]["fp32_eager"] == {"images_per_s": 1000.0, "batch_size": 64}
    assert best["paths"]["int8_onnxruntime"]["batch_size"] == 256
    assert best["speedup_vs_fp32_eager"]["int8_onnxruntime"] == 4.5


def test_quantize_cli(digits_run, tmp_path, capsys):
    from reslab.cli import main

    code = main(["quantize", str(digits_run), "--calibration-images", "64", "--eval-images", "100",
                 "--repeats", "1", "--batch-sweep", "8,200", "--out", str(tmp_path / "c")])
    assert code == 0
    out = capsys.readouterr().out
    assert "int8" in out and "images/s" in out and "fastest batch" in out
    report = json.loads((tmp_path / "c" / "quantize.json").read_text())
    from reslab.train.engine import cpu_has_fast_bf16

    # bf16 autocast is timed only where the CPU runs it natively (elsewhere it is emulated, slower than fp32)
    paths = {"fp32_eager", "fp32_onnxruntime", "int8_onnxruntime"} | ({"bf16_eager"} if cpu_has_fast_bf16() else set())
    assert set(report["throughput"]) == paths
    # The sweep: the default batch of 64 plus the two asked for (200 > the 100 test images: repeated).
    assert list(report["throughput_by_batch"]) == ["8", "64", "200"]
    assert all(set(v) == paths and v["int8_onnxruntime"]["batch_size"] == int(b)
               for b, v in report["throughput_by_batch"].items())
    assert report["best_throughput"]["paths"]["fp32_eager"]["batch_size"] in (8, 64, 200)
    # The int8 ceiling: this CPU's int8 matmul rate over the FLOP/s fp32 eager reached at its fastest batch.
    ceiling = report["int8_ceiling"]
    from reslab.deploy.artifact import load_for_inference
    from reslab.models.complexity import count_macs

    card = json.loads((tmp_path / "c" / "model.json").read_text())
    h, w = card["preprocessing"]["input_size"]
    macs = count_macs(load_for_inference(digits_run, device="cpu").model, (card["in_chans"], h, w))
    eager = report["best_throughput"]["paths"]["fp32_eager"]["images_per_s"]
    assert ceiling["macs"] == macs and ceiling["fp32_eager_flops"] == pytest.approx(2 * macs * eager)
    assert ceiling["int8_peak_ops"] == max(ceiling["int8_peak_per_engine"].values()) > 0
    assert ceiling["max_speedup_vs_fp32_eager"] == pytest.approx(ceiling["int8_peak_ops"] / (2 * macs * eager))
    assert ceiling["int8_over_fp32_peak"] == pytest.approx(ceiling["int8_peak_ops"] / ceiling["fp32_peak_flops"])
    assert "int8 ceiling:" in out
    assert main(["quantize", str(digits_run), "--calibration-images", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["quantize", str(digits_run), "--batch-sweep", "16,zero"])


def test_bias_correction_removes_the_mean_shift(digits_run, tmp_path):
    """Empirical bias correction (Nagel et al. 2019, sec. 4.2): after it, the first conv's per-channel output mean in
    the int8 model matches fp32 on the calibration images (up to the int32 bias step), and the report says so."""
    import numpy as np
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from reslab.deploy.quantize import _channel_means, bias_correct_onnx

    r = quantize(digits_run, calibration_images=64, eval_images=100, out=tmp_path / "q", bench=False)
    assert r["method"]["bias_correction"] is False
    int8, fp32 = tmp_path / "q" / "model.int8.onnx", tmp_path / "q" / "model.fp32.onnx"
    prep = tmp_path / "prep.onnx"
    quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
    card = json.loads((tmp_path / "q" / "model.json").read_text())
    h, w = card["preprocessing"]["input_size"]
    batches = [torch.randn(8, 1, h, w) for _ in range(2)]
    fp, q = onnx.load(str(prep)), onnx.load(str(int8))
    first = next(n for n in q.graph.node if n.op_type == "Conv")
    ref_name = next(n.output[0] for n in fp.graph.node if n.name == first.name)
    feeds = [b.numpy() for b in batches]
    before = np.abs(_channel_means(q, [first.output[0]], feeds, "input")[0] -
                    _channel_means(fp, [ref_name], feeds, "input")[0]).max()
    info = bias_correct_onnx(prep, int8, batches)
    assert info["convs_corrected"] >= 1 and info["images"] == 16
    q = onnx.load(str(int8))
    after = np.abs(_channel_means(q, [first.output[0]], feeds, "input")[0] -
                   _channel_means(fp, [ref_name], feeds, "input")[0]).max()
    assert after <= before + 1e-6 and after < 1e-3, (before, after)
    assert torch.isfinite(onnx_logits(int8, [torch.randn(2, 1, h, w)])).all()


def test_quantize_with_bias_correction_reports_it(digits_run, tmp_path):
    from reslab.cli import main

    code = main(["quantize", str(digits_run), "--calibration-images", "64", "--eval-images", "100", "--no-bench",
                 "--bias-correction", "--bias-correction-images", "32", "--out", str(tmp_path / "c")])
    assert code == 0
    report = json.loads((tmp_path / "c" / "quantize.json").read_text())
    bc = report["method"]["bias_correction"]
    assert bc["images"] == 32 and bc["convs_corrected"] > 0
    assert report["accuracy"]["top1_drop_points"] <= 2.0, report["accuracy"]
    assert not (tmp_path / "c" / "model.fp32.prep.onnx").exists()


# ---------------------------------------------------------------------------------------------------------
# Quantization-aware fine-tuning (reslab.deploy.qat)


def test_weight_fake_quant_is_per_channel_symmetric_int8_with_straight_through_gradient():
    from reslab.deploy.qat import fake_quant_weight

    torch.manual_seed(0)
    w = (torch.randn(8, 4, 3, 3) * torch.logspace(-3, 1, 8).view(-1, 1, 1, 1)).requires_grad_()
    q = fake_quant_weight(w)
    scale = w.detach().abs().flatten(1).amax(1).view(-1, 1, 1, 1) / 127
    expected = torch.clamp(torch.round(w.detach() / scale), -127, 127) * scale
    torch.testing.assert_close(q.detach(), expected, rtol=0, atol=0)
    assert ((q.detach() / scale).round().abs() <= 127).all()
    assert len(torch.unique((q.detach()[0] / scale[0]).round())) > 20  # really 8-bit levels
    q.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w))  # straight-through


@pytest.mark.parametrize("reduce_range", [False, True])
def test_reduce_range_gives_7_bit_weights(digits_run, tmp_path, reduce_range):
    """--reduce-range quantizes the weights to [-64, 64] (ONNX Runtime's reduce_range), else to [-127, 127]; the
    report and the card record which."""
    import numpy as np
    from onnx import numpy_helper

    from reslab.cli import main

    flag = "--reduce-range" if reduce_range else "--no-reduce-range"
    assert main(["quantize", str(digits_run), "--calibration-images", "64", "--eval-images", "100", "--no-bench",
                 flag, "--out", str(tmp_path / "q")]) == 0
    graph = onnx.load(str(tmp_path / "q" / "model.int8.onnx")).graph
    weights = [numpy_helper.to_array(i) for i in graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and i.dims and len(i.dims) >= 2]
    assert len(weights) >= 20  # every conv and the fc
    peak = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert peak == (64 if reduce_range else 127)  # per-channel scales: each channel's largest weight hits the edge
    report = json.loads((tmp_path / "q" / "quantize.json").read_text())
    assert report["method"]["reduce_range"] is reduce_range
    from reslab.deploy.quantize import cpu_has_vnni

    if reduce_range or cpu_has_vnni():  # full-range weights saturate the kernels of CPUs without VNNI (measured
        assert report["accuracy"]["top1_agreement"] >= 0.95  # 0.90 on an AVX2 EPYC): why reduce_range is the default


def test_cpu_without_vnni_gets_reduce_range(monkeypatch):
    import importlib

    from reslab.deploy.quantize import cpu_has_vnni, default_reduce_range

    engine = importlib.import_module("reslab.train.engine")  # (reslab.train is also the train() function)

    for flags, vnni in [({"sse4_2", "avx2", "fma"}, False), ({"avx2", "avx512f", "avx512_vnni"}, True),
                        ({"avx2", "avx_vnni"}, True), ({"avx2", "amx_int8"}, True), ({"asimd", "asimddp"}, True)]:
        monkeypatch.setattr(engine, "cpu_flags", lambda flags=flags: flags)
        assert cpu_has_vnni() is vnni and default_reduce_range() is (not vnni)


def test_fake_quant_graph_simulates_onnxruntime_int8(digits_run, tmp_path):
    """With its observers calibrated on the same images, the fake-quant graph quantizes the same tensors with the
    same scales as ONNX Runtime's int8 model, and its logits follow ONNX Runtime's closer than fp32's do (what
    remains are single-step rounding differences at ties, which grow with depth)."""
    import numpy as np
    from onnx import numpy_helper

    from reslab.deploy.qat import ActivationFakeQuant, calibrate, prepare_qat
    from reslab.deploy.quantize import _split_batches, torch_logits
    from reslab.evaluate.evaluate import load_data_for_model
    from reslab.train.checkpoint import load_model

    quantize(digits_run, calibration_images=64, eval_images=100, out=tmp_path / "q", bench=False)
    model, card = load_model(digits_run)
    splits = load_data_for_model(card, None)
    calibration, _ = _split_batches(splits.train, card, 64, batch_size=64, seed=0)  # what quantize() used
    evaluation, _ = _split_batches(splits.test, card, 100, batch_size=50, seed=0)
    from reslab.deploy.quantize import default_reduce_range

    gm, observers = prepare_qat(model, 64 if default_reduce_range() else 127)  # the weights quantize() made
    calibrate(gm.eval(), observers, calibration)
    graph = onnx.load(str(tmp_path / "q" / "model.int8.onnx")).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    ort_scales = sorted({float(init[n.input[1]]) for n in graph.node
                         if n.op_type == "QuantizeLinear" and init[n.input[1]].size == 1})
    ours = sorted({float(fq.qparams()[0]) for fq in observers})
    assert len(ours) == len(ort_scales) and np.allclose(ours, ort_scales, rtol=1e-4), (ours, ort_scales)
    assert not any(isinstance(m, ActivationFakeQuant) for m in model.modules())  # the model itself is untouched
    with torch.no_grad():
        fake = torch.cat([gm(x) for x in evaluation])
    ort = onnx_logits(tmp_path / "q" / "model.int8.onnx", evaluation)
    fp32 = torch_logits(model, evaluation)
    assert agreement(ort, fake)["top1_agreement"] >= 0.98
    assert (fake - ort).norm() < (fp32 - ort).norm()


def test_qat_finetune_returns_the_plain_model(digits_run):
    from reslab.deploy.qat import qat_finetune
    from reslab.deploy.quantize import _split_batches
    from reslab.evaluate.evaluate import load_data_for_model
    from reslab.train.checkpoint import load_model

    model, card = load_model(digits_run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    splits = load_data_for_model(card, None)
    xs, ys = _split_batches(splits.train, card, 128, batch_size=32)
    lines = []
    tuned, info = qat_finetune(model, list(zip(xs, ys.split(32))), epochs=2, lr=0.01, log=lines.append)
    assert list(tuned.state_dict()) == list(before)  # no fake-quant modules or observers left behind
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input model is a copy
    assert any(not torch.equal(v, before[k]) for k, v in tuned.state_dict().items())
    bn = [k for k in before if k.endswith("running_mean")]
    assert bn and all(torch.equal(tuned.state_dict()[k], before[k]) for k in bn)  # BN statistics frozen
    assert len(lines) == 2 and info["epochs"] == 2 and info["steps"] == 8 and info["images_per_epoch"] == 128
    assert info["observers_frozen_after_step"] == 6 and info["activation_sites"] > 10


def test_quantize_with_qat_from_the_cli_reports_it(digits_run, tmp_path, capsys):
    from reslab.cli import main

    code = main(["quantize", str(digits_run), "--calibration-images", "64", "--eval-images", "100", "--no-bench",
                 "--qat-epochs", "1", "--qat-images", "256", "--qat-lr", "0.002", "--out", str(tmp_path / "c")])
    assert code == 0
    out = capsys.readouterr().out
    assert "qat epoch 1/1" in out and "before QAT" in out
    report = json.loads((tmp_path / "c" / "quantize.json").read_text())
    qat = report["method"]["qat"]
    assert qat["epochs"] == 1 and qat["lr"] == 0.002 and qat["train_images"] == 256 and qat["images_per_epoch"] == 256
    assert "int8" in qat["fake_quant"]["weights"] and "uint8" in qat["fake_quant"]["activations"]
    acc = report["accuracy"]
    assert acc["top1_drop_points_vs_before_qat"] <= 2.0, acc
    card = json.loads((tmp_path / "c" / "model.json").read_text())
    assert card["quantization"]["qat"]["epochs"] == 1
    assert main(["quantize", str(digits_run), "--qat-epochs", "-1"]) == 2


def test_pytorch_runtime_writes_a_torchscript_int8_model_that_keeps_accuracy(digits_run, tmp_path):
    """--runtime pytorch: FX graph-mode int8 on PyTorch's x86 engine, frozen to TorchScript. The file holds
    quantized convolutions with int8 per-channel weights, runs on any batch size after torch.jit.load, keeps
    the accuracy, and the report compares it with the ONNX Runtime int8 model built beside it."""
    from reslab.deploy.quantize_torch import load_torch_int8, torch_int8_logits

    r = quantize(digits_run, calibration_images=128, out=tmp_path / "q", bench=False, runtime="pytorch")
    acc = r["accuracy"]
    assert acc["count"] == 359 and acc["top1_fp32"] >= 0.9, acc
    assert acc["top1_drop_points"] <= 1.0 and acc["top1_agreement"] >= 0.97, acc
    assert abs(acc["top1_int8_onnxruntime"] - acc["top1_int8"]) <= 0.02  # the same scheme on two runtimes
    card = json.loads((tmp_path / "q" / "model.json").read_text())
    assert card["format"] == "torchscript-int8" and card["file"] == "model.int8.pt"
    assert card["quantization"]["runtime"] == "pytorch"
    assert r["files"] == {"int8": "model.int8.pt", "int8_onnxruntime": "model.int8.onnx", "fp32": "model.fp32.onnx"}
    module = load_torch_int8(tmp_path / "q" / "model.int8.pt")
    graph = str(module.graph)
    assert "quantized::conv2d" in graph and "quantize_per_tensor" in graph  # really int8 kernels
    weights = [p for p in module.state_dict().values() if isinstance(p, torch.Tensor) and p.is_quantized]
    assert not weights or all(w.dtype in (torch.qint8, torch.quint8) for w in weights)
    h, w = card["preprocessing"]["input_size"]
    x = torch.randn(5, 1, h, w)
    logits = torch_int8_logits(module, [x])
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    # Batch composition does not change an image's logits (no batch size baked into the trace).
    torch.testing.assert_close(torch_int8_logits(module, [x[:2], x[2:]]), logits)
    assert r["size_bytes"]["int8"] < 0.5 * r["size_bytes"]["fp32"]


@pytest.mark.parametrize("engine", ["x86", "onednn"])
def test_each_pytorch_engine_keeps_accuracy_and_the_file_names_its_engine(digits_run, tmp_path, engine):
    """Both int8 engines give the fp32 model's answers; packed weights belong to their engine, so the file
    records it and loading switches to it, whatever engine the process had."""
    from reslab.deploy.quantize import _split_batches, default_reduce_range
    from reslab.deploy.quantize_torch import load_torch_int8, quantize_torch, save_torch_int8, torch_int8_logits
    from reslab.evaluate.evaluate import load_data_for_model
    from reslab.train.checkpoint import load_model

    model, card = load_model(digits_run, device="cpu")
    splits = load_data_for_model(card, None)
    calibration, _ = _split_batches(splits.train, card, 128, batch_size=64)
    test, labels = _split_batches(splits.test, card, None, batch_size=128)
    module = quantize_torch(model, calibration, reduce_range=default_reduce_range(), engine=engine)
    assert module.quantized_engine == engine
    logits = torch_int8_logits(module, test)
    with torch.no_grad():
        fp32 = torch.cat([model.eval()(x) for x in test])
    assert (logits.argmax(1) == fp32.argmax(1)).float().mean() >= 0.97
    assert (logits.argmax(1) == labels).float().mean() >= (fp32.argmax(1) == labels).float().mean() - 0.01
    save_torch_int8(module, tmp_path / "m.pt")
    torch.backends.quantized.engine = {"x86": "onednn", "onednn": "x86"}[engine]  # the other one
    loaded = load_torch_int8(tmp_path / "m.pt")
    assert loaded.quantized_engine == engine == torch.backends.quantized.engine
    torch.testing.assert_close(torch_int8_logits(loaded, test), logits)


def test_default_engine_follows_vnni(monkeypatch):
    import reslab.deploy.quantize as q
    from reslab.deploy.quantize_torch import default_engine

    monkeypatch.setattr(q, "cpu_has_vnni", lambda: True)
    assert default_engine() == "x86"
    monkeypatch.setattr(q, "cpu_has_vnni", lambda: False)  # AVX2: oneDNN measured 1.5x faster
    assert default_engine() == "onednn"


def test_pytorch_runtime_cli_times_both_int8_runtimes(digits_run, tmp_path, capsys):
    from reslab.cli import main

    code = main(["quantize", str(digits_run), "--runtime", "pytorch", "--calibration-images", "64",
                 "--eval-images", "100", "--repeats", "1", "--out", str(tmp_path / "c")])
    assert code == 0
    out = capsys.readouterr().out
    assert "int8_pytorch" in out and "model.int8.pt" in out
    report = json.loads((tmp_path / "c" / "quantize.json").read_text())
    assert {"fp32_eager", "fp32_onnxruntime", "int8_onnxruntime", "int8_pytorch"} <= set(report["throughput"])
    assert report["speedup_vs_fp32_eager"]["int8_pytorch"] > 0
    assert report["method"]["engine"] in ("x86", "onednn")
    # Options of one runtime's flow only are refused with the option named, before any work is done.
    assert main(["quantize", str(digits_run), "--torch-engine", "onednn", "--out", str(tmp_path / "e")]) == 2
    assert "--torch-engine" in capsys.readouterr().err and not (tmp_path / "e").exists()
    assert main(["quantize", str(digits_run), "--runtime", "pytorch", "--calibration", "entropy",
                 "--out", str(tmp_path / "e")]) == 2
    assert "--calibration entropy" in capsys.readouterr().err
    assert main(["quantize", str(digits_run), "--runtime", "pytorch", "--bias-correction",
                 "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b" / "model.json").exists()


def test_choose_runtime_takes_the_faster_int8_runtime_unless_the_other_is_really_more_accurate():
    from reslab.deploy.quantize import choose_runtime

    speed = {"int8_onnxruntime": {"images_per_s": 900.0, "batch_size": 64},
             "int8_pytorch": {"images_per_s": 1200.0, "batch_size": 64}}

    def correct(n, right, only_ort=0, only_pt=0):  # n images; `right` both get right, then the discordant ones
        ort, pt = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        ort[:right] = pt[:right] = True
        ort[right:right + only_ort] = True
        pt[right + only_ort:right + only_ort + only_pt] = True
        return {"onnxruntime": ort, "pytorch": pt}

    # 10,000 images, ONNX Runtime right on 30 more: +0.3 points, 2 standard errors = 0.11: a real loss.
    sel = choose_runtime(speed, correct(10_000, 7_000, only_ort=30))
    assert sel["chosen"] == "onnxruntime" and abs(sel["slower_top1_gain_points"] - 0.3) < 1e-9
    assert abs(sel["paired_standard_error_points"] - 100 * 30 ** 0.5 / 10_000) < 1e-9
    assert sel["candidates"]["pytorch"] == {"images_per_s": 1200.0, "batch_size": 64, "top1": 0.7}
    # +0.05 points (5 images): below the tolerance, so the faster one.
    assert choose_runtime(speed, correct(10_000, 7_000, only_ort=5))["chosen"] == "pytorch"
    # One image of 200 (+0.5 points) but 1 discordant image: within noise, so the faster one.
    assert choose_runtime(speed, correct(200, 150, only_ort=1))["chosen"] == "pytorch"
    # 0.3 points from 130 images right only by ONNX Runtime and 100 only by PyTorch: not beyond 2 standard errors.
    assert choose_runtime(speed, correct(10_000, 7_000, only_ort=130, only_pt=100))["chosen"] == "pytorch"
    assert choose_runtime(speed, {})["chosen"] == "pytorch"  # no labels: speed alone
    # A speed lead under 5 % is a tie, and a tie goes to the more accurate model, significant or not.
    near = {"int8_onnxruntime": {"images_per_s": 1160.0, "batch_size": 64},
            "int8_pytorch": {"images_per_s": 1200.0, "batch_size": 64}}
    assert choose_runtime(near, correct(200, 150, only_ort=1))["chosen"] == "onnxruntime"
    assert choose_runtime(near, correct(200, 150))["chosen"] == "pytorch"  # equal top-1: the faster
    assert choose_runtime(near, {})["chosen"] == "pytorch"
    at_best_batch = {"int8_onnxruntime": {"images_per_s": 1300.0, "batch_size": 128},
                     "int8_pytorch": {"images_per_s": 1200.0, "batch_size": 256}}
    sel = choose_runtime(at_best_batch, {}, at_best_batch=True)
    assert sel["chosen"] == "onnxruntime" and sel["candidates"]["pytorch"]["batch_size"] == 256
    assert "fastest batch" in sel["rule"]


def test_auto_runtime_cli_keeps_the_int8_model_that_ran_faster(digits_run, tmp_path, capsys):
    """--runtime auto builds both int8 models, times them side by side, and the card points to the one its own
    measurement chose; the other file stays beside it and both top-1s are reported."""
    from reslab.cli import main

    code = main(["quantize", str(digits_run), "--runtime", "auto", "--calibration-images", "64",
                 "--eval-images", "200", "--repeats", "1", "--out", str(tmp_path / "a")])
    assert code == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "quantize.json").read_text())
    sel, acc = report["selection"], report["accuracy"]
    chosen, other = sel["chosen"], {"onnxruntime": "pytorch", "pytorch": "onnxruntime"}[sel["chosen"]]
    assert f"-> {chosen}" in out and report["runtime"] == chosen
    for rt in (chosen, other):  # the candidates are the report's own measurements
        assert sel["candidates"][rt]["images_per_s"] == report["throughput"][f"int8_{rt}"]["images_per_s"]
        assert sel["candidates"][rt]["top1"] == acc[f"top1_int8_{rt}"]
    assert acc["top1_int8"] == pytest.approx(acc[f"top1_int8_{chosen}"], abs=1e-6)
    faster = max(sel["candidates"], key=lambda rt: sel["candidates"][rt]["images_per_s"])
    if chosen != faster:  # only for a real accuracy gain, or any gain when the speeds tie
        from reslab.deploy.quantize import AUTO_SPEED_TIE, AUTO_TOP1_TOLERANCE_POINTS

        speeds = sorted(c["images_per_s"] for c in sel["candidates"].values())
        gain = sel["slower_top1_gain_points"]
        significant = gain > max(AUTO_TOP1_TOLERANCE_POINTS, 2 * sel["paired_standard_error_points"])
        tied = speeds[1] < (1 + AUTO_SPEED_TIE) * speeds[0] and gain > 0
        assert significant or tied, sel
    files = {"onnxruntime": "model.int8.onnx", "pytorch": "model.int8.pt"}
    assert report["files"] == {"int8": files[chosen], f"int8_{other}": files[other], "fp32": "model.fp32.onnx"}
    assert all((tmp_path / "a" / name).exists() for name in report["files"].values())
    card = json.loads((tmp_path / "a" / "model.json").read_text())
    assert card["file"] == files[chosen] and card["quantization"]["runtime"] == chosen
    assert card["format"] == {"onnxruntime": "onnx-int8", "pytorch": "torchscript-int8"}[chosen]
    # auto decides by timing, so it refuses to run untimed, before any work.
    assert main(["quantize", str(digits_run), "--runtime", "auto", "--no-bench", "--out", str(tmp_path / "n")]) == 2
    assert "--no-bench" in capsys.readouterr().err and not (tmp_path / "n").exists()
