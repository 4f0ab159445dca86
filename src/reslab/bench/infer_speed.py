"""``reslab bench infer``: batch-1 latency and batch-32 throughput of eager fp32, ONNX Runtime fp32 and
reslab's fast inference path, measured side by side (interleaved, median of several repetitions), with the
prediction agreement of each path against eager fp32 on real images.

reslab's fast path is :func:`reslab.evaluate.inference.fast_inference_model` (BN folded, channels_last, bf16,
frozen TorchScript), the path ``reslab predict`` and ``reslab serve`` use on a CPU with native bf16; each of its
steps is timed here on its own. In fp32 (other CPUs) their default is ONNX Runtime, the "onnxruntime fp32" row;
the result names the default path of the machine it ran on (``default``).

Every variant's agreement with eager fp32 is reported; the fastest variant whose top-1 moves by at most
``max_top1_change`` (0.1 points by default) on the check images is the one reported as "reslab best".
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from reslab.bench import format_table, loadavg, median_rate, set_threads, time_calls, write_result
from reslab.evaluate.inference import fast_inference_model
from reslab.train.engine import cpu_has_fast_bf16

MODELS = {"resnet20": 32, "resnet50": 224}


def eager_fp32(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    net = copy.deepcopy(model).float().eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(x)

    return run


def onnxruntime_fp32(model: nn.Module, example: torch.Tensor, workdir: Path, threads: int):
    from reslab.deploy.export import export_onnx, onnx_session

    path = export_onnx(copy.deepcopy(model).float().eval(), example, workdir / "model.onnx", dynamic_batch=True)
    session = onnx_session(path, threads=threads)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run


# ----------------------------------------------------------------------------------------------------------
# Accuracy check


def agreement(reference: torch.Tensor, other: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
    """Top-1 agreement of two sets of logits, the largest logit difference, and top-1 against labels."""
    out = {"top1_agreement": float((reference.argmax(1) == other.argmax(1)).float().mean()),
           "max_abs_logit_diff": float((reference - other).abs().max())}
    if labels is not None:
        out["top1"] = float((other.argmax(1) == labels).float().mean())
        out["top1_change"] = out["top1"] - float((reference.argmax(1) == labels).float().mean())
    return out


def check_images(model_name: str, size: int, *, run: str | None, data: str | None, count: int):
    """(model, normalised fp32 images, labels or None, where they came from) for the agreement check.

    With ``run`` (a trained run directory): its model and its own test images. Otherwise a freshly initialised
    model on ``data``'s test images (resized to ``size``), or on random normal images when there is no data.
    """
    import torch.nn.functional as F

    from reslab.models import create_model

    if run is not None:
        from reslab.evaluate.evaluate import load_data_for_model
        from reslab.train.checkpoint import load_model

        model, card = load_model(run, device="cpu")
        splits = load_data_for_model(card, data)
        images, labels = splits.test.images[:count], torch.as_tensor(splits.test.labels[:count])
        mean, std, source = splits.mean, splits.std, f"test images of {card.get('data')}, trained {run}"
    elif data is not None:
        from reslab.data import load_data

        splits = load_data(data, progress=False)
        model = create_model(model_name, num_classes=splits.num_classes, in_chans=splits.channels)
        images, labels = splits.test.images[:count], None
        mean, std, source = splits.mean, splits.std, f"test images of {data}, untrained weights"
    else:
        model = create_model(model_name)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(count, 3, size, size, generator=gen)
        return model.eval(), x, None, "random normal images, untrained weights"
    x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float().div_(255)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return model.eval(), x, labels, source


# ----------------------------------------------------------------------------------------------------------
# The benchmark


def _batched(fn, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def bench_model(model_name: str, size: int, *, batch: int = 32, repeats: int = 5, min_seconds: float = 0.3,
                run: str | None = None, data: str | None = None, check_count: int = 1000,
                compile: bool = False, max_top1_change: float = 0.001, threads: int = 1) -> dict[str, Any]:
    model, images, labels, source = check_images(model_name, size, run=run, data=data, count=check_count)
    one, many = images[:1].clone(), images[:batch].clone()
    if many.shape[0] < batch:
        many = images[torch.arange(batch) % images.shape[0]].clone()
    with tempfile.TemporaryDirectory(prefix="reslab-infer-") as tmp:
        paths: dict[str, Callable] = {}
        build_seconds: dict[str, float] = {}

        def build(name: str, make: Callable[[], Callable]) -> None:
            start = time.perf_counter()
            paths[name] = make()
            build_seconds[name] = time.perf_counter() - start

        build("eager fp32", lambda: eager_fp32(model))
        build("onnxruntime fp32", lambda: onnxruntime_fp32(model, many, Path(tmp), threads))
        build("reslab fp32 (BN folded, NHWC, frozen)", lambda: fast_inference_model(model, many, bf16=False))
        # bf16 only where the CPU has it natively: elsewhere it is emulated, many times slower than fp32, and the
        # default path (``inference_runner``, ``--amp auto``) does not take it
        bf16 = cpu_has_fast_bf16()
        if bf16:
            build("reslab bf16 eager (BN folded, NHWC)", lambda: fast_inference_model(model, many, script=False))
            build("reslab bf16 (BN folded, NHWC, frozen)", lambda: fast_inference_model(model, many))
        if compile:
            build(f"reslab {'bf16' if bf16 else 'fp32'} compile (inductor, freezing)",
                  lambda: fast_inference_model(model, many, bf16=bf16, compile=True))

        reference_logits = _batched(paths["eager fp32"], images)
        latency = {name: [] for name in paths}
        throughput = {name: [] for name in paths}
        for _ in range(repeats):  # interleaved: every path sees the same load
            for name, fn in paths.items():
                latency[name].extend(time_calls(lambda: fn(one), repeats=1, min_seconds=min_seconds / 3))
                throughput[name].extend(time_calls(lambda: fn(many), repeats=1, min_seconds=min_seconds))
        rows = []
        for name, fn in paths.items():
            row = {"path": name, "latency_ms": 1e3 * median_rate(latency[name]),
                   "images_per_s": batch / median_rate(throughput[name]), "build_seconds": build_seconds[name],
                   **agreement(reference_logits, _batched(fn, images), labels)}
            rows.append(row)
    eager, ort = rows[0], rows[1]
    for row in rows:
        row["latency_speedup_vs_eager"] = eager["latency_ms"] / row["latency_ms"]
        row["throughput_speedup_vs_eager"] = row["images_per_s"] / eager["images_per_s"]
        row["latency_speedup_vs_onnxruntime"] = ort["latency_ms"] / row["latency_ms"]
        row["throughput_speedup_vs_onnxruntime"] = row["images_per_s"] / ort["images_per_s"]

    def acceptable(row: dict) -> bool:
        if labels is not None:
            return abs(row["top1_change"]) <= max_top1_change + 1e-12
        return row["top1_agreement"] >= 1 - max_top1_change - 1e-12 or row["max_abs_logit_diff"] < 1e-3

    candidates = [r for r in rows if r["path"].startswith("reslab") and acceptable(r)] or rows[:1]
    best = max(candidates, key=lambda r: r["images_per_s"] / eager["images_per_s"]
               + eager["latency_ms"] / r["latency_ms"])
    best_latency = min(candidates, key=lambda r: r["latency_ms"])
    # what `reslab predict` / `reslab serve` run here with --amp auto (reslab.evaluate.inference.inference_runner)
    default = "reslab bf16 (BN folded, NHWC, frozen)" if bf16 else "onnxruntime fp32"
    return {"model": model_name, "image_size": size, "batch": batch, "check_images": len(images),
            "check_source": source, "rows": rows, "best": best["path"], "best_latency": best_latency["path"],
            "default": default}


def bench_infer(*, models: dict[str, int] | None = None, batch: int = 32, repeats: int = 5, run: str | None = None,
                data: str | None = None, check_count: int = 1000, compile: bool = False,
                threads: int | None = None, out: str | None = None) -> dict[str, Any]:
    """Every model of ``models`` (name -> image side); ``run``/``data`` apply to the 32x32 CIFAR model."""
    threads_used = set_threads(threads)
    load_before = loadavg()
    results = []
    for name, size in (models or MODELS).items():
        cifar = size <= 32
        results.append(bench_model(name, size, batch=batch, repeats=repeats, run=run if cifar else None,
                                   data=data, check_count=check_count if cifar else min(check_count, 128),
                                   compile=compile, threads=threads_used))
    result = {"torch_threads": threads_used, "repeats": repeats, "models": results,
              "loadavg_before": load_before, "loadavg_after": loadavg()}
    result["path"] = str(write_result("infer", result, out))
    return result


def print_infer(result: dict) -> None:
    print(f"inference, {result['torch_threads']} threads, median of {result['repeats']} interleaved repetitions; "
          f"load average {result['loadavg_before']} -> {result['loadavg_after']}")
    for m in result["models"]:
        print(f"\n{m['model']} at {m['image_size']}x{m['image_size']} (agreement on {m['check_images']} "
              f"{m['check_source']}); best: {m['best']}; default path (predict, serve): {m.get('default')}")
        print(format_table(m["rows"], [("path", "path"), ("latency_ms", "batch-1 ms"),
                                       ("images_per_s", f"batch-{m['batch']} img/s"),
                                       ("latency_speedup_vs_eager", "lat x eager"),
                                       ("throughput_speedup_vs_eager", "thr x eager"),
                                       ("throughput_speedup_vs_onnxruntime", "thr x ORT"),
                                       ("top1_agreement", "top-1 agree"), ("top1_change", "top-1 change")]))
    print(f"\nwritten to {result['path']}")
