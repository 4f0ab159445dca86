"""What this CPU's arithmetic peak allows: the Issue #3 and #7 targets as FLOP/s, against the peaks measured here.

A target that needs more multiply-adds per second than the machine's best number format can do is out of reach
on that machine whatever the software does; one that needs less is a software question. This script measures

- the practical peaks: a 2048^3 matmul in fp32 (and bf16 where the CPU has it natively), and int8 as a
  quantized 2048x2048 linear layer (uint8 x int8, the kernels ONNX Runtime and PyTorch's int8 convolutions
  use), with PyTorch's `onednn` and `x86` engines, the faster counted;
- the reference training pipeline (`reference_pipeline.py`, ImageFolder + PIL + DataLoader + fp32 eager
  ResNet-20) end to end, and ResNet-20's fp32 eager inference at batch 32-256 (its fastest kept), each as the
  plain script a user runs (no reslab allocator setting);

and turns each target into the FLOP/s it needs (a training step costs 3x the forward multiply-adds, 2 FLOPs
each):

1. Issue #3 target 1: 5x the reference's training images/s for ResNet-20, against the fastest training
   precision here (bf16 where native, else fp32).
2. Issue #3 target 2: the `fast` recipe's network and epochs (50,000 training images) within 300 s, and
   `fast94`'s within 1,800 s. This bounds the recipes, not every conceivable one.
3. Issue #7: the largest int8 / fp32-eager throughput ratio ResNet-20 could reach if its int8 path ran at the
   int8 peak; the target is 4x.

    OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python benchmarks/peak_bounds.py --data /tmp/cifar10 \\
        --out benchmarks/results/peak-bounds.json
"""
from __future__ import annotations

import argparse
import time

import torch

from reslab.bench import (format_table, int8_matmul_peak, loadavg, matmul_peak, median_rate, set_threads, time_calls,
                          write_result)
from reslab.bench.infer_speed import eager_fp32
from reslab.bench.train_speed import load_reference, train_dir_of
from reslab.models import create_model
from reslab.models.complexity import count_macs
from reslab.train.config import resolve_config
from reslab.train.engine import cpu_has_fast_bf16

# Issue #3 target 2: 90 % with `fast` in 5 minutes, 94 % with `fast94` in 30
RECIPE_BUDGETS = {"fast": 300, "fast94": 1800}


def eager_inference(model: torch.nn.Module, batches=(32, 64, 128, 256), repeats: int = 5) -> dict[int, float]:
    """fp32 eager images/s of ``model`` on random 32x32 batches, per batch size."""
    run = eager_fp32(model)
    rates = {}
    for b in batches:
        x = torch.randn(b, 3, 32, 32)
        rates[b] = b / median_rate(time_calls(lambda: run(x), repeats=repeats, min_seconds=0.5))
    return rates


def reference_training(data: str, iterations: int, repeats: int) -> list[float]:
    """The reference pipeline's end-to-end training images/s, ``repeats`` times (in this process)."""
    ref, train_dir = load_reference(), str(train_dir_of(data))
    loader = ref.make_loader(train_dir)
    return [ref.reference_throughput(train_dir, iterations=iterations, loader=loader)["images_per_s"]
            for _ in range(repeats)]


def target_rows(peaks: dict[str, float], train_precision: str, *, reference_images_per_s: float,
                eager_images_per_s: float, resnet20_macs: int, recipes: list[dict],
                train_images: int = 50_000) -> list[dict]:
    """Each target as the FLOP/s it needs (a training image costs 3 x 2 x the forward multiply-adds, an inference
    image 2 x), the peak of the precision it can use, and their ratio (``needs_of_peak`` > 1: out of reach).
    ``recipes``: the time-to-accuracy recipes, each {"name", "macs", "epochs", "budget_s"}."""
    train_peak = peaks[train_precision]
    rows = [{"target": "#3.1 training 5x reference (resnet20)", "precision": train_precision, "peak": train_peak,
             "needs": 5 * reference_images_per_s * 6 * resnet20_macs}]
    rows += [{"target": f"#3.2 `{r['name']}` ({r['epochs']} epochs) in {r['budget_s']:.0f} s",
              "precision": train_precision, "peak": train_peak,
              "needs": r["epochs"] * train_images * 6 * r["macs"] / r["budget_s"]} for r in recipes]
    rows.append({"target": "#7 resnet20 int8 >= 4x fp32 eager", "precision": "int8", "peak": peaks["int8"],
                 "needs": 4 * eager_images_per_s * 2 * resnet20_macs})
    for row in rows:
        row["needs_of_peak"] = row["needs"] / row["peak"]
        row["reachable"] = row["needs_of_peak"] <= 1
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/cifar10", help="CIFAR-10 ImageFolder root (train/<class>/*.jpg)")
    p.add_argument("--reference-iterations", type=int, default=20, help="timed steps per reference repetition")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/peak-bounds.json)")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    load_before, started = loadavg(), time.time()

    peaks = {"fp32": matmul_peak(torch.float32)}
    native_bf16 = cpu_has_fast_bf16()
    if native_bf16:  # emulated bf16 runs at a fraction of fp32 (minutes per matmul): no training precision
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    int8 = int8_matmul_peak()
    peaks["int8"] = max(int8.values())
    train_precision = "bf16" if native_bf16 else "fp32"

    r20_macs = count_macs(create_model("resnet20", num_classes=10), (3, 32, 32))
    recipes = []
    for name, budget_s in RECIPE_BUDGETS.items():
        cfg = resolve_config({}, name)
        recipes.append({"name": name, "epochs": cfg.epochs, "budget_s": budget_s,
                        "macs": count_macs(create_model(cfg.model, num_classes=10, **cfg.model_kwargs), (3, 32, 32))})
    ref_rates = reference_training(args.data, args.reference_iterations, args.repeats)
    ref_rate = median_rate(ref_rates)
    eager = eager_inference(create_model("resnet20", num_classes=10))
    eager_best = max(eager.values())

    rows = target_rows(peaks, train_precision, reference_images_per_s=ref_rate, eager_images_per_s=eager_best,
                       resnet20_macs=r20_macs, recipes=recipes)
    eager_flops = eager_best * 2 * r20_macs
    int8_ceiling = 4 / rows[-1]["needs_of_peak"]  # the int8 row needs 4x eager: the peak allows 4 / that
    print("peaks (G FLOP/s or OP/s): " + ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in peaks.items())
          + "; int8 per engine: " + ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in int8.items()))
    print(f"reference training {ref_rate:,.0f} images/s ({ref_rate * 6 * r20_macs / peaks[train_precision]:.0%} of the "
          f"{train_precision} peak); resnet20 fp32 eager inference {eager_best:,.0f} images/s "
          f"({eager_flops / peaks['fp32']:.0%} of the fp32 peak); int8 ceiling {int8_ceiling:.2f}x fp32 eager")
    table = [{**r, "needs": r["needs"] / 1e9, "peak": r["peak"] / 1e9} for r in rows]
    print(format_table(table, [("target", "target"), ("needs", "needs GFLOP/s"), ("precision", "precision"),
                               ("peak", "peak here"), ("needs_of_peak", "x peak"), ("reachable", "reachable")]))
    result = {
        "threads": threads, "loadavg_before": load_before, "loadavg_after": loadavg(),
        "seconds": round(time.time() - started, 1),
        "peaks_flops": peaks, "int8_peak_per_engine": int8, "native_bf16": native_bf16,
        "macs": {"resnet20": r20_macs, **{r["name"]: r["macs"] for r in recipes}}, "recipes": recipes,
        "reference_training_images_per_s": ref_rates, "resnet20_eager_fp32_images_per_s": eager,
        "int8_over_fp32_eager_ceiling": int8_ceiling, "targets": rows,
    }
    print("written to", write_result("peak-bounds", result, args.out))
    return result


if __name__ == "__main__":
    main()
