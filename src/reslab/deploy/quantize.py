"""``reslab quantize``: static post-training INT8 quantization with ONNX Runtime, calibrated on training images.

(``--runtime pytorch`` adds the same scheme on PyTorch's own int8 kernels, :mod:`reslab.deploy.quantize_torch`;
``--runtime auto`` builds both and keeps the one that runs faster on this machine, :func:`choose_runtime`.)

Why ONNX Runtime rather than PyTorch's PT2E flow: with torch 2.14 the PT2E quantizers
(``X86InductorQuantizer``) live in the separate ``torchao`` package, which reslab does not depend on, and
their speed comes from ``torch.compile``/Inductor code generation (minutes of compile on a 2-core CPU).
ONNX Runtime's static quantization (``quantize_static``, QDQ format, per-channel int8 weights, uint8
activations) runs the U8S8 kernels that use AVX-512 VNNI directly, needs no compiler, and its result is a
single ``.onnx`` file that the export/serve path already consumes.

Flow: fp32 model -> ONNX (batch dimension free) -> ``quant_pre_process`` (shape inference, Conv+BN
fusion) -> calibration on ``N`` training images (min/max of every activation, as in Jacob et al. 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", §3) ->
QDQ int8 model. The report compares top-1 (PyTorch fp32 vs ONNX Runtime int8 on the same test images) and
CPU throughput of fp32 eager PyTorch, bf16 autocast, ONNX Runtime fp32 and ONNX Runtime int8, measured
side by side (median of several timed repetitions).
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from reslab.deploy.export import export_onnx, onnx_session
from reslab.train.rundir import environment_info, write_json

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
RUNTIMES = ("onnxruntime", "pytorch", "auto")
# --runtime auto: an int8 runtime whose top-1 is more than this below the other's is not chosen for its speed,
# and a speed lead under AUTO_SPEED_TIE (a fraction) is a tie, which the higher top-1 wins
AUTO_TOP1_TOLERANCE_POINTS = 0.1
AUTO_SPEED_TIE = 0.05


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------
def measure_throughput(fn: Callable[[], Any], batch_size: int, *, repeats: int = 5, min_seconds: float = 0.5,
                       warmup: int = 2) -> dict[str, float]:
    """Images per second of ``fn`` (one call = one batch): the median of ``repeats`` timed repetitions,
    each running ``fn`` for at least ``min_seconds``. The median keeps other users of a shared CPU from
    deciding the figure; the spread (min/max) is reported too."""
    from reslab.bench import time_calls

    rates = [batch_size / seconds for seconds in time_calls(fn, repeats=repeats, min_seconds=min_seconds,
                                                            warmup=warmup)]
    return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "repeats": repeats, "batch_size": batch_size}


def compare_throughput(model: nn.Module, fp32_onnx: str | Path | None, int8_onnx: str | Path | None,
                       x: torch.Tensor, *, repeats: int = 5, min_seconds: float = 0.5,
                       bf16: bool | None = None, int8_torch: torch.jit.ScriptModule | None = None
                       ) -> dict[str, dict[str, float]]:
    """CPU throughput of the same batch through fp32 eager PyTorch, bf16 autocast, ONNX Runtime fp32, ONNX
    Runtime int8 and (``int8_torch``, from :func:`reslab.deploy.quantize_torch.quantize_torch`) PyTorch int8,
    measured one after the other in the same process. ``bf16`` (default: where the CPU has native bf16;
    elsewhere it is emulated and slower than fp32, so it is not a contender) times the bf16 autocast path."""
    from reslab.train.engine import cpu_has_fast_bf16

    bf16 = cpu_has_fast_bf16() if bf16 is None else bf16
    model = model.eval()
    results: dict[str, dict[str, float]] = {}
    batch = x.shape[0]

    def eager():
        with torch.inference_mode():
            model(x)

    results["fp32_eager"] = measure_throughput(eager, batch, repeats=repeats, min_seconds=min_seconds)
    if bf16:
        def eager_bf16():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)

        results["bf16_eager"] = measure_throughput(eager_bf16, batch, repeats=repeats, min_seconds=min_seconds)
    feed = x.numpy()
    for key, path in (("fp32_onnxruntime", fp32_onnx), ("int8_onnxruntime", int8_onnx)):
        if path is None:
            continue
        sess = onnx_session(path, threads=torch.get_num_threads())
        name = sess.get_inputs()[0].name
        results[key] = measure_throughput(lambda: sess.run(None, {name: feed}), batch, repeats=repeats,
                                          min_seconds=min_seconds)
    if int8_torch is not None:
        from reslab.deploy.quantize_torch import torch_int8_logits

        # TorchScript's profiling executor optimises the graph only after its first calls (5 slow ones for
        # resnet20 here), so more warm-up than the other paths need
        results["int8_pytorch"] = measure_throughput(lambda: torch_int8_logits(int8_torch, [x]), batch,
                                                     repeats=repeats, min_seconds=min_seconds, warmup=8)
    return results


def best_throughput(by_batch: dict[int, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Each path at its own fastest batch size, and the speedups over fp32 eager at *its* fastest batch: a
    fair peak-throughput comparison, since fp32 eager slows down once a batch's activations leave the cache
    while ONNX Runtime int8 keeps speeding up (comparing at one batch size favours one side or the other)."""
    paths = next(iter(by_batch.values())).keys()
    best = {}
    for path in paths:
        size = max(by_batch, key=lambda b: by_batch[b][path]["images_per_s"])
        best[path] = {"images_per_s": by_batch[size][path]["images_per_s"], "batch_size": size}
    base = best["fp32_eager"]["images_per_s"]
    return {"paths": best, "speedup_vs_fp32_eager": {k: v["images_per_s"] / base for k, v in best.items()}}


def int8_ceiling(model: nn.Module, input_shape: tuple[int, int, int], fp32_eager_images_per_s: float, *,
                 repeats: int = 3) -> dict[str, Any]:
    """The most int8 could gain over fp32 eager on this CPU: its int8 matmul rate
    (:func:`reslab.bench.int8_matmul_peak`) over the FLOP/s ``model``'s fp32 eager inference reached (2 per
    multiply-add). int8 convolutions cannot run faster than the int8 product they are made of, so where this is
    under 4 (AVX2 CPUs without VNNI, whose int8 multiplies only ~2x as fast as fp32), no int8 runtime reaches
    the 4x target (docs/deploy.md)."""
    from reslab.bench import int8_matmul_peak, matmul_peak
    from reslab.models.complexity import count_macs

    macs = count_macs(model, input_shape)
    per_engine = int8_matmul_peak(repeats=repeats)
    int8_peak, fp32_peak = max(per_engine.values()), matmul_peak(torch.float32, repeats=repeats)
    eager_flops = 2 * macs * fp32_eager_images_per_s
    return {"macs": macs, "int8_peak_ops": int8_peak, "int8_peak_per_engine": per_engine,
            "fp32_peak_flops": fp32_peak, "int8_over_fp32_peak": int8_peak / fp32_peak,
            "fp32_eager_flops": eager_flops, "max_speedup_vs_fp32_eager": int8_peak / eager_flops}


# ---------------------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------------------
class _BatchReader:
    """ONNX Runtime's CalibrationDataReader over an iterable of normalised float32 NCHW batches."""

    def __init__(self, batches: Iterable[torch.Tensor], input_name: str):
        self._batches = iter(batches)
        self._name = input_name

    def get_next(self):
        x = next(self._batches, None)
        return None if x is None else {self._name: x.contiguous().numpy().astype(np.float32)}

    def rewind(self):  # pragma: no cover - only used by some calibrators
        raise NotImplementedError


def _channel_means(model, names: list[str], batches: list[np.ndarray], input_name: str) -> list[np.ndarray]:
    """Per-channel means (over batch and spatial positions) of the tensors ``names`` of an ONNX model, run
    unoptimised (so a QDQ graph executes as quantize -> dequantize -> float op, the tensors stay visible)."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sums = [0.0] * len(names)
    for x in batches:
        for i, out in enumerate(sess.run(names, {input_name: x})):
            sums[i] = sums[i] + out.astype(np.float64).mean(axis=tuple(d for d in range(out.ndim) if d != 1))
    return [s / len(batches) for s in sums]


def bias_correct_onnx(fp32_path: str | Path, int8_path: str | Path, calibration: Iterable[torch.Tensor]) -> dict:
    """Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
    Bias Correction", §4.2, empirical variant) of a QDQ int8 model, in place.

    Quantization errors of weights and activations do not average out: their mean per output channel shifts
    every convolution's output (for images with large uniform areas the rounding error is the same at many
    positions, so the shift survives global pooling). For each Conv in topological order, the per-channel
    mean of its output in the int8 model (upstream convs already corrected) is compared with the fp32
    model's on the same calibration images, and the difference is subtracted from the int32 bias. Sequential,
    so each conv sees the corrected network before it. Cost: one forward pass of the calibration images per conv.
    """
    import onnx
    from onnx import numpy_helper

    batches = [x.contiguous().numpy().astype(np.float32) for x in calibration]
    fp32, q = onnx.load(str(fp32_path)), onnx.load(str(int8_path))
    input_name = fp32.graph.input[0].name
    fp32_out = {n.name: n.output[0] for n in fp32.graph.node if n.op_type == "Conv" and n.name}
    init = {i.name: i for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    convs = []
    for node in q.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or node.name not in fp32_out:
            continue
        dq = producer.get(node.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in init or dq.input[1] not in init:
            continue  # bias not stored as an int32 initializer (e.g. an excluded node): nothing to correct
        convs.append((node, init[dq.input[0]], numpy_helper.to_array(init[dq.input[1]]).astype(np.float64)))
    reference = _channel_means(fp32, [fp32_out[n.name] for n, _, _ in convs], batches, input_name)
    largest = 0.0
    for (node, bias, scale), ref in zip(convs, reference):
        shift = _channel_means(q, [node.output[0]], batches, input_name)[0] - ref
        corrected = numpy_helper.to_array(bias).astype(np.int64) - np.round(shift / scale).astype(np.int64)
        info = np.iinfo(np.int32)
        bias.CopyFrom(numpy_helper.from_array(np.clip(corrected, info.min, info.max).astype(np.int32), bias.name))
        largest = max(largest, float(np.abs(shift).max()))
    onnx.save(q, str(int8_path))
    return {"convs_corrected": len(convs), "largest_mean_shift_removed": largest,
            "images": int(sum(b.shape[0] for b in batches))}


@contextlib.contextmanager
def _calibration_threads(threads: int):
    """ONNX Runtime's calibrator opens its session with default options, i.e. one thread per core; hold it to
    ``threads`` intra-op threads like every other session here (a shared CPU)."""
    import onnxruntime as ort
    from onnxruntime.quantization import calibrate

    original = calibrate.CalibraterBase.create_inference_session

    def create_inference_session(self):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = threads
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=opts,
                                                  providers=self.execution_providers)

    calibrate.CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        calibrate.CalibraterBase.create_inference_session = original


def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies uint8 x int8 with 32-bit accumulation (AVX512-VNNI, AVX-VNNI, AMX-INT8). An
    x86 CPU without it (AVX2, AVX-512 without VNNI) runs ONNX Runtime's u8s8 kernels through ``vpmaddubsw``,
    whose pairwise int16 sums saturate once 255 x 127 x 2 > 32767, so full-range int8 weights lose accuracy there
    (on a 2-core AVX2 AMD EPYC: top-1 agreement with fp32 0.9967 and max logit error 2.1 on 300 digits, against
    1.0 and 0.25 with 7-bit weights). Non-x86 CPUs (ARM's dot-product kernels) do not have the problem."""
    from reslab.train.engine import cpu_flags

    flags = cpu_flags()
    if not flags & {"avx2", "sse4_2"}:  # not x86 (or flags unreadable): no vpmaddubsw path
        return True
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def default_reduce_range() -> bool:
    """7-bit weights (ONNX Runtime's ``reduce_range``) where the CPU lacks VNNI (:func:`cpu_has_vnni`)."""
    return not cpu_has_vnni()


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, calibration: Iterable[torch.Tensor], *,
                  method: str = "minmax", per_channel: bool = True, keep_prepared: Path | None = None,
                  reduce_range: bool | None = None) -> Path:
    """Static int8 quantization of an ONNX model (QDQ format; int8 symmetric per-channel weights, uint8
    activations) calibrated on ``calibration`` batches. ``keep_prepared``: keep the pre-processed fp32 model
    (BN fused, as in the int8 graph) at this path instead of deleting it. ``reduce_range``: weights in
    [-64, 64] instead of [-127, 127] (default: on CPUs without VNNI, :func:`default_reduce_range`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    reduce_range = default_reduce_range() if reduce_range is None else reduce_range
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    prepared = Path(keep_prepared) if keep_prepared else int8_path.with_name(int8_path.stem + ".prep.onnx")
    # Shape inference and ORT's basic graph optimisations (Conv+BN fusion), so the quantiser sees fused convs.
    calibration = list(calibration)
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    session = onnx_session(prepared, threads=torch.get_num_threads())
    reader = _BatchReader(calibration, session.get_inputs()[0].name)
    del session
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    with _calibration_threads(torch.get_num_threads()):
        quantize_static(str(prepared), str(int8_path), reader, quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calibrate, extra_options={"ActivationSymmetric": False,
                                                                   "WeightSymmetric": True})
    if not keep_prepared:
        prepared.unlink(missing_ok=True)
    return int8_path


def onnx_logits(path: str | Path, batches: Iterable[torch.Tensor], session=None) -> torch.Tensor:
    sess = session or onnx_session(path, threads=torch.get_num_threads())
    name = sess.get_inputs()[0].name
    return torch.cat([torch.from_numpy(sess.run(None, {name: x.contiguous().numpy()})[0]) for x in batches])


@torch.no_grad()
def torch_logits(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x).float() for x in batches])


def agreement(reference: torch.Tensor, other: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
    """How closely ``other`` logits follow ``reference``: top-1 agreement, relative L2 error, and both
    top-1 accuracies when ``labels`` are given."""
    out = {
        "top1_agreement": float((reference.argmax(1) == other.argmax(1)).float().mean()),
        "logits_relative_l2": float((other - reference).norm() / reference.norm().clamp_min(1e-12)),
        "logits_max_abs_diff": float((other - reference).abs().max()),
        "count": int(reference.shape[0]),
    }
    if labels is not None:
        out["top1_reference"] = float((reference.argmax(1) == labels).float().mean())
        out["top1_other"] = float((other.argmax(1) == labels).float().mean())
    return out


def _check_runtime(runtime: str, method: str, bias_correction: bool, bench: bool = True,
                   torch_engine: str | None = None) -> None:
    """Options that only the ONNX Runtime flow has are refused for ``--runtime pytorch``, the PyTorch engine
    for ``--runtime onnxruntime``, and ``auto`` needs the timing it chooses by; checked before any work."""
    from reslab.deploy.quantize_torch import ENGINES

    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if torch_engine is not None and torch_engine not in ENGINES:
        raise ValueError(f"--torch-engine must be one of {', '.join(ENGINES)}, got {torch_engine!r}")
    if torch_engine is not None and runtime == "onnxruntime":
        raise ValueError("--torch-engine picks PyTorch's int8 kernels; use it with --runtime pytorch or auto")
    if runtime == "pytorch" and method != "minmax":
        raise ValueError(f"--calibration {method} is ONNX Runtime's; --runtime pytorch calibrates by min/max")
    if runtime == "pytorch" and bias_correction:
        raise ValueError("--bias-correction corrects the ONNX Runtime model; leave it out with --runtime pytorch")
    if runtime == "auto" and not bench:
        raise ValueError("--runtime auto keeps the int8 runtime that runs faster here, so it times both: "
                         "leave out --no-bench, or name the runtime (--runtime onnxruntime|pytorch)")


def choose_runtime(images_per_s: dict[str, dict[str, float]], correct: dict[str, torch.Tensor], *,
                   at_best_batch: bool = False,
                   tolerance_points: float = AUTO_TOP1_TOLERANCE_POINTS,
                   speed_tie: float = AUTO_SPEED_TIE) -> dict[str, Any]:
    """``--runtime auto``: the faster int8 runtime on this machine, unless the slower one is really more
    accurate: better by more than ``tolerance_points`` of top-1 *and* by more than two standard errors of the
    paired difference (McNemar: with d test images classified right by only one of the two models, the count
    difference has standard deviation sqrt(d)), so that one image flipping on a small test set does not trade
    a large speedup for noise. A speed lead under ``speed_tie`` (5 %: within the run-to-run noise of side-by-side
    medians on a shared machine) is a tie, and a tie goes to the higher top-1.

    ``images_per_s``: compare_throughput's entries ``int8_<runtime>`` (best_throughput's ``paths`` with
    ``at_best_batch``); ``correct``: runtime -> per-test-image correctness of that int8 model (empty when there
    are no labels: speed alone decides)."""
    speed = {rt: images_per_s[f"int8_{rt}"]["images_per_s"] for rt in ("onnxruntime", "pytorch")}
    fast, slow = sorted(speed, key=speed.get, reverse=True)
    candidates = {rt: {"images_per_s": speed[rt], "batch_size": images_per_s[f"int8_{rt}"]["batch_size"]}
                  for rt in speed}
    selection: dict[str, Any] = {"requested": "auto", "chosen": fast, "candidates": candidates}
    if correct:
        for rt in speed:
            candidates[rt]["top1"] = int(correct[rt].sum()) / correct[rt].numel()
        n = correct[fast].numel()
        gain = 100 * (candidates[slow]["top1"] - candidates[fast]["top1"])
        standard_error = 100 * float((correct[slow] != correct[fast]).sum()) ** 0.5 / n
        tie = speed[fast] < (1 + speed_tie) * speed[slow]
        if (gain > tolerance_points and gain > 2 * standard_error) or (tie and gain > 0):
            selection["chosen"] = slow
        selection.update({"slower_top1_gain_points": gain, "paired_standard_error_points": standard_error})
    selection["rule"] = (f"the faster int8 runtime (images/s{' at its fastest batch' if at_best_batch else ''}), "
                         f"unless the slower one's top-1 is higher by > {tolerance_points} points and > 2 paired "
                         f"standard errors, or higher at all when the faster leads by < {100 * speed_tie:.0f} %")
    return selection


def _int8_method(runtime: str, calibration_method: str, calibration: list[torch.Tensor], reduce_range: bool,
                 bias_info: dict | None, engine: str | None = None) -> dict[str, Any]:
    """How the card's int8 model was made (``quantize.json``'s and ``model.json``'s ``method``)."""
    info: dict[str, Any] = {
        "runtime": "onnxruntime", "format": "QDQ",
        "weights": "int8 symmetric per-channel" + (", 7-bit [-64, 64] (reduce_range)" if reduce_range
                                                    else " [-127, 127]"),
        "reduce_range": reduce_range, "activations": "uint8 asymmetric per-tensor",
        "calibration": calibration_method, "calibration_images": int(sum(b.shape[0] for b in calibration)),
        "bias_correction": bias_info or False}
    if runtime == "pytorch":
        info.update({"runtime": "pytorch", "format": "TorchScript (FX graph mode, frozen)", "engine": engine,
                     "weights": "int8 symmetric per-channel [-127, 127]", "calibration": "minmax",
                     "bias_correction": False,
                     "activations": "uint8 asymmetric per-tensor" + (", 7-bit (reduce_range)" if reduce_range else "")})
    return info


def quantize_model(model: nn.Module, card: dict[str, Any], out: str | Path,
                   calibration: list[torch.Tensor], evaluation: list[torch.Tensor] | None = None,
                   labels: torch.Tensor | None = None, *, method: str = "minmax", bench_batch: torch.Tensor | None = None,
                   repeats: int = 5, min_seconds: float = 0.5, bias_correction: bool = False,
                   bias_correction_images: int | None = None,
                   sweep_batches: Sequence[torch.Tensor] = (), reduce_range: bool | None = None,
                   runtime: str = "onnxruntime", torch_engine: str | None = None) -> dict[str, Any]:
    """Quantize ``model`` to ``out/model.int8.onnx`` and return a report (accuracy and throughput).

    ``runtime="pytorch"`` also writes ``out/model.int8.pt`` (PyTorch's int8 kernels,
    :mod:`reslab.deploy.quantize_torch`) and makes it the card's model; the ONNX Runtime int8 model is still
    built, so the report compares the two int8 runtimes side by side (``top1_int8_onnxruntime``,
    ``int8_onnxruntime``/``int8_pytorch`` throughput). ``runtime="auto"`` builds and times both the same way and
    makes the faster one the card's model (:func:`choose_runtime`; the choice, with both candidates' speed and
    top-1, is the report's ``selection``); it needs ``bench_batch``.

    ``calibration``: normalised batches (training images); ``evaluation``/``labels``: test batches for the
    accuracy comparison; ``bench_batch``: the batch timed for throughput (skipped when None);
    ``sweep_batches``: more batches (other sizes) timed the same way, for :func:`best_throughput`.
    ``reduce_range``: 7-bit weights (see :func:`quantize_onnx`; default: on CPUs without VNNI).
    ``torch_engine``: PyTorch's quantized engine, ``x86`` or ``onednn`` (default: the faster for this CPU,
    :func:`reslab.deploy.quantize_torch.default_engine`).
    """
    _check_runtime(runtime, method, bias_correction, bench=bench_batch is not None, torch_engine=torch_engine)
    reduce_range = default_reduce_range() if reduce_range is None else reduce_range
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().float().eval()
    fp32_path, int8_path = out / "model.fp32.onnx", out / "model.int8.onnx"
    example = calibration[0][:1]
    t0 = time.perf_counter()
    export_onnx(model, example, fp32_path, dynamic_batch=True)
    prepared = out / "model.fp32.prep.onnx"  # BN fused as in the int8 graph: bias correction compares with it
    quantize_onnx(fp32_path, int8_path, calibration, method=method, keep_prepared=prepared if bias_correction else None,
                  reduce_range=reduce_range)
    bias_info, before_bias_correction = None, None
    if bias_correction and evaluation and labels is not None:  # what bias correction adds, on the test images
        before_bias_correction = float((onnx_logits(int8_path, evaluation).argmax(1) == labels).float().mean())
    if bias_correction:  # on the first bias_correction_images calibration images, in batches of 16
        images = torch.cat(calibration)[:bias_correction_images]
        bias_info = bias_correct_onnx(prepared, int8_path, list(images.split(16)))
        prepared.unlink(missing_ok=True)
    int8_torch, torch_path = None, out / "model.int8.pt"
    if runtime in ("pytorch", "auto"):
        from reslab.deploy.quantize_torch import quantize_torch, save_torch_int8

        # 7-bit activations where the CPU lacks VNNI (FBGEMM's 16-bit accumulation), as the ONNX path's weights
        int8_torch = quantize_torch(model, calibration, reduce_range=reduce_range, engine=torch_engine)
        save_torch_int8(int8_torch, torch_path)
    seconds = time.perf_counter() - t0
    int8_files = {"onnxruntime": int8_path, "pytorch": torch_path if int8_torch is not None else None}
    report: dict[str, Any] = {"model": card.get("model"), "quantize_seconds": seconds}
    correct: dict[str, torch.Tensor] = {}
    if evaluation:
        from reslab.deploy.quantize_torch import torch_int8_logits

        ref = torch_logits(model, evaluation)
        q = {"onnxruntime": onnx_logits(int8_path, evaluation)}
        if int8_torch is not None:
            q["pytorch"] = torch_int8_logits(int8_torch, evaluation)
        if labels is not None:
            correct = {rt: logits.argmax(1) == labels for rt, logits in q.items()}
    if bench_batch is not None:
        tp = compare_throughput(model, fp32_path, int8_path, bench_batch, repeats=repeats, min_seconds=min_seconds,
                                int8_torch=int8_torch)
        base = tp["fp32_eager"]["images_per_s"]
        report["throughput"] = tp
        report["speedup_vs_fp32_eager"] = {k: v["images_per_s"] / base for k, v in tp.items()}
    if sweep_batches:
        by_batch = {int(x.shape[0]): compare_throughput(model, fp32_path, int8_path, x, repeats=repeats,
                                                        min_seconds=min_seconds, int8_torch=int8_torch)
                    for x in sweep_batches}
        if bench_batch is not None:
            by_batch.setdefault(int(bench_batch.shape[0]), report["throughput"])
        report["throughput_by_batch"] = {str(b): by_batch[b] for b in sorted(by_batch)}
        report["best_throughput"] = best_throughput(by_batch)
    if bench_batch is not None:
        speed = report["best_throughput"]["paths"] if sweep_batches else report["throughput"]
        report["int8_ceiling"] = int8_ceiling(model, tuple(bench_batch.shape[1:]),
                                              speed["fp32_eager"]["images_per_s"], repeats=min(repeats, 3))
    if runtime == "auto":  # auto needs bench_batch (_check_runtime), so `speed` is the timing above
        report["selection"] = choose_runtime(speed, correct, at_best_batch=bool(sweep_batches))
        chosen = report["selection"]["chosen"]
    else:
        chosen = runtime
    paths = {"int8": int8_files[chosen]}
    paths.update({f"int8_{rt}": p for rt, p in int8_files.items() if rt != chosen and p is not None})
    paths["fp32"] = fp32_path
    report.update({"runtime": chosen, "method": _int8_method(chosen, method, calibration, reduce_range, bias_info,
                                                          getattr(int8_torch, "quantized_engine", None)),
                   "files": {k: p.name for k, p in paths.items()},
                   "size_bytes": {k: p.stat().st_size for k, p in paths.items()}})
    if evaluation:
        report["accuracy"] = agreement(ref, q[chosen], labels)
        if labels is not None:
            acc = report["accuracy"]
            acc["top1_fp32"], acc["top1_int8"] = acc.pop("top1_reference"), acc.pop("top1_other")
            acc["top1_drop_points"] = 100 * (acc["top1_fp32"] - acc["top1_int8"])
            if len(correct) > 1:  # every int8 runtime built, the chosen one included
                acc.update({f"top1_int8_{rt}": int(c.sum()) / c.numel() for rt, c in correct.items()})
            if before_bias_correction is not None:
                acc["top1_int8_before_bias_correction"] = before_bias_correction
    report["environment"] = environment_info("cpu")
    int8_card = {k: v for k, v in card.items() if k not in ("files",)}
    h, w = card["preprocessing"]["input_size"]
    int8_card.update({"format": "onnx-int8" if chosen == "onnxruntime" else "torchscript-int8",
                      "file": report["files"]["int8"],
                      "input": {"name": "input", "shape": ["batch", card["in_chans"], h, w], "dtype": "float32",
                                "layout": "NCHW", "note": "decode, resize and normalise with `preprocessing` first"},
                      "output": {"name": "logits", "shape": ["batch", card["num_classes"]]},
                      "quantization": report["method"], "dynamic_batch": True})
    write_json(out / "model.json", int8_card)
    write_json(out / "quantize.json", report)
    report["written_to"] = str(out)
    return report


def _subset(images, limit: int | None, seed: int = 0):
    """At most ``limit`` images of an ImageArray: a seeded random subset (in their original order)."""
    n = len(images.labels)
    if limit is not None and limit < n:
        images = images.subset(np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False)))
    return images


def _split_batches(images, card: dict, limit: int | None, batch_size: int, seed: int = 0):
    """Normalised CPU batches (and labels) of at most ``limit`` images of an ImageArray, a seeded random subset."""
    from reslab.evaluate.evaluate import model_loader

    images = _subset(images, limit, seed)
    xs, ys = [], []
    for x, y in model_loader(card, images, device=torch.device("cpu"), batch_size=batch_size):
        xs.append(x.float().contiguous())
        ys.append(y.cpu())
    return xs, torch.cat(ys)


def quantize(run: str | Path, data: str | None = None, *, calibration_images: int = 512,
             eval_images: int | None = None, out: str | Path | None = None, method: str = "minmax",
             bench: bool = True, bench_batch_size: int | None = None, repeats: int = 5,
             min_seconds: float = 0.5, seed: int = 0, bias_correction: bool = False,
             bias_correction_images: int | None = None, qat_epochs: int = 0, qat_lr: float | None = None,
             qat_images: int | None = None, qat_batch_size: int | None = None,
             batch_sweep: Sequence[int] = (), reduce_range: bool | None = None,
             runtime: str = "onnxruntime", torch_engine: str | None = None) -> dict[str, Any]:
    """``reslab quantize RUN``: int8 model + report in ``RUN/quantized`` (or ``out``).

    Calibrates on ``calibration_images`` random training images of ``data`` (default: the run's data),
    compares top-1 on the test split (``eval_images`` of them, default all), and times fp32/bf16/int8.
    ``bias_correction``: empirical bias correction of the int8 model (:func:`bias_correct_onnx`) on the first
    ``bias_correction_images`` calibration images (default all of them).
    ``qat_epochs``: first fine-tune the model for that many epochs with simulated int8 quantization
    (:func:`reslab.deploy.qat.qat_finetune`) on the run's training data (``qat_images`` random images of it,
    default all), SGD with cosine decay from ``qat_lr`` (default: the run's lr / 100), batch ``qat_batch_size``
    (default: the run's), the run's augmentation; the fine-tuned fp32 model then takes the same path.
    ``batch_sweep``: also time every path at these batch sizes and report each at its fastest
    (:func:`best_throughput`). ``reduce_range``: 7-bit weights (default: on CPUs without VNNI, where full-range
    int8 weights saturate ONNX Runtime's kernels; :func:`cpu_has_vnni`); QAT simulates the same range.
    ``runtime``: ``onnxruntime`` (``model.int8.onnx``), ``pytorch`` (``model.int8.pt`` as well, PyTorch's
    int8 kernels, ``torch_engine`` ``x86`` or ``onednn``, default the faster for this CPU) or ``auto`` (both,
    the faster one on this machine as the card's model); see :func:`quantize_model`.
    """
    from reslab.evaluate.evaluate import load_data_for_model
    from reslab.train.checkpoint import checkpoint_run_dir, find_checkpoint, load_model

    _check_runtime(runtime, method, bias_correction, bench=bench, torch_engine=torch_engine)
    if calibration_images < 1:
        raise ValueError(f"--calibration-images must be >= 1, got {calibration_images}")
    if any(b < 1 for b in batch_sweep):
        raise ValueError(f"--batch-sweep sizes must be >= 1, got {list(batch_sweep)}")
    model, card = load_model(run, device="cpu")
    ckpt = find_checkpoint(run)
    run_dir = checkpoint_run_dir(ckpt)
    out = Path(out) if out else run_dir / "quantized"
    if qat_epochs < 0:
        raise ValueError(f"--qat-epochs must be >= 0, got {qat_epochs}")
    reduce_range = default_reduce_range() if reduce_range is None else reduce_range
    splits = load_data_for_model(card, data)
    qat_info = None
    calibration, _ = _split_batches(splits.train, card, calibration_images, batch_size=64, seed=seed)
    if qat_epochs:
        original = model
        model, qat_info = _qat(model, card, run_dir, splits.train, epochs=qat_epochs, lr=qat_lr, images=qat_images,
                               batch_size=qat_batch_size, seed=seed, calibration=calibration,
                               weight_qmax=64 if reduce_range and runtime != "pytorch" else 127)
    evaluation, labels = _split_batches(splits.test, card, eval_images, batch_size=256, seed=seed)
    bench_batch, sweep = None, []
    if bench:
        h, w = card["preprocessing"]["input_size"]
        pool = torch.cat(evaluation)
        size = bench_batch_size or (64 if h * w <= 64 * 64 else 16)
        bench_batch, sweep = _bench_batch(pool, size), [_bench_batch(pool, b) for b in batch_sweep]
    report = quantize_model(model, card, out, calibration, evaluation, labels, method=method,
                            bench_batch=bench_batch, repeats=repeats, min_seconds=min_seconds,
                            bias_correction=bias_correction, bias_correction_images=bias_correction_images,
                            sweep_batches=sweep, reduce_range=reduce_range, runtime=runtime,
                            torch_engine=torch_engine)
    report["method"]["qat"] = qat_info or False
    if qat_info is not None and "accuracy" in report:  # the bar is the model before fine-tuning
        acc = report["accuracy"]
        before = float((torch_logits(original, evaluation).argmax(1) == labels).float().mean())
        acc["top1_fp32_before_qat"] = before
        acc["top1_drop_points_vs_before_qat"] = 100 * (before - acc["top1_int8"])
    # The card names the checkpoint it came from (`reslab serve` explains predictions with its float weights)
    # and, after QAT, the method with its fine-tune.
    card_path = out / "model.json"
    int8_card = json.loads(card_path.read_text())
    int8_card.update({"quantization": report["method"], "source_checkpoint": str(ckpt.resolve())})
    write_json(card_path, int8_card)
    report.update({"run": str(run_dir), "checkpoint": str(ckpt), "data": data or card["data"]})
    write_json(out / "quantize.json", {k: v for k, v in report.items() if k != "written_to"})
    return report


def _bench_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` test images to time (repeated when the test split is smaller)."""
    return images.repeat(-(-size // images.shape[0]), 1, 1, 1)[:size].contiguous()


def _qat(model: nn.Module, card: dict, run_dir: Path, train_images, *, epochs: int, lr: float | None,
         images: int | None, batch_size: int | None, seed: int,
         calibration: list[torch.Tensor] | None = None, weight_qmax: int = 127) -> tuple[nn.Module, dict]:
    """Quantization-aware fine-tuning on the run's training images with the run's preprocessing card and
    augmentation (``config.yaml``; plain batches when the run has none)."""
    from reslab.data import BatchLoader
    from reslab.deploy.qat import qat_finetune
    from reslab.train.config import load_config_file

    cfg = load_config_file(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    run_lr = cfg.lr if cfg is not None else 0.1
    lr = lr if lr is not None else run_lr / 100
    if lr <= 0:
        raise ValueError(f"--qat-lr must be > 0, got {lr}")
    train_images = _subset(train_images, images, seed)
    n = len(train_images.labels)
    batch_size = min(batch_size or (cfg.batch_size if cfg is not None else 64), n)
    prep = card["preprocessing"]
    h, w = prep["input_size"]
    augment = cfg.batch_augment() if cfg is not None else None
    loader = BatchLoader(train_images, batch_size=batch_size, mean=prep["mean"], std=prep["std"],
                         device=torch.device("cpu"), shuffle=True, drop_last=True, seed=seed, augment=augment,
                         image_size=h if (h, w) != tuple(prep["stored_size"]) else None)
    model, info = qat_finetune(
        model, loader, epochs=epochs, lr=lr, momentum=cfg.momentum if cfg is not None else 0.9,
        weight_decay=cfg.weight_decay if cfg is not None else 0.0,
        nesterov=cfg is not None and cfg.optimizer == "nesterov",
        label_smoothing=cfg.label_smoothing if cfg is not None else 0.0, calibration=calibration,
        set_epoch=loader.set_epoch, weight_qmax=weight_qmax)
    info.update({"lr_default": "run lr / 100" if lr == run_lr / 100 else None, "run_lr": run_lr,
                 "train_images": n, "batch_size": batch_size,
                 "augmentation": {"crop_padding": cfg.crop_padding, "crop_mode": cfg.crop_mode, "flip": cfg.flip}
                 if cfg is not None else None})
    return model, info
