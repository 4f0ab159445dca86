"""Training-technique experiments on a small CIFAR-10 budget: guidance, stochastic depth, gradient noise,
pre-activation. Writes ``benchmarks/results/techniques.json`` and ``docs/figures/techniques/test_error.png``.

Every run is a plain ``reslab train`` subprocess on top of the ``he2016-cifar`` recipe (He et al. 2016, §4.2)
with one identical, deliberately tiny budget inside each experiment (see ``--help``); runs go one at a time,
and a run whose ``summary.json`` says ``finished`` is skipped, so the script can be stopped and restarted
(an unfinished run continues from its last checkpoint through ``--auto-resume``).

    python benchmarks/techniques.py                      # the whole grid, then table + figure
    python benchmarks/techniques.py --report-only        # table + figure from the runs that exist

The data is a fixed, class-balanced subset of the CIFAR-10 JPEG ImageFolder (the first N files per class in
sorted order, as symlinks), so every evaluation on a loaded 2-core CPU stays short; see docs/techniques.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "techniques.json"
FIGURE = REPO / "docs" / "figures" / "techniques" / "test_error.png"
TRAINED_GUIDE = Path("/tmp/repro/he2016/runs/resnet56-seed0")

EXPERIMENTS = {
    "guidance": "plain56 vs CKA-guided plain56 vs resnet56",
    "stochastic_depth": "resnet110 with and without stochastic depth (p_L = 0.5)",
    "gradient_noise": "plain56 with and without gradient noise",
    "preact": "preact_resnet56 vs resnet56",
}


def make_subset(source: Path, dest: Path, train_per_class: int, test_per_class: int) -> Path:
    """A class-balanced ImageFolder of symlinks: the first files of each class in sorted order."""
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for class_dir in sorted((source / split).iterdir()):
            if not class_dir.is_dir():
                continue
            out = dest / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            wanted = sorted(p.name for p in class_dir.iterdir())[:per_class]
            for name in wanted:
                link = out / name
                if not link.exists():
                    link.symlink_to(class_dir / name)
    return dest


def grid(trained_guide: bool) -> list[dict]:
    """(name, experiments it belongs to, extra flags, budget key). Ordered so the most informative runs
    come first: a time-boxed session drops the tail."""
    runs = [
        dict(name="plain56", experiments=["guidance", "gradient_noise"], model="plain56", flags=[]),
        dict(name="resnet56", experiments=["guidance", "preact"], model="resnet56", flags=[]),
        dict(name="plain56-guide-untrained", experiments=["guidance"], model="plain56",
             flags=["--guide", "resnet56", "--guide-weight", "1.0"]),
        dict(name="preact_resnet56", experiments=["preact"], model="preact_resnet56", flags=[]),
        dict(name="plain56-gradnoise-0.01", experiments=["gradient_noise"], model="plain56",
             flags=["--grad-noise", "0.01", "--grad-noise-gamma", "0.55"]),
        dict(name="plain56-gradnoise-0.3", experiments=["gradient_noise"], model="plain56",
             flags=["--grad-noise", "0.3", "--grad-noise-gamma", "0.55"]),
        dict(name="plain56-gradnoise-1.0", experiments=["gradient_noise"], model="plain56",
             flags=["--grad-noise", "1.0", "--grad-noise-gamma", "0.55"]),
        dict(name="resnet110", experiments=["stochastic_depth"], model="resnet110", flags=[]),
        dict(name="resnet110-stochdepth-0.5", experiments=["stochastic_depth"], model="resnet110",
             flags=["--drop-path-rate", "0.5"]),
    ]
    if trained_guide:
        runs.insert(3, dict(name="plain56-guide-trained", experiments=["guidance"], model="plain56",
                            flags=["--guide", str(TRAINED_GUIDE), "--guide-weight", "1.0"]))
    return runs


def guide_finished() -> bool:
    try:
        return json.loads((TRAINED_GUIDE / "summary.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def budget_flags(iterations: int, batch_size: int, schedule: str = "step") -> list[str]:
    """The he2016-cifar recipe shrunk. ``step``: lr / 10 at 50% and 75% of the iterations (32k/48k of 64k).
    ``onecycle``: linear warm-up over the first quarter, then linear decay to 0 (lr 0.1 from step 0
    did not leave chance level within 120 iterations; see docs/techniques.md)."""
    if schedule == "step":
        sched = ["--milestones", f"{iterations // 2},{iterations * 3 // 4}"]
    else:
        sched = ["--schedule", "onecycle", "--warmup-iters", str(iterations // 4)]
    return ["--recipe", "he2016-cifar", "--iterations", str(iterations), "--batch-size", str(batch_size),
            *sched, "--eval-every", "1", "--seed", "0", "--no-progress"]


def command(run: dict, data: Path, out: Path, iterations: int, batch_size: int, schedule: str) -> list[str]:
    return ["reslab", "train", "--model", run["model"], "--data", str(data),
            *budget_flags(iterations, batch_size, schedule),
            *run["flags"], "--out", str(out), "--auto-resume"]


def finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def collect(run: dict, run_dir: Path, cmd: list[str], iterations: int, batch_size: int, schedule: str) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = records[-1]
    return {
        "name": run["name"], "model": run["model"], "experiments": run["experiments"],
        "iterations": iterations, "batch_size": batch_size, "schedule": schedule, "seed": summary["seed"],
        "final_train_error": 1 - last["train_top1"],  # running mean over the last epoch, train mode, augmented
        "final_train_loss": last["train_loss"],
        "test_error": 1 - summary["final"]["test_top1"],
        "test_loss": summary["final"]["test_loss"],
        "wall_seconds": summary["wall_seconds"],
        "train_images_per_s": summary["train_images_per_s"],
        "params": summary["params"],
        "curve": [{"step": r["step"], "train_error": 1 - r["train_top1"],
                   "test_error": 1 - r["test_top1"] if "test_top1" in r else None} for r in records],
        "run_dir": str(run_dir),
        "command": " ".join(cmd),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharey=True)
    for ax, (exp, title) in zip(axes.flat, EXPERIMENTS.items()):
        members = [r for r in results if exp in r["experiments"]]
        for i, r in enumerate(members):
            colour = f"C{i}"
            steps = [c["step"] for c in r["curve"] if c["test_error"] is not None]
            test = [100 * c["test_error"] for c in r["curve"] if c["test_error"] is not None]
            ax.plot(steps, test, "o-", color=colour, label=f"{r['name']} (test)")
            ax.plot([c["step"] for c in r["curve"]], [100 * c["train_error"] for c in r["curve"]], "--",
                    color=colour, alpha=0.5, linewidth=1)
        ax.axhline(90, color="grey", linestyle=":", linewidth=1)  # chance level, 10 classes
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("error (%)  solid: test, dashed: train")
        ax.grid(alpha=0.3)
        if members:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    budgets = sorted({(r["iterations"], r["batch_size"], r["schedule"]) for r in results})
    fig.suptitle("CIFAR-10 subset, seed 0, tiny budget (" + "; ".join(f"{i} it x {b}, {s}" for i, b, s in budgets)
                 + "): trends only", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="/tmp/cifar10", help="CIFAR-10 JPEG ImageFolder (train/, test/)")
    p.add_argument("--work", default="/tmp/techniques", help="subset folder and run directories go here")
    p.add_argument("--train-per-class", type=int, default=256)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--iterations", type=int, default=120, help="guidance / gradient-noise / preact runs")
    p.add_argument("--sd-iterations", type=int, default=None,
                   help="stochastic-depth (resnet110) runs; default: --iterations")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--schedule", choices=("step", "onecycle"), default="onecycle")
    p.add_argument("--only", nargs="*", help="run only these run names")
    p.add_argument("--report-only", action="store_true", help="do not train; report the finished runs")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON result path")
    p.add_argument("--figure", type=Path, default=FIGURE, help="figure path")
    args = p.parse_args(argv)

    work = Path(args.work)
    data = work / f"cifar10-sub-{args.train_per_class}-{args.test_per_class}"
    if not args.report_only:
        make_subset(Path(args.source), data, args.train_per_class, args.test_per_class)
    use_trained = guide_finished()
    results, skipped = [], []
    for run in grid(use_trained):
        iterations = (args.sd_iterations or args.iterations) if "stochastic_depth" in run["experiments"] \
            else args.iterations
        tag = f"it{iterations}-bs{args.batch_size}" + ("" if args.schedule == "step" else f"-{args.schedule}")
        run_dir = work / "runs" / tag / run["name"]
        cmd = command(run, data, run_dir, iterations, args.batch_size, args.schedule)
        selected = not args.only or run["name"] in args.only
        if not finished(run_dir) and selected and not args.report_only:
            print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
            # OMP_NUM_THREADS=1: the machine is shared; one intra-op thread per training; pass OMP_NUM_THREADS explicitly to change it.
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            rc = subprocess.run(cmd, cwd=work, env=env).returncode
            if rc != 0:
                print(f"run {run['name']} failed with exit code {rc}", file=sys.stderr)
        if finished(run_dir):
            results.append(collect(run, run_dir, cmd, iterations, args.batch_size, args.schedule))
            r = results[-1]
            print(f"  {r['name']:<28} train err {100 * r['final_train_error']:5.1f}%  test err "
                  f"{100 * r['test_error']:5.1f}%  wall {r['wall_seconds']:6.0f}s  {r['train_images_per_s']:5.1f} img/s",
                  flush=True)
        else:
            skipped.append(run["name"])

    sys.path.insert(0, str(REPO / "src"))
    from reslab.train.rundir import environment_info, write_json

    write_json(args.results, {
        "benchmark": "techniques",
        "date": time.strftime("%Y-%m-%d"),
        "data": {"source": args.source, "subset": str(data), "train_per_class": args.train_per_class,
                 "test_per_class": args.test_per_class},
        "budget": {"recipe": "he2016-cifar", "iterations": args.iterations,
                   "sd_iterations": args.sd_iterations or args.iterations, "batch_size": args.batch_size,
                   "schedule": args.schedule, "seed": 0},
        "trained_guide_used": use_trained,
        "not_run": skipped,
        "runs": results,
        "environment": environment_info("cpu"),
    })
    if results:
        plot(results, args.figure)
    print(f"wrote {args.results}" + (f" and {args.figure}" if results else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
