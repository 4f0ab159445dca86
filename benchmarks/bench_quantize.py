"""INT8 post-training quantization on the CPU: accuracy and throughput of fp32 eager, bf16 autocast,
ONNX Runtime fp32 and ONNX Runtime int8 (and, with ``--runtime pytorch|auto``, PyTorch int8), measured side by
side in one process (median of repetitions); ``--runtime auto`` also records which int8 runtime it chose.

Two cases, as in docs/deploy.md:
1. resnet20 on CIFAR-10, from a trained run (``reslab train --model resnet20 --data /tmp/cifar10 --epochs 3
   --out /tmp/q-cifar``): top-1 fp32 vs int8 on the 10,000 test images.
2. resnet50 at 224x224, random init (no ImageNet weights offline) with BN statistics re-estimated on 256
   CIFAR-10 training images resized to 224 so activations have realistic ranges; accuracy preservation
   is measured as top-1 *agreement* and relative logit error against fp32 on 200 CIFAR-10 test images
   resized to 224 (there are no labels for 1000 random classes).
3. ``--resnet50-run RUN``: a *trained* resnet50 at 224x224 (no ImageNet weights exist offline; docs/deploy.md
   trains one on the built-in digits, ``reslab train --model resnet50 --data digits --image-size 224 ...``):
   top-1 before/after on that run's test split, as for resnet20.

    python benchmarks/bench_quantize.py --run /tmp/q-cifar --data /tmp/cifar10 [--resnet50-run RUN]

Writes benchmarks/results/quantize-<date>.json stamped with environment_info().
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch

from reslab.deploy.quantize import _split_batches, quantize, quantize_model
from reslab.deploy.prune import recalibrate_batchnorm
from reslab.models import create_model
from reslab.train.rundir import environment_info, write_json


def resnet50_case(data: str, out: Path, repeats: int, calibration_images: int, eval_images: int,
                  runtime: str = "onnxruntime") -> dict:
    from reslab.data import load_data

    splits = load_data(data, progress=False)
    card = {"model": "resnet50", "model_kwargs": {}, "num_classes": 1000, "in_chans": 3, "classes": None,
            "preprocessing": {"channels": 3, "stored_size": list(splits.image_size), "input_size": [224, 224],
                              "mean": list(splits.mean), "std": list(splits.std)}}
    torch.manual_seed(0)
    model = create_model("resnet50")
    bn_batches, _ = _split_batches(splits.train, card, 256, batch_size=32, seed=1)
    recalibrate_batchnorm(model, bn_batches)
    del bn_batches
    calibration, _ = _split_batches(splits.train, card, calibration_images, batch_size=16, seed=2)
    evaluation, _ = _split_batches(splits.test, card, eval_images, batch_size=50, seed=3)
    bench = torch.cat(evaluation)[:16].contiguous()
    report = quantize_model(model, card, out, calibration, evaluation, None, bench_batch=bench,
                            repeats=repeats, min_seconds=2.0, runtime=runtime)
    report["note"] = ("random-init resnet50, BN statistics re-estimated on 256 CIFAR-10 train images at 224; "
                      "accuracy = agreement with fp32 on CIFAR-10 test images resized to 224")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="/tmp/q-cifar", help="trained resnet20 CIFAR-10 run")
    p.add_argument("--data", default="/tmp/cifar10", help="CIFAR-10 ImageFolder (for the resnet50 case)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--bias-correction", action="store_true", help="empirical bias correction of the int8 models")
    p.add_argument("--bias-correction-images", type=int, default=None,
                   help="calibration images used for bias correction (default: all)")
    p.add_argument("--qat-epochs", type=int, default=0,
                   help="quantization-aware fine-tuning epochs before quantizing the trained runs (not the random-init one)")
    p.add_argument("--qat-lr", type=float, default=None, help="peak QAT lr (default: the run's lr / 100)")
    p.add_argument("--qat-images", type=int, default=None, help="training images per QAT epoch (default: all)")
    p.add_argument("--qat-batch-size", type=int, default=None,
                   help="QAT batch size (default: the run's; resnet50 at 224 uses at most 16 to stay within memory)")
    p.add_argument("--resnet50-run", help="a trained resnet50 run at 224x224: top-1 before/after on its test split")
    p.add_argument("--skip", choices=["resnet20", "resnet50", "resnet50-trained"], action="append", default=[])
    p.add_argument("--work", default="/tmp/bench-quantize", help="scratch folder for the model files")
    p.add_argument("--batch-sweep", default="",
                   help="comma-separated batch sizes: also compare every path at its fastest of them (trained runs)")
    p.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "pytorch", "auto"],
                   help="int8 runtime of the cases (pytorch, auto: both int8 runtimes are built and timed; auto "
                        "keeps the faster, as `reslab quantize --runtime auto`)")
    p.add_argument("--tag", default="", help="suffix for the case names in the result file (keeps earlier cases)")
    args = p.parse_args()

    results = {"benchmark": "bench_quantize", "threads": torch.get_num_threads(), "cases": {}}
    work = Path(args.work)
    qat = {"qat_epochs": args.qat_epochs, "qat_lr": args.qat_lr, "qat_images": args.qat_images,
           "qat_batch_size": args.qat_batch_size}
    sweep = [int(b) for b in args.batch_sweep.split(",") if b.strip()]
    if "resnet20" not in args.skip:
        r = quantize(args.run, calibration_images=args.calibration_images, out=work / "resnet20",
                     repeats=args.repeats, min_seconds=1.0, bias_correction=args.bias_correction,
                     bias_correction_images=args.bias_correction_images, batch_sweep=sweep,
                     runtime=args.runtime, **qat)
        r["threads"] = torch.get_num_threads()
        key = "resnet20_cifar10" + ("_qat" if args.qat_epochs else "") + args.tag
        results["cases"][key] = {k: v for k, v in r.items() if k != "environment"}
        _print("resnet20 / CIFAR-10", r)
    if "resnet50" not in args.skip:
        # ONNX Runtime's calibrator keeps every intermediate tensor of every calibration batch in memory:
        # 64 images at 224x224 already take ~5 GB, so resnet50 calibrates on fewer images.
        r = resnet50_case(args.data, work / "resnet50", args.repeats, min(args.calibration_images, 64), 200,
                          runtime=args.runtime)
        results["cases"]["resnet50_224" + args.tag] = {k: v for k, v in r.items() if k != "environment"}
        _print("resnet50 / 224x224", r)
    if args.resnet50_run and "resnet50-trained" not in args.skip:
        r = quantize(args.resnet50_run, calibration_images=min(args.calibration_images, 64),
                     out=work / "resnet50-trained", repeats=args.repeats, min_seconds=2.0,
                     bias_correction=args.bias_correction, bias_correction_images=args.bias_correction_images,
                     batch_sweep=sweep, runtime=args.runtime,
                     **{**qat, "qat_batch_size": min(args.qat_batch_size or 16, 16)})
        r["threads"] = torch.get_num_threads()
        key = "resnet50_224_trained" + ("_qat" if args.qat_epochs else "") + args.tag  # keep earlier figures
        results["cases"][key] = {k: v for k, v in r.items() if k != "environment"}
        _print("resnet50 / 224x224, trained run", r)
    results["environment"] = environment_info("cpu")
    out = Path(__file__).parent / "results" / f"quantize-{dt.date.today().isoformat()}.json"
    if out.is_file():  # cases measured by an earlier invocation the same day (e.g. --skip) are kept
        earlier = json.loads(out.read_text())
        results["cases"] = {**earlier.get("cases", {}), **results["cases"]}
    write_json(out, results)
    print(f"wrote {out}")


def _print(title: str, r: dict) -> None:
    acc = r.get("accuracy", {})
    print(f"== {title}")
    print(json.dumps(acc, indent=1))
    for k, v in r.get("throughput", {}).items():
        print(f"{k:>18}: {v['images_per_s']:8.1f} img/s (min {v['min']:.1f}, max {v['max']:.1f}) "
              f"{r['speedup_vs_fp32_eager'][k]:.2f}x")
    if "best_throughput" in r:
        best = r["best_throughput"]
        for k, v in best["paths"].items():
            print(f"{k:>18}: {v['images_per_s']:8.1f} img/s at its fastest batch ({v['batch_size']}) "
                  f"{best['speedup_vs_fp32_eager'][k]:.2f}x")
    if "selection" in r:
        print(f"--runtime auto chose {r['selection']['chosen']}: {json.dumps(r['selection']['candidates'])}")


if __name__ == "__main__":
    main()
