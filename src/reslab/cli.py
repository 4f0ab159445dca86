"""The ``reslab`` command: a thin layer that parses flags into config objects and calls the Python API.

Every ``reslab train`` flag is generated from a ``TrainConfig`` field, so the CLI, recipes and the API
cannot drift apart. Other subcommands register themselves in ``COMMANDS`` below.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from reslab.train.config import TrainConfig

# ---------------------------------------------------------------------------------------------------------
# train


def _field_help() -> dict[str, str]:
    """One-line help per TrainConfig field, taken from the comment beside it in config.py."""
    import inspect
    import re

    from reslab.train import config

    helps = {}
    for line in inspect.getsource(config.TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2)
    return helps


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    helps = _field_help()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{helps.get(f.name, '')} (default: {default})"
        hint = hints[f.name]
        if hint is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "model_kwargs":
            p.add_argument("--model-kwargs", dest=f.name, type=json.loads, default=None, metavar="JSON",
                           help="family options as JSON, e.g. '{\"shortcut\": \"B\"}'")
        else:
            p.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a run exactly from its last checkpoint (other flags override its config)")
    p.add_argument("--nproc", type=int, default=None,
                   help="launch N local processes with torchrun (data-parallel; the global batch stays --batch-size)")


def cmd_train(args: argparse.Namespace) -> int:
    from reslab.train import train
    from reslab.train.config import resolve_config

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if args.nproc:
        return _launch_torchrun(args.nproc, args.argv)
    if args.resume:
        from reslab.train.config import coerce_values

        summary = train(resume=args.resume, **coerce_values({k: v for k, v in flags.items() if v is not None}))
    else:
        if flags["recipe"] is None and flags["data"] in (None, "digits"):
            flags["recipe"] = "quick"  # the built-in digits train with the quick recipe unless told otherwise
        cfg = resolve_config(flags)
        summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one summary line for the job
        _print_summary(summary)
    return 0


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command under ``torchrun --standalone --nproc_per_node=N`` (without --nproc)."""
    import subprocess

    if nproc < 1:
        raise ValueError(f"invalid --nproc: must be >= 1, got {nproc}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--nproc launches torchrun itself; do not combine it with torchrun")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True  # and its value
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "reslab", *rest]
    return subprocess.call(cmd)


def _print_summary(summary) -> None:
    final = summary.final
    parts = [f"run: {summary.run_dir}", f"status: {summary.status}", f"steps: {summary.steps}"]
    if "test_top1" in final:
        parts.append(f"test top-1: {100 * final['test_top1']:.2f}%")
    if "val_top1" in final:
        parts.append(f"val top-1: {100 * final['val_top1']:.2f}%")
    parts.append(f"train images/s: {summary.train_images_per_s:.0f}")
    parts.append(f"wall: {summary.wall_seconds:.1f}s")
    print("  ".join(parts))


# ---------------------------------------------------------------------------------------------------------
# models, recipes


def cmd_models(args: argparse.Namespace) -> int:
    from reslab.models import list_models
    from reslab.models.complexity import model_summary

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    rows = [model_summary(n) for n in names]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<22} {'params':>12} {'MACs':>10} {'input':>11}  paper")
    for r in rows:
        c, h, w = r["input_size"]
        print(f"{r['name']:<22} {r['params']:>12,} {_si(r['macs']):>10} {f'{c}x{h}x{w}':>11}  {r['paper']}")
    return 0


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def cmd_recipes(args: argparse.Namespace) -> int:
    import re
    import textwrap

    from reslab.train.config import list_recipes, read_recipe, recipe_description

    if args.name:  # one recipe, whole: what it is for, then its settings
        settings = "\n".join(f"  {k}: {v}" for k, v in read_recipe(args.name).items())
        print(f"{args.name}\n\n{textwrap.fill(recipe_description(args.name), 100)}\n\n{settings}")
        return 0
    names = list_recipes()
    width = max(map(len, names))
    for name in names:
        # The first sentence: a full stop before a capital (so "et al. 2016" does not end it).
        summary = re.split(r"(?<=[.])\s+(?=[A-Z`])", recipe_description(name), maxsplit=1)[0]
        print(f"{name.ljust(width)}  {summary}")
    print("\n`reslab recipes NAME` shows one recipe whole; `reslab train --recipe NAME` trains it.")
    return 0


# ---------------------------------------------------------------------------------------------------------
# eval, predict


def add_retain_memory_flag(p: argparse.ArgumentParser) -> None:
    """``--retain-memory/--no-retain-memory`` of the commands that run inference (train has its own, from
    TrainConfig)."""
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed memory in the process (glibc malloc): batches stop paying page faults; "
                        "eager fp32 ResNets ran ~1.5x faster (docs/performance.md)")


def cmd_eval(args: argparse.Namespace) -> int:
    from reslab.evaluate import evaluate

    r = evaluate(args.run, args.data, split=args.split, device=args.device, batch_size=args.batch_size,
                 amp=args.amp, tta_flip=args.tta_flip, tta_shift=args.tta_shift, out=args.out,
                 retain_memory=args.retain_memory)
    print(f"{r['split']}: top-1 {100 * r['top1']:.2f}%  top-5 {100 * r['top5']:.2f}%  loss {r['loss']:.4f}  "
          f"({r['count']} images)  -> {r['written_to']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from reslab.evaluate import predict

    results = predict(args.run, args.images, topk=args.topk, device=args.device, amp=args.amp,
                      retain_memory=args.retain_memory)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        tops = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"])
        print(f"{r['file']}: {tops}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# wiring


def _build_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (no arguments: the quick default run on digits)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)


def _build_models(sub) -> None:
    p = sub.add_parser("models", help="list registered models with parameters, MACs and paper")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'resnet*'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)


def _build_recipes(sub) -> None:
    p = sub.add_parser("recipes", help="list the shipped training recipes (or show one: reslab recipes NAME)")
    p.add_argument("name", nargs="?", default=None,
                   help="a recipe name or YAML file: print its description and settings")
    p.set_defaults(func=cmd_recipes)


def _build_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run or checkpoint: top-1, top-5, loss, per-class accuracy (JSON)")
    p.add_argument("run", help="run directory, checkpoint folder, or folder written by export/quantize")
    p.add_argument("--data", default=None, help="dataset spec (default: the data the run was trained on)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--tta-flip", action="store_true", help="average over the image and its mirror")
    p.add_argument("--tta-shift", type=int, default=0, metavar="N",
                   help="also average over copies translated by +-N pixels (multi-crop TTA; 0 = off)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast for inference (auto: bf16 where the hardware runs it fast; off: fp32)")
    p.add_argument("--out", default=None, help="JSON output path (default: RUN/eval-<split>.json)")
    add_retain_memory_flag(p)
    p.set_defaults(func=cmd_eval)


def _build_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes for image files, with the model's stored preprocessing")
    p.add_argument("run", help="run directory, checkpoint folder, or folder written by export/quantize")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast for inference (auto: bf16 where the hardware runs it fast; off: fp32)")
    p.add_argument("--json", action="store_true")
    add_retain_memory_flag(p)
    p.set_defaults(func=cmd_predict)


# Each entry adds one subcommand. Feature packages keep their own builders in <package>/commands.py.
COMMANDS = [_build_train, _build_models, _build_recipes, _build_eval, _build_predict]


def _all_commands() -> list:
    from reslab.bench.commands import COMMANDS as bench
    from reslab.deploy.commands import COMMANDS as deploy
    from reslab.evaluate.commands import COMMANDS as evaluate
    from reslab.models.commands import COMMANDS as models
    from reslab.reproduce.commands import COMMANDS as reproduce
    from reslab.transfer.commands import COMMANDS as transfer

    return COMMANDS + models + evaluate + deploy + transfer + bench + reproduce


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reslab", description="Deep residual learning for image recognition.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _all_commands():
        add(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"reslab {version('reslab')}"
    except Exception:
        return "reslab"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `train --nproc`, which re-launches itself
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from reslab.errors import USER_ERRORS

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("RESLAB_DEBUG"):
            raise
        one_line = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
        print(f"reslab {args.command}: error: {one_line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
