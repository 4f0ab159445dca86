"""`reslab bench train|infer|data|time-to-accuracy` (see reslab.cli): parse, call reslab.bench, print."""
from __future__ import annotations

import argparse
import json

DEFAULT_DATA = "/tmp/cifar10"
TIMING_NOTE = ("Timings: set OMP_NUM_THREADS (and MKL_NUM_THREADS) or --threads for the cores you mean to use; "
               "results go to benchmarks/results/<name>.json unless --out is given.")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: PyTorch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians are reported")
    p.add_argument("--out", default=None, help="JSON result path (default benchmarks/results/<name>.json)")


def cmd_bench_train(args: argparse.Namespace) -> int:
    from reslab.bench.train_speed import LOOP_CONFIGS, ablation_variants, bench_train, print_train
    from reslab.train.engine import cpu_has_fast_bf16

    configs = dict(LOOP_CONFIGS)
    if args.compile:
        configs["reslab fast + compile (b512)"] = {"batch_size": 512, "compile": True}
    variants = ablation_variants(cpu_has_fast_bf16(), compile=args.compile)
    result = bench_train(args.data, model=args.model, iterations=args.iterations, repeats=args.repeats,
                         reference_iterations=args.reference_iterations, reference_workers=args.workers,
                         ablation=None if args.no_ablation else variants,
                         ablation_images=args.ablation_images,
                         configs=configs, reference=args.reference, threads=args.threads, out=args.out,
                         isolate=not args.in_process)
    print_train(result)
    return 0


def cmd_bench_infer(args: argparse.Namespace) -> int:
    from reslab.bench.infer_speed import MODELS, bench_infer, print_infer

    models = {m: MODELS[m] if m in MODELS else 224 for m in args.models}
    result = bench_infer(models=models, batch=args.batch, repeats=args.repeats, run=args.run, data=args.data,
                         check_count=args.check_images, compile=args.compile, threads=args.threads, out=args.out)
    print_infer(result)
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    from reslab.bench.data_speed import bench_data, print_data

    result = bench_data(args.data, workers=args.workers, repeats=args.repeats, batch_size=args.batch_size,
                        loader_images=args.loader_images, reference_images=args.reference_images,
                        threads=args.threads, out=args.out)
    print_data(result)
    return 0


def cmd_bench_tta(args: argparse.Namespace) -> int:
    from reslab.bench.time_to_accuracy import bench_time_to_accuracy, print_time_to_accuracy
    from reslab.train.config import coerce_values

    overrides = coerce_values(json.loads(args.set)) if args.set else {}
    result = bench_time_to_accuracy(args.recipe, seeds=args.seeds, data=args.data, out_root=args.runs,
                                    threads=args.threads, out=args.out, warmup_iterations=args.warmup_iterations,
                                    **overrides)
    print_time_to_accuracy(result)
    return 0


def _build_bench(sub) -> None:
    p = sub.add_parser("bench", help="speed benchmarks against the standard PyTorch pipeline",
                       description="Speed benchmarks, reslab and its reference measured side by side in one run. "
                                   + TIMING_NOTE)
    bench = p.add_subparsers(dest="bench_command", metavar="{train,infer,data,time-to-accuracy}", required=True)

    t = bench.add_parser("train", help="training images/s: reslab's loop vs torchvision ImageFolder+DataLoader")
    t.add_argument("--data", default=DEFAULT_DATA, help="ImageFolder root with train/ (and test/)")
    t.add_argument("--model", default="resnet20")
    t.add_argument("--iterations", type=int, default=30, help="timed steps of reslab's loop per repetition")
    t.add_argument("--reference-iterations", type=int, default=30, help="timed steps of the reference")
    t.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    t.add_argument("--compile", action="store_true",
                   help="also time the loop and the step with torch.compile (minutes to build)")
    t.add_argument("--no-ablation", action="store_true", help="skip the one-change-at-a-time table")
    t.add_argument("--ablation-images", type=int, default=2048, help="images timed per ablation variant")
    t.add_argument("--reference", default=None, help="path of reference_pipeline.py (default: benchmarks/)")
    t.add_argument("--in-process", action="store_true",
                   help="time both sides in this process instead of a fresh process per sample (reslab's "
                        "allocator setting then also speeds up the reference)")
    _common(t)
    t.set_defaults(func=cmd_bench_train)

    i = bench.add_parser("infer", help="batch-1 latency and batch-32 throughput: eager, ONNX Runtime, reslab")
    i.add_argument("--models", nargs="+", default=["resnet20", "resnet50"])
    i.add_argument("--batch", type=int, default=32)
    i.add_argument("--run", default=None, help="a trained run directory for the 32x32 model's accuracy check")
    i.add_argument("--data", default=None, help="real images for the agreement check (default: the run's data)")
    i.add_argument("--check-images", type=int, default=1000, help="images in the agreement check")
    i.add_argument("--compile", action="store_true", help="also time torch.compile (inductor, freezing)")
    _common(i)
    i.set_defaults(func=cmd_bench_infer, repeats=5)

    d = bench.add_parser("data", help="decode time into a fresh cache, then augmented images/s of the loader")
    d.add_argument("--data", default=DEFAULT_DATA)
    d.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    d.add_argument("--batch-size", type=int, default=512)
    d.add_argument("--loader-images", type=int, default=50_000, help="images timed per loader repetition")
    d.add_argument("--reference-images", type=int, default=2048, help="images timed for the torchvision loader")
    _common(d)
    d.set_defaults(func=cmd_bench_data)

    a = bench.add_parser("time-to-accuracy", help="train a recipe with several seeds; time and test accuracy")
    a.add_argument("--recipe", default="fast", help="fast | fast94 | fast-gpu | any recipe name or YAML")
    a.add_argument("--seeds", type=int, default=3)
    a.add_argument("--data", default=DEFAULT_DATA)
    a.add_argument("--runs", default=None, help="keep the run directories here (default: a temporary folder)")
    a.add_argument("--set", default=None, metavar="JSON", help="TrainConfig overrides, e.g. '{\"epochs\": 1}'")
    a.add_argument("--warmup-iterations", type=int, default=0, metavar="N",
                   help="an untimed run of N steps first, so the timed seeds find torch.compile's graphs built "
                        "(default 0: seed 0 then includes compilation)")
    _common(a)
    a.set_defaults(func=cmd_bench_tta)


COMMANDS: list = [_build_bench]
