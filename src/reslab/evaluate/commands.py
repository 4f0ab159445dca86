"""`reslab` subcommands of this package: each builder adds one subparser (see reslab.cli).

Handlers stay thin: parse, call the Python API in reslab.evaluate.*, print where the results went.
"""
from __future__ import annotations

import argparse


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _print_figures(result: dict) -> None:
    for f in result.get("figures", []):
        print(f"  figure: {f}")
    print(f"  json:   {result['written_to']}")


# ---------------------------------------------------------------------------------------------------------
# analyze, calibrate


def cmd_analyze(args) -> int:
    from reslab.evaluate.analyze import analyze

    r = analyze(args.run, args.data, split=args.split, out=args.out, device=args.device, top_losses=args.top_losses,
                calibration=not args.no_calibration, val_fraction=args.val_fraction)
    print(f"{r['split']}: accuracy {100 * r['accuracy']:.2f}%  macro F1 {r['macro']['f1']:.4f}  "
          f"({r['count']} images)")
    for p in r["most_confused"][:3]:
        print(f"  confused: {p['true']} -> {p['predicted']} ({p['count']}x)")
    if "calibration" in r:
        c = r["calibration"]
        print(f"  temperature {c['temperature']:.3f} (fitted on {c['fitted_on']['source']}): test ECE "
              f"{100 * c['test_ece_before']:.2f}% -> {100 * c['test_ece_after']:.2f}%")
    _print_figures(r)
    return 0


def _build_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="confusion matrix, per-class P/R/F1, confused pairs, top losses, calibration")
    p.add_argument("run", help="run directory or checkpoint folder")
    p.add_argument("--data", default=None, help="dataset spec (default: the data the run was trained on)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--top-losses", type=int, default=24, help="number of highest-loss images in the grid")
    p.add_argument("--no-calibration", action="store_true", help="skip the calibration part")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of train carved out to fit the temperature when the run has no val split")
    p.add_argument("--out", default=None, help="output folder (default: RUN/analysis)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_analyze)


def cmd_calibrate(args) -> int:
    from reslab.evaluate.calibration import calibrate

    r = calibrate(args.run, args.data, out=args.out, device=args.device, val_fraction=args.val_fraction,
                  n_bins=args.bins, store=not args.no_store)
    print(f"temperature {r['temperature']:.4f} fitted on {r['fitted_on']['source']} ({r['val_count']} images)")
    print(f"  test ECE {100 * r['test_ece_before']:.2f}% -> {100 * r['test_ece_after']:.2f}%   "
          f"NLL {r['test_before']['nll']:.4f} -> {r['test_after']['nll']:.4f}")
    if r["fitted_on"]["source"] != "run_val_split":
        print(f"  note: {r['fitted_on']['note']}")
    _print_figures(r)
    return 0


def _build_calibrate(sub) -> None:
    p = sub.add_parser("calibrate",
                       help="ECE, reliability diagrams, temperature scaling (stored in RUN/calibration.json)")
    p.add_argument("run", help="run directory or checkpoint folder")
    p.add_argument("--data", default=None, help="dataset spec (default: the data the run was trained on)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of train carved out when the run has no val split of its own")
    p.add_argument("--bins", type=int, default=15, help="confidence bins of the ECE (Guo et al. 2017 use 15)")
    p.add_argument("--no-store", action="store_true", help="do not write RUN/calibration.json")
    p.add_argument("--out", default=None, help="output folder (default: RUN/analysis)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_calibrate)


# ---------------------------------------------------------------------------------------------------------
# robustness


def cmd_robustness(args) -> int:
    from reslab.evaluate.robustness import robustness

    corruptions = [c for c in args.corruptions.split(",") if c] if args.corruptions else None
    r = robustness(args.run, args.data, baseline=args.baseline, split=args.split,
                   limit=args.limit if args.limit > 0 else None, corruptions=corruptions,
                   severities=_int_list(args.severities), seed=args.seed, out=args.out, device=args.device)
    print(f"clean error {100 * r['clean_error']:.2f}%  mean corruption error (unnormalised) "
          f"{100 * r['mean_corruption_error_unnormalised']:.2f}%  on {r['images']} images")
    if r["mce"] is not None:
        print(f"  mCE {r['mce']:.1f}  relative mCE {r['relative_mce']:.1f}  (baseline {args.baseline} = 100)")
    _print_figures(r)
    return 0


def _build_robustness(sub) -> None:
    from reslab.evaluate.corruptions import CORRUPTIONS

    p = sub.add_parser("robustness", help="accuracy under 15 corruptions x 5 severities (CIFAR-10-C style), mCE")
    p.add_argument("run", help="run directory or checkpoint folder")
    p.add_argument("--data", default=None, help="dataset spec (default: the data the run was trained on)")
    p.add_argument("--baseline", default=None, metavar="RUN2", help="run whose errors normalise the CE (mCE)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--limit", type=int, default=1000, help="random subset of the split (0: all images)")
    p.add_argument("--corruptions", default=None, help=f"comma-separated subset of: {', '.join(CORRUPTIONS)}")
    p.add_argument("--severities", default="1,2,3,4,5")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and of the corruptions")
    p.add_argument("--out", default=None, help="output folder (default: RUN/analysis)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_robustness)


# ---------------------------------------------------------------------------------------------------------
# explain


def cmd_explain(args) -> int:
    from reslab.evaluate.saliency import explain

    r = explain(args.run, args.images, method=args.method, target=args.target, out=args.out, device=args.device)
    for i in r["images"]:
        print(f"{i['file']}: explained {i['target']} ({100 * i['p_target']:.1f}%), predicted {i['predicted']}")
    _print_figures(r)
    return 0


def _build_explain(sub) -> None:
    from reslab.evaluate.saliency import METHODS

    p = sub.add_parser("explain", help="Grad-CAM / LRP saliency maps of image files, overlaid (one grid)")
    p.add_argument("run", help="run directory or checkpoint folder")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--method", default="gradcam", choices=METHODS)
    p.add_argument("--target", default=None, help="class name to explain (default: the predicted class)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/analysis)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_explain)


# ---------------------------------------------------------------------------------------------------------
# signal, scaling, report


def cmd_signal(args) -> int:
    from reslab.evaluate.signal import signal

    r = signal(args.model, run=args.run, depths=_int_list(args.depths) if args.depths else None,
               batch_size=args.batch_size, seed=args.seed, out=args.out, device=args.device)
    for n in r["nets"]:
        g = n["gradient_rms"]
        print(f"{n['label']:>28} ({n['state']}): gradient RMS stem/last = {g[0] / g[-1]:.3g}")
    _print_figures(r)
    return 0


def _build_signal(sub) -> None:
    p = sub.add_parser("signal", help="per-block activation and gradient norms, plain vs residual, at init")
    p.add_argument("model", nargs="?", default="resnet56", help="resnet<depth> (its plain twin is added)")
    p.add_argument("--run", action="append", default=None,
                   help="also measure this run's trained model (repeatable: a trained plain and residual pair)")
    p.add_argument("--depths", default=None, help="comma-separated depths, e.g. 20,56,110 (default: MODEL's and 110)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: RUN/analysis or runs/signal-MODEL)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_signal)


def cmd_scaling(args) -> int:
    from reslab.evaluate.scaling import scaling

    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("device", args.device),
                                   ("iterations", args.iterations)) if v is not None}
    r = scaling(args.model, args.data, fractions=args.fractions, epochs=args.epochs, recipe=args.recipe,
                seed=args.seed, out=args.out, overrides=overrides)
    _print_figures(r)
    return 0


def _build_scaling(sub) -> None:
    p = sub.add_parser("scaling", help="test accuracy against training-set size (nested stratified subsets)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", default="digits")
    p.add_argument("--fractions", default="0.1,0.2,0.4,0.8,1.0")
    p.add_argument("--epochs", type=int, default=None, help="epochs per fraction (default: the recipe's)")
    p.add_argument("--iterations", type=int, default=None,
                   help="optimiser steps per fraction (overrides --epochs: every subset gets the same steps)")
    p.add_argument("--recipe", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets and of training")
    p.add_argument("--out", default=None, help="output folder (default: runs/scaling-MODEL-DATA)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_scaling)


def cmd_report(args) -> int:
    from reslab.evaluate.report import build_report

    path = build_report(args.run, out=args.out, scaling=args.scaling)
    print(f"report: {path} ({path.stat().st_size / 1e6:.2f} MB, self-contained)")
    return 0


def _build_report(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page: curves, metrics and every analysis of a run")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="HTML path (default: RUN/report.html)")
    p.add_argument("--scaling", action="append", default=None, metavar="DIR",
                   help="also show the results of `reslab scaling --out DIR` (repeatable)")
    p.set_defaults(func=cmd_report)


COMMANDS: list = [_build_analyze, _build_calibrate, _build_robustness, _build_explain, _build_signal,
                  _build_scaling, _build_report]
