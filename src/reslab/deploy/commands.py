"""`reslab` subcommands of this package: each builder adds one subparser (see reslab.cli)."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path


def require_export_extra(command: str) -> None:
    """ONNX export and ONNX Runtime are the optional `export` extra: say how to get them, not a traceback."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"reslab {command} needs {', '.join(missing)}; install with: pip install 'reslab[export]'")


# ---------------------------------------------------------------------------------------------------------
# export


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "onnx":
        require_export_extra("export")
    from reslab.deploy.export import export_model

    card = export_model(args.run, args.format, args.out, args.dynamic_batch, exporter=args.exporter)
    parity = card.get("parity", {}).get("max_abs_diff")
    print(f"wrote {card['path']} (+ model.json)  input {card['input']['shape']}  "
          f"max |logit diff| vs PyTorch: {parity:.2e}")
    _print_next_steps(str(Path(card["path"]).parent))
    return 0


def _print_next_steps(folder: str) -> None:
    """What runs the folder just written (reslab.deploy.artifact)."""
    print(f"run it: reslab eval {folder} | reslab predict {folder} IMAGE... | reslab serve {folder}")


def _build_export(sub) -> None:
    p = sub.add_parser("export", help="export a run's model to ONNX or TorchScript with a JSON card beside it")
    p.add_argument("run", help="run directory or checkpoint folder")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--dynamic-batch", action="store_true", help="leave the batch dimension free (ONNX)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/export)")
    p.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"],
                   help="ONNX exporter: the fast TorchScript-based one or torch.export (dynamo)")
    p.set_defaults(func=cmd_export)


# ---------------------------------------------------------------------------------------------------------
# quantize


def cmd_quantize(args: argparse.Namespace) -> int:
    require_export_extra("quantize")
    from reslab.deploy.quantize import quantize

    r = quantize(args.run, args.data, calibration_images=args.calibration_images, eval_images=args.eval_images,
                 out=args.out, method=args.calibration, bench=not args.no_bench, repeats=args.repeats,
                 bias_correction=args.bias_correction, bias_correction_images=args.bias_correction_images,
                 qat_epochs=args.qat_epochs, qat_lr=args.qat_lr, qat_images=args.qat_images,
                 qat_batch_size=args.qat_batch_size, batch_sweep=args.batch_sweep,
                 reduce_range=args.reduce_range, runtime=args.runtime, torch_engine=args.torch_engine)
    acc = r.get("accuracy", {})
    int8_key = f"int8_{r['runtime']}"
    before = (f"fp32 before QAT {100 * acc['top1_fp32_before_qat']:.2f}%, after "
              if "top1_fp32_before_qat" in acc else "fp32 ")
    print(f"top-1 {before}{100 * acc['top1_fp32']:.2f}%  int8 {100 * acc['top1_int8']:.2f}%  "
          f"(agreement {100 * acc['top1_agreement']:.2f}%, {acc['count']} test images)")
    if "throughput" in r:
        tp = r["throughput"]
        print("images/s: " + "  ".join(f"{k} {v['images_per_s']:.0f}" for k, v in tp.items()) +
              f"  (int8 = {r['speedup_vs_fp32_eager'][int8_key]:.2f}x fp32 eager)")
    if "best_throughput" in r:
        best = r["best_throughput"]
        print("at each path's fastest batch: " + "  ".join(
            f"{k} {v['images_per_s']:.0f} (b{v['batch_size']})" for k, v in best["paths"].items()) +
              f"  (int8 = {best['speedup_vs_fp32_eager'][int8_key]:.2f}x fp32 eager)")
    if "int8_ceiling" in r:
        c = r["int8_ceiling"]
        print(f"int8 ceiling: this CPU multiplies int8 {c['int8_over_fp32_peak']:.1f}x as fast as fp32, so int8 can "
              f"reach at most {c['max_speedup_vs_fp32_eager']:.1f}x fp32 eager for this model")
    if "selection" in r:
        sel = r["selection"]
        print("--runtime auto: " + "  ".join(
            f"{rt} {c['images_per_s']:.0f} img/s" + (f", top-1 {100 * c['top1']:.2f}%" if "top1" in c else "")
            for rt, c in sel["candidates"].items()) + f"  -> {sel['chosen']}")
    print(f"wrote {r['written_to']}/{r['files']['int8']}, model.json, quantize.json")
    _print_next_steps(r["written_to"])
    return 0


def _build_quantize(sub) -> None:
    p = sub.add_parser("quantize",
                       help="static INT8 post-training quantization (ONNX Runtime or PyTorch), with a report")
    p.add_argument("run", help="run directory or checkpoint folder")
    p.add_argument("--data", default=None, help="dataset spec for calibration and test (default: the run's data)")
    p.add_argument("--calibration-images", type=int, default=512, help="training images used for calibration")
    p.add_argument("--calibration", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="how activation ranges are chosen from the calibration images")
    p.add_argument("--bias-correction", action="store_true",
                   help="empirical bias correction of the int8 model (Nagel et al. 2019, sec. 4.2): remove the "
                        "per-channel mean shift quantization causes at every conv; one calibration pass per conv")
    p.add_argument("--bias-correction-images", type=int, default=None,
                   help="calibration images used for bias correction (default: all calibration images)")
    p.add_argument("--qat-epochs", type=int, default=0,
                   help="quantization-aware fine-tuning first: K epochs on the run's training data with int8 "
                        "weights and uint8 activations simulated (fake quantization, straight-through gradients)")
    p.add_argument("--qat-lr", type=float, default=None, help="peak QAT lr, cosine to 0 (default: the run's lr / 100)")
    p.add_argument("--qat-images", type=int, default=None, help="training images per QAT epoch (default: all)")
    p.add_argument("--qat-batch-size", type=int, default=None, help="QAT batch size (default: the run's)")
    p.add_argument("--eval-images", type=int, default=None, help="test images compared (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per throughput (median reported)")
    p.add_argument("--no-bench", action="store_true", help="skip the throughput measurement")
    p.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=None,
                   help="7-bit weights ([-64, 64]); default: on when this CPU lacks VNNI (AVX2, AVX-512 without "
                        "VNNI), whose int8 kernels saturate with full-range weights")
    p.add_argument("--batch-sweep", type=_batch_sizes, default=[], metavar="B1,B2,...",
                   help="also time every path at these batch sizes and compare each at its fastest, e.g. 16,64,256")
    p.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "pytorch", "auto"],
                   help="int8 runtime of the card's model: onnxruntime (model.int8.onnx, portable), pytorch "
                        "(model.int8.pt, TorchScript on PyTorch's int8 kernels; the ONNX Runtime int8 model is "
                        "built too and compared side by side) or auto (both built and timed here; the faster one "
                        "becomes the card's model unless the other is really more accurate: docs/deploy.md)")
    p.add_argument("--torch-engine", default=None, choices=["x86", "onednn"],
                   help="PyTorch's int8 engine for --runtime pytorch|auto (default: x86 on CPUs with VNNI or "
                        "AMX-INT8, onednn without, where it measured 1.5x faster)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/quantized)")
    p.set_defaults(func=cmd_quantize)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes such as 16,64,256, got {text!r}")
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


# ---------------------------------------------------------------------------------------------------------
# prune


def _fractions(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.5 or 0.9,0.7,0.5,0.3, got {text!r}") from None


def cmd_prune(args: argparse.Namespace) -> int:
    from reslab.deploy.prune import prune

    r = prune(args.run, args.target_macs, data=args.data, finetune_epochs=args.finetune_epochs,
              finetune_lr=args.finetune_lr, calibration_images=args.calibration_images, min_keep=args.min_keep,
              round_to=args.round_to, out=args.out, device=args.device, measure_speed=not args.no_bench,
              export_onnx=args.export_onnx, progress=not args.no_progress)
    b = r["baseline"]
    print(f"unpruned: {b['macs'] / 1e6:.2f} M MACs  top-1 {100 * b['top1']:.2f}% "
          f"({100 * b['top1_bn_recalibrated']:.2f}% with BN statistics re-estimated as the pruned nets get"
          + (f", {100 * b['top1_finetuned']:.2f}% after the same fine-tune" if "top1_finetuned" in b else "") + ")")
    for p in r["points"]:
        line = (f"target {p['target_macs']:.2f}: {p['macs_after'] / 1e6:.2f} M MACs ({p['macs_fraction']:.3f})  "
                f"params {p['params_after']:,}  top-1 one-shot {100 * p['top1_oneshot']:.2f}%")
        if "top1_finetuned" in p:
            line += f"  fine-tuned {100 * p['top1_finetuned']:.2f}%"
        if "eager_speedup" in p:
            line += f"  speedup {p['eager_speedup']:.2f}x eager, {p['deployed_speedup']:.2f}x deployed"
        print(line + f"  -> {p['run']}")
    return 0


def _build_prune(sub) -> None:
    p = sub.add_parser("prune", help="one-shot structured channel pruning to a multiply-add budget")
    p.add_argument("run", help="run directory or checkpoint folder")
    p.add_argument("--target-macs", type=_fractions, default=[0.5],
                   help="fraction(s) of the original multiply-adds, e.g. 0.5 or 0.9,0.7,0.5,0.3 (a curve)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune each pruned model for K epochs")
    p.add_argument("--finetune-lr", type=float, default=None, help="peak fine-tune lr (default: the run's lr / 10)")
    p.add_argument("--data", default=None, help="dataset spec (default: the run's data)")
    p.add_argument("--calibration-images", type=int, default=256, help="training images scored and BN-recalibrated on")
    p.add_argument("--min-keep", type=float, default=0.1, help="fraction of each block's channels always kept")
    p.add_argument("--round-to", type=int, default=1,
                   help="keep a multiple of N channels per pruned unit (8 or 16 fill the CPU's SIMD blocks)")
    p.add_argument("--export-onnx", action="store_true", help="also export each pruned model to ONNX (parity checked)")
    p.add_argument("--no-bench", action="store_true", help="skip the speed measurement")
    p.add_argument("--no-progress", action="store_true", help="no fine-tuning progress bar")
    p.add_argument("--device", default="auto", help="device for fine-tuning")
    p.add_argument("--out", default=None, help="output folder (default: RUN/pruned)")
    p.set_defaults(func=cmd_prune)


from reslab.deploy.serve_command import build_serve  # noqa: E402

COMMANDS: list = [_build_export, _build_quantize, _build_prune, build_serve]
