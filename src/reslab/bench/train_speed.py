"""``reslab bench train``: reslab's training loop against the standard torchvision pipeline, in one run.

The reference (``benchmarks/reference_pipeline.py``): ImageFolder over JPEGs + PIL transforms +
``DataLoader(batch_size=128, shuffle=True, num_workers=2)`` + an eager fp32 ResNet-20 + SGD. reslab: its own
``reslab.train.train`` (the real loop: cached uint8 data, batched augmentation, bf16 autocast, channels_last),
run for a fixed number of iterations and timed step to step through ``on_step``, so data loading is included
and the one-time costs (first-step kernel set-up, ``torch.compile``) are measured separately.

The two sides alternate, ``repeats`` times, and the medians are compared. Each sample runs in a fresh Python
process (:func:`run_isolated`), as each side runs for its user: the reference as a plain script with the C
library's malloc at its defaults, reslab as ``reslab train`` does (its ``--retain-memory`` default tunes glibc's
malloc process-wide, so in one shared process it would also speed up every reference sample after the first).
``isolate=False`` (``--in-process``) keeps everything in this process. The ablation table times the same
step functions the loop uses (``BatchLoader`` + ``engine.train_step``) with one optimisation changed at a time.

Training FLOPs per image = 3 x forward multiply-adds x 2 (forward, and backward for inputs and weights);
"fraction of peak" divides the achieved FLOP/s by a large matmul's FLOP/s measured in the same run, in the
precision the loop trains in: bf16 on CPUs with native bf16 (AVX512-BF16, AMX), fp32 elsewhere. On a CPU without
native bf16, bf16 is emulated (a 2048^3 bf16 matmul ran at 0.27 GFLOP/s on a 2-core AVX2 AMD EPYC, against 94
fp32), so neither the peak nor the ablation times it there: the loop does not use it (``--amp auto``).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from reslab.bench import format_table, loadavg, matmul_peak, median_rate, set_threads, write_result
from reslab.train.engine import cpu_has_fast_bf16

# The loop's configurations compared with the reference (name -> TrainConfig overrides).
LOOP_CONFIGS: dict[str, dict[str, Any]] = {
    "reslab default (b128)": {"batch_size": 128},
    "reslab fast (b512)": {"batch_size": 512},
}



def ablation_variants(bf16: bool, compile: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """One optimisation at a time, on the step functions the loop uses (name -> step options). ``bf16``: the CPU
    runs bf16 natively, so the loop's default autocasts to it; otherwise its rows are left out (see the module
    docstring). ``compile`` (``reslab bench train --compile``) adds inductor, minutes of CPU to build."""
    rows = [("fp32, NCHW, b128 (in-memory eager)", dict(batch_size=128, amp=False, channels_last=False))]
    if bf16:
        rows.append(("+ bf16 autocast", dict(batch_size=128, amp=True, channels_last=False)))
    rows += [("+ channels_last (reslab default)", dict(batch_size=128, amp=bf16, channels_last=True)),
             ("  with a .item() sync per step", dict(batch_size=128, amp=bf16, channels_last=True, item_sync=True)),
             ("+ batch 256", dict(batch_size=256, amp=bf16, channels_last=True)),
             ("+ batch 512", dict(batch_size=512, amp=bf16, channels_last=True))]
    if compile:
        rows.append(("+ torch.compile (b512)", dict(batch_size=512, amp=bf16, channels_last=True, compile=True)))
    return rows


def reference_script() -> Path:
    """``benchmarks/reference_pipeline.py`` of the source tree this package runs from."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "benchmarks" / "reference_pipeline.py"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("benchmarks/reference_pipeline.py not found next to the reslab sources; "
                            "pass --reference PATH to the script")


def load_reference(path: str | Path | None = None):
    """Import the reference script as a module (it is a standalone file, not part of the package)."""
    path = Path(path) if path else reference_script()
    if not path.is_file():
        raise FileNotFoundError(f"--reference {path}: no such file")
    spec = importlib.util.spec_from_file_location("reslab_reference_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_dir_of(data: str | Path) -> Path:
    data = Path(data).expanduser()
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: not a folder (expected an ImageFolder root with train/<class>/)")
    return data / "train" if (data / "train").is_dir() else data


def training_flops_per_image(model_name: str, num_classes: int, image_size: tuple[int, int, int]) -> float:
    from reslab.models import count_macs, create_model

    return 3 * 2 * count_macs(create_model(model_name, num_classes=num_classes, in_chans=image_size[0]), image_size)


# ----------------------------------------------------------------------------------------------------------
# reslab's real loop


def loop_throughput(data: str, *, model: str = "resnet20", iterations: int = 40, warmup: int = 3,
                    seed: int = 0, **overrides) -> dict[str, Any]:
    """Run ``reslab.train.train`` for ``warmup + iterations`` steps and time the steps after ``warmup``.

    Step-to-step time covers everything the loop does per step (batch gather and augmentation, lr schedule,
    the step, bookkeeping). ``warmup_seconds`` (from the loop's start to the end of the warm-up steps) holds
    the one-time costs: reading the cache, first-call kernel set-up and, with ``compile=True``, compilation.
    """
    from reslab.train import train
    from reslab.train.config import TrainConfig

    stamps: list[tuple[float, float]] = []  # (wall, CPU seconds of this process) after each step
    with tempfile.TemporaryDirectory(prefix="reslab-bench-") as tmp:
        cfg = TrainConfig(model=model, data=str(data), iterations=warmup + iterations, seed=seed,
                          out=str(Path(tmp) / "run"), progress=False, eval_batch_size=1024)
        cfg = dataclasses.replace(cfg, **overrides)
        start = time.perf_counter()
        summary = train(cfg, on_step=lambda step: stamps.append((time.perf_counter(), time.process_time())))
    images = iterations * cfg.batch_size
    seconds = stamps[-1][0] - stamps[warmup - 1][0]
    cpu = stamps[-1][1] - stamps[warmup - 1][1]
    return {"images_per_s": images / seconds, "seconds": seconds, "images": images, "cpu_seconds": cpu,
            "images_per_cpu_s": images / cpu, "warmup_seconds": stamps[warmup - 1][0] - start,
            "loop_train_images_per_s": summary.train_images_per_s}


def reference_sample(data: str, *, reference: str | None = None, model: str = "resnet20", num_classes: int = 10,
                     in_chans: int = 3, iterations: int = 30, warmup: int = 3, batch_size: int = 128,
                     workers: int = 2, loader=None) -> dict[str, Any]:
    """One timed run of the reference pipeline, training reslab's ``model`` (so both sides train the same net)."""
    from reslab.models import create_model

    ref = load_reference(reference)
    train_dir = str(train_dir_of(data))
    loader = loader if loader is not None else ref.make_loader(train_dir, batch_size, workers)
    net = create_model(model, num_classes=num_classes, in_chans=in_chans)
    return ref.reference_throughput(train_dir, iterations=iterations, warmup=warmup, model=net, loader=loader)


def run_isolated(function: str, threads: int | None = None, **kwargs) -> dict[str, Any]:
    """``train_speed.<function>(**kwargs)`` in a fresh Python process, its result dict back as JSON: no
    allocator setting, warm cache or thread pool carries over from one sample to the next. The result's
    ``process`` holds that process's ID and thread count."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    code = ("import json, os, sys; from reslab.bench import set_threads, train_speed; "
            "threads = set_threads(int(sys.argv[3])); "
            "result = getattr(train_speed, sys.argv[1])(**json.loads(sys.argv[2])); "
            "result['process'] = {'pid': os.getpid(), 'threads': threads}; "
            "print('RESULT ' + json.dumps(result))")
    proc = subprocess.run([sys.executable, "-c", code, function, json.dumps(kwargs), str(threads or 0)],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"benchmark sample {function}({kwargs}) failed in its own process "
                           f"(exit code {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------------------------------------
# The ablation: the loop's step functions with one change at a time


class StepRunner:
    """The loop's inner step (``BatchLoader`` batch + ``engine.train_step``) for one configuration."""

    def __init__(self, splits, *, model: str, batch_size: int, amp: bool, channels_last: bool,
                 compile: bool = False, item_sync: bool = False, seed: int = 0):
        from reslab.data import BatchAugment, BatchLoader
        from reslab.models import create_model

        torch.manual_seed(seed)
        self.device = torch.device("cpu")
        self.batch_size, self.item_sync = batch_size, item_sync
        self.amp_dtype = torch.bfloat16 if amp else None
        net = create_model(model, num_classes=splits.num_classes, in_chans=splits.channels)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.model = torch.compile(net) if compile else net
        self.loader = BatchLoader(splits.train, batch_size=batch_size, mean=splits.mean, std=splits.std,
                                  shuffle=True, drop_last=True, augment=BatchAugment(), seed=seed,
                                  channels_last=channels_last)
        self._batches = iter(())
        start = time.perf_counter()
        self.step()  # first call: kernel set-up and, with compile, compilation (forward and backward)
        self.step()
        self.warmup_seconds = time.perf_counter() - start

    def step(self) -> None:
        from reslab.train.engine import train_step

        try:
            x, y = next(self._batches)
        except StopIteration:
            self.loader.set_epoch(self.loader.epoch + 1)
            self._batches = iter(self.loader)
            x, y = next(self._batches)
        result = train_step(self.model, x, y, self.optimizer, device=self.device, amp_dtype=self.amp_dtype,
                            scaler=None)
        if self.item_sync:
            result.loss.item()

    def images_per_s(self, images: int) -> float:
        steps = max(2, -(-images // self.batch_size))
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * self.batch_size / (time.perf_counter() - start)


def run_ablation(splits, *, model: str = "resnet20", images: int = 2048, repeats: int = 3,
             variants: list[tuple[str, dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """images/s of each variant (interleaved, median of ``repeats``), relative to the first."""
    variants = variants if variants is not None else ablation_variants(cpu_has_fast_bf16())
    runners = [(name, StepRunner(splits, model=model, **opts)) for name, opts in variants]
    samples: dict[str, list[float]] = {name: [] for name, _ in runners}
    for _ in range(repeats):
        for name, runner in runners:
            samples[name].append(runner.images_per_s(images))
    base = median_rate(samples[runners[0][0]])
    return [{"variant": name, "images_per_s": median_rate(samples[name]), "samples": samples[name],
             "speedup": median_rate(samples[name]) / base, "warmup_seconds": runner.warmup_seconds,
             **dict(variants)[name]} for name, runner in runners]


# ----------------------------------------------------------------------------------------------------------
# The benchmark


def bench_train(data: str, *, model: str = "resnet20", iterations: int = 40, warmup: int = 3, repeats: int = 3,
                reference_iterations: int = 30, reference_workers: int = 2, reference_batch_size: int = 128,
                ablation: list[tuple[str, dict[str, Any]]] | None = None, ablation_images: int = 2048,
                configs: dict[str, dict[str, Any]] | None = None,
                reference: str | None = None, threads: int | None = None, out: str | None = None,
                isolate: bool = True) -> dict:
    """Measure the reference pipeline and reslab's loop side by side (``repeats`` interleaved rounds) and write
    ``benchmarks/results/train.json``; returns the result. ``ablation`` (None or empty: no ablation) is a list of
    (name, :class:`StepRunner` options) pairs (:func:`ablation_variants`), the first the baseline of the speed-ups.
    ``isolate``: every sample in a fresh process (:func:`run_isolated`; module docstring)."""
    from reslab.data import load_data

    threads_used = set_threads(threads)
    load_before = loadavg()
    train_dir = train_dir_of(data)
    load_reference(reference)  # a missing script fails here, before any timing
    splits = load_data(str(data), progress=False)  # the one-time decode into the cache happens here
    shape = (splits.channels, *splits.image_size)
    flops_per_image = training_flops_per_image(model, splits.num_classes, shape)
    # the peak in the precision the loop trains in (bf16 only where the CPU has it natively; module docstring)
    peak_dtype = "bf16" if cpu_has_fast_bf16() else "fp32"
    peaks: dict[str, list[float]] = {"bf16": [], "fp32": []} if peak_dtype == "bf16" else {"fp32": []}

    reference_options = dict(reference=str(reference) if reference else None, model=model,
                             num_classes=splits.num_classes, in_chans=splits.channels,
                             iterations=reference_iterations, warmup=warmup, batch_size=reference_batch_size,
                             workers=reference_workers)
    if isolate:
        def sample(function: str, **kwargs) -> dict[str, Any]:
            return run_isolated(function, threads_used, **kwargs)
    else:  # one process; the reference's DataLoader (and its workers) built once and reused
        ref_loader = load_reference(reference).make_loader(str(train_dir), reference_batch_size, reference_workers)
        in_process = {"reference_sample": functools.partial(reference_sample, loader=ref_loader),
                      "loop_throughput": loop_throughput}

        def sample(function: str, **kwargs) -> dict[str, Any]:
            return in_process[function](**kwargs)
    configs = configs if configs is not None else LOOP_CONFIGS
    samples: dict[str, list[dict]] = {"reference": [], **{name: [] for name in configs}}
    for _ in range(repeats):
        # The peak is re-measured every round, as the load moves; its median is the denominator.
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            if name in peaks:
                peaks[name].append(matmul_peak(dtype, repeats=3))
        # The same network on both sides (reslab's resnet20, fp32 contiguous for the reference).
        samples["reference"].append(sample("reference_sample", data=str(data), **reference_options))
        for name, overrides in configs.items():
            samples[name].append(sample("loop_throughput", data=str(data), model=model, iterations=iterations,
                                        warmup=warmup, **overrides))

    peak = {name: median_rate(samples) for name, samples in peaks.items()}
    ref_rate = median_rate([s["images_per_s"] for s in samples["reference"]])
    ref_cpu = [s["images_per_cpu_s"] for s in samples["reference"] if s.get("images_per_cpu_s")]
    ref_cpu_rate = median_rate(ref_cpu) if ref_cpu else None
    rows = []
    for name, runs in samples.items():
        rate = median_rate([s["images_per_s"] for s in runs])
        cpu_rates = [s["images_per_cpu_s"] for s in runs if s.get("images_per_cpu_s")]
        cpu_rate = median_rate(cpu_rates) if cpu_rates else None
        rows.append({"pipeline": name, "images_per_s": rate, "samples": [s["images_per_s"] for s in runs],
                     "vs_reference": rate / ref_rate, "images_per_cpu_s": cpu_rate,
                     "vs_reference_per_cpu": cpu_rate / ref_cpu_rate if cpu_rate and ref_cpu_rate else None,
                     "tflops": rate * flops_per_image / 1e12,
                     "fraction_of_peak": rate * flops_per_image / peak[peak_dtype],
                     "warmup_seconds": median_rate([s.get("warmup_seconds", 0.0) for s in runs]),
                     "settings": configs.get(name, {"batch_size": reference_batch_size, "amp": "off",
                                                       "workers": reference_workers})})
    result = {
        "model": model, "data": str(data), "repeats": repeats, "iterations": iterations,
        "reference_iterations": reference_iterations, "torch_threads": threads_used,
        "isolated_processes": isolate,
        "training_flops_per_image": flops_per_image,
        "peak_dtype": peak_dtype, "peak_matmul_flops": peak[peak_dtype],
        "peak_bf16_matmul_flops": peak.get("bf16"), "peak_fp32_matmul_flops": peak["fp32"], "peak_samples": peaks,
        "rows": rows,
    }
    if ablation:
        result["ablation"] = run_ablation(splits, model=model, images=ablation_images, repeats=repeats,
                                          variants=ablation)
    result["loadavg_before"], result["loadavg_after"] = load_before, loadavg()
    result["path"] = str(write_result("train", result, out))
    return result


def print_train(result: dict) -> None:
    isolated = ", each in a fresh process" if result.get("isolated_processes") else ""
    print(f"{result['model']} training on {result['data']}, {result['torch_threads']} threads, median of "
          f"{result['repeats']} interleaved repetitions{isolated}; {result['peak_dtype']} matmul peak "
          f"{result['peak_matmul_flops'] / 1e9:,.0f} GFLOP/s; load average {result['loadavg_before']} -> "
          f"{result['loadavg_after']}")
    print(format_table(result["rows"], [("pipeline", "pipeline"), ("images_per_s", "images/s"),
                                        ("vs_reference", "x reference"),
                                        ("images_per_cpu_s", "img/CPU-s"), ("vs_reference_per_cpu", "x ref per CPU"),
                                        ("fraction_of_peak", f"fraction of {result['peak_dtype']} peak"),
                                        ("warmup_seconds", "one-time s")]))
    if result.get("ablation"):
        print("\nablation (the loop's step functions, one change at a time)")
        print(format_table(result["ablation"], [("variant", "variant"), ("images_per_s", "images/s"),
                                                ("speedup", "x first row"), ("warmup_seconds", "one-time s")]))
    print(f"\nwritten to {result['path']}")
