"""Training-step speed of ResNet-9 variants (the `fast` recipe's design choices), side by side in one process.

Each variant is the whitened ResNet-9 at 3/8 width with one option changed (``pool_first``, ``widths``); every
repetition times each variant in turn on the same batch (channels_last, bf16 autocast where the CPU has native
bf16 as with `--amp auto`, the optimizer `reslab train` builds: the `reslab train` step), and the median
images/s and its ratio to the first variant are reported. The last two are the `fast` recipe's net with
`--optimizer muon` (Muon on the conv filters: the Newton-Schulz iterations' cost), and the same with its
whitening biases frozen (what `--whiten-bias-epochs N` does after epoch N: no input gradient for the first
conv); ``--compile`` adds that net under ``torch.compile`` (as `reslab train --compile` runs it) and records
each variant's warm-up time, which for the compiled one is the one-time compilation. Synthetic inputs: speed
does not depend on the pixels.

    python benchmarks/resnet9_variants.py --threads 2 --out benchmarks/results/resnet9_variants-<machine>-<date>.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from reslab.models import create_model
from reslab.models.whitening import fit_data_dependent_init, set_whitening_bias_trainable
from reslab.train.config import TrainConfig
from reslab.train.engine import autocast, autocast_dtype, build_optimizer
from reslab.train.rundir import environment_info, write_json

BASE = {"width": 0.375, "stem": "whiten"}
FAST_NET = {"pool_first": True, "widths": [24, 48, 128, 256]}  # the `fast` recipe's net
VARIANTS = {
    "base (fast recipe before 2026-12-01)": {},
    "pool_first": {"pool_first": True},
    "widths [24, 48, 128, 256]": {"widths": [24, 48, 128, 256]},
    "pool_first + widths [24, 48, 128, 256]": FAST_NET,
    "pool_first + widths [24, 48, 96, 256]": {"pool_first": True, "widths": [24, 48, 96, 256]},
    "pool_first + widths [24, 48, 128, 256], Muon": {**FAST_NET, "optimizer": "muon"},
    "the same, whitening biases frozen (--whiten-bias-epochs, after the first epochs)":
        {**FAST_NET, "optimizer": "muon", "freeze_whiten_bias": True},
}


def make_step(kwargs: dict, x: torch.Tensor, y: torch.Tensor):
    kwargs = dict(kwargs)
    optimizer = kwargs.pop("optimizer", "nesterov")
    compiled = kwargs.pop("compile", False)
    freeze_whiten_bias = kwargs.pop("freeze_whiten_bias", False)
    model = create_model("resnet9", **BASE, **kwargs).to(memory_format=torch.channels_last)
    fit_data_dependent_init(model, torch.randn(512, *x.shape[1:]))
    set_whitening_bias_trainable(model, not freeze_whiten_bias)
    forward = torch.compile(model) if compiled else model
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer, lr=0.01, no_decay_bn_bias=True))
    dtype = autocast_dtype(torch.device("cpu"), "auto")

    def step():
        with autocast(torch.device("cpu"), dtype):
            loss = F.cross_entropy(forward(x), y, label_smoothing=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="steps per timed repetition")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="add the fast recipe's net under torch.compile")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args()
    variants = dict(VARIANTS)
    if args.compile:
        variants["pool_first + widths [24, 48, 128, 256], compiled"] = {**FAST_NET, "compile": True}
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    steps = {name: make_step(kw, x, y) for name, kw in variants.items()}
    warmup_s = {}
    for name, step in steps.items():  # warm-up: oneDNN primitive creation, or compilation
        t = time.perf_counter()
        step(), step()
        warmup_s[name] = time.perf_counter() - t
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():  # interleaved, so drift in the machine's speed hits all alike
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t))
    base = statistics.median(next(iter(rates.values())))
    rows = {name: {"model_kwargs": {k: v for k, v in {**BASE, **variants[name]}.items()
                                    if k not in ("optimizer", "compile", "freeze_whiten_bias")},
                   "optimizer": variants[name].get("optimizer", "nesterov"),
                   "compile": variants[name].get("compile", False),
                   "whiten_bias_frozen": variants[name].get("freeze_whiten_bias", False),
                   "images_per_s": statistics.median(r),
                   "ratio": statistics.median(r) / base, "warmup_s": warmup_s[name], "repetitions": r}
            for name, r in rates.items()}
    for name, row in rows.items():
        print(f"{name:50s} {row['images_per_s']:7.0f} images/s  x{row['ratio']:.2f}  warm-up {row['warmup_s']:.1f} s")
    if args.out:
        write_json(args.out, {"benchmark": "resnet9_variants", "batch_size": args.batch_size, "steps": args.steps,
                              "repeats": args.repeats, "autocast": str(autocast_dtype(torch.device("cpu"), "auto")),
                              "variants": rows, "environment": environment_info("cpu")})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
