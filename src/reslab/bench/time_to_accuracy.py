"""``reslab bench time-to-accuracy``: train a shipped recipe with several seeds through ``reslab.train.train``
(the ordinary loop, nothing special-cased) and report the training time and the test accuracy of each seed,
their mean, and whether the recipe's target was met.

Targets (Issue #3): ``fast`` 90 % CIFAR-10 test accuracy in at most 5 minutes of training on a 2-core CPU,
``fast94`` 94 % in at most 30 minutes; ``fast-gpu`` aims at 94 % on one GPU (airbench94's territory).
Training time is the loop's own ``train_seconds`` (data loading and the whitening fit included, evaluation
excluded); wall time (everything: cache read, set-up, evaluation, checkpoints) is reported next to it.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from reslab.bench import format_table, loadavg, set_threads, write_result

# recipe -> (target test top-1, time budget in seconds on the reference hardware)
TARGETS = {"fast": (0.90, 300.0), "fast94": (0.94, 1800.0), "fast-gpu": (0.94, None)}


def run_seed(recipe: str, seed: int, *, data: str | None, out_root: Path, **overrides) -> dict[str, Any]:
    from reslab.train import train
    from reslab.train.config import resolve_config
    from reslab.train.rundir import read_jsonl

    flags = {"seed": seed, "out": str(out_root / f"seed{seed}"), "progress": False, **overrides}
    if data is not None:
        flags["data"] = data
    cfg = resolve_config(flags, recipe)
    summary = train(cfg)
    records = read_jsonl(Path(summary.run_dir) / "metrics.jsonl")
    # The epochs' own time plus any data-dependent initialisation before step 0 (the whitening fit).
    train_seconds = sum(r.get("seconds", 0.0) for r in records) + summary.init_seconds
    return {"seed": seed, "test_top1": summary.final.get("test_top1"), "val_top1": summary.final.get("val_top1"),
            "train_seconds": train_seconds, "init_seconds": summary.init_seconds,
            "wall_seconds": summary.wall_seconds,
            "train_images_per_s": summary.train_images_per_s, "epochs": summary.epochs_done, "steps": summary.steps,
            "run_dir": summary.run_dir,
            "curve": [{k: r.get(k) for k in ("epoch", "seconds", "test_top1", "val_top1", "train_loss")}
                      for r in records]}


def bench_time_to_accuracy(recipe: str = "fast", *, seeds: int = 3, data: str | None = None,
                           out_root: str | None = None, threads: int | None = None, out: str | None = None,
                           warmup_iterations: int = 0, **overrides) -> dict[str, Any]:
    """Train ``recipe`` with seeds 0..seeds-1 and summarise; ``overrides`` are TrainConfig values
    (e.g. ``epochs=1`` for a smoke test).

    ``warmup_iterations``: first an untimed run of that many steps in this process (seed 0, its own folder), so
    that the timed seeds find ``torch.compile``'s graphs built (dynamo reuses them for every new instance of the
    same network) and cuDNN's algorithm choices made, as airbench times its runs after a warm-up run. With 0,
    a compiling recipe's seed 0 pays for compilation and the later seeds do not."""
    if warmup_iterations < 0:
        raise ValueError(f"--warmup-iterations must be >= 0, got {warmup_iterations}")
    threads_used = set_threads(threads)
    load_before = loadavg()
    runs, warmup = [], None
    with tempfile.TemporaryDirectory(prefix="reslab-tta-") as tmp:
        root = Path(out_root) if out_root else Path(tmp)
        if warmup_iterations:
            w = run_seed(recipe, 0, data=data, out_root=root / "warmup", threads=threads,
                         **{**overrides, "iterations": warmup_iterations})
            warmup = {"iterations": w["steps"], "wall_seconds": w["wall_seconds"], "run_dir": w["run_dir"]}
        for seed in range(seeds):
            runs.append(run_seed(recipe, seed, data=data, out_root=root, threads=threads, **overrides))
    target, budget = TARGETS.get(recipe, (None, None))
    accs = [r["test_top1"] for r in runs]
    times = [r["train_seconds"] for r in runs]
    result = {
        "recipe": recipe, "data": data, "seeds": seeds, "overrides": overrides, "warmup": warmup, "runs": runs,
        "test_top1_mean": statistics.mean(accs), "test_top1_std": statistics.pstdev(accs),
        "train_seconds_mean": statistics.mean(times),
        "wall_seconds_mean": statistics.mean(r["wall_seconds"] for r in runs),
        "target_top1": target, "budget_seconds": budget,
        "met": None if target is None or budget is None else bool(statistics.mean(accs) >= target
                                                                   and max(times) <= budget),
        "torch_threads": threads_used, "loadavg_before": load_before, "loadavg_after": loadavg(),
    }
    result["path"] = str(write_result(f"time_to_accuracy_{recipe}", result, out))
    return result


def print_time_to_accuracy(result: dict) -> None:
    print(f"recipe {result['recipe']} on {result['data']}, {result['seeds']} seeds, {result['torch_threads']} threads; "
          f"load average {result['loadavg_before']} -> {result['loadavg_after']}")
    if result.get("warmup"):
        print(f"untimed warm-up run first: {result['warmup']['iterations']} steps, "
              f"{result['warmup']['wall_seconds']:.1f} s")
    val = [("val_top1", "val top-1")] if any(r.get("val_top1") is not None for r in result["runs"]) else []
    print(format_table(result["runs"], [("seed", "seed"), *val, ("test_top1", "test top-1"),
                                        ("train_seconds", "train s"), ("wall_seconds", "wall s"),
                                        ("train_images_per_s", "img/s"), ("epochs", "epochs")]))
    verdict = {True: "met", False: "NOT met", None: "no CPU target"}[result["met"]]
    target = f"{result['target_top1']:.0%}" if result["target_top1"] else "-"
    budget = f"{result['budget_seconds']:.0f} s" if result["budget_seconds"] else "-"
    print(f"\nmean test top-1 {result['test_top1_mean']:.4f} ± {result['test_top1_std']:.4f}, mean training time "
          f"{result['train_seconds_mean']:.0f} s; target {target} in {budget}: {verdict}")
    print(f"written to {result['path']}")
