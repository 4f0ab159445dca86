"""Pruned networks side by side: CPU images/s of several runs (an unpruned source and the runs `reslab prune`
made from it, e.g. with and without ``--round-to``), all timed in one process, interleaved, along the two
paths `reslab prune` reports (fp32 eager PyTorch, and the path `reslab predict`/`serve` run on this CPU).

    python benchmarks/bench_pruned.py /tmp/q/r20 /tmp/q/pruned-r1/macs-0.50 /tmp/q/pruned-r8/macs-0.50 \
        --data /tmp/cifar10 --threads 2 --out benchmarks/results/pruned-speed.json

Speedups are against the first run. Writes JSON stamped with environment_info() and prints a table.
"""
from __future__ import annotations

import argparse

import torch

from reslab.bench import format_table, loadavg, set_threads, write_result
from reslab.deploy.prune import inner_channels_of, time_models
from reslab.deploy.quantize import _split_batches
from reslab.evaluate.evaluate import load_data_for_model
from reslab.models import count_macs
from reslab.train.checkpoint import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (the first is the reference of the speedups)")
    p.add_argument("--data", default=None, help="dataset spec for the timed batch (default: the first run's data)")
    p.add_argument("--batch", type=int, default=64, help="images per timed batch")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repetitions; medians are reported")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/pruned-speed.json")
    args = p.parse_args()

    threads = set_threads(args.threads)
    load_before = loadavg()
    models, cards = {}, {}
    for run in args.runs:
        models[run], cards[run] = load_model(run, device="cpu")
    first = cards[args.runs[0]]
    batches, _ = _split_batches(load_data_for_model(first, args.data).test, first, args.batch, batch_size=args.batch)
    x = batches[0].contiguous()
    h, w = first["preprocessing"]["input_size"]
    speed = time_models(models, x, repeats=args.repeats)
    base = speed[args.runs[0]]
    rows = []
    for run in args.runs:
        s = speed[run]
        rows.append({"run": run, "macs_m": count_macs(models[run], (first["in_chans"], h, w)) / 1e6,
                     "inner_channels": inner_channels_of(models[run]),
                     **s, "eager_speedup": s["eager_images_per_s"] / base["eager_images_per_s"],
                     "deployed_speedup": s["deployed_images_per_s"] / base["deployed_images_per_s"]})
    print(format_table(rows, [("run", "run"), ("macs_m", "M MACs"), ("eager_images_per_s", "eager img/s"),
                              ("eager_speedup", "x"), ("deployed_images_per_s", "deployed img/s"),
                              ("deployed_speedup", "x")]))
    path = write_result("pruned-speed", {"batch": x.shape[0], "repeats": args.repeats, "torch_threads": threads,
                                         "rows": rows, "loadavg_before": load_before, "loadavg_after": loadavg()},
                        args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
