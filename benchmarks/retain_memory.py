"""What `--retain-memory` (glibc malloc thresholds, `reslab.train.engine.retain_freed_memory`) saves, measured
on whole `reslab train` runs.

The setting is process-wide, so the two sides cannot share a process: each repetition runs `reslab train`
twice in fresh subprocesses, `--no-retain-memory` then `--retain-memory`, on the same recipe, data and seed,
and records the loop's images/s and wall time (from `summary.json`) with the kernel's account of the child
(page faults, system seconds, peak resident memory, from ``os.wait4``). Medians over the repetitions and their
ratios are printed and written as JSON; both sides end with the same test top-1 (the allocator does not change the arithmetic).

    python benchmarks/retain_memory.py --data /tmp/cifar10 --threads 2 \
        --out benchmarks/results/retain_memory-<machine>-<date>.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reslab.train.rundir import environment_info, write_json


def run_once(args, retain: bool, out: Path) -> dict:
    flag = "--retain-memory" if retain else "--no-retain-memory"
    cmd = [sys.executable, "-m", "reslab", "train", "--recipe", args.recipe, "--data", args.data,
           "--iterations", str(args.iterations), "--no-progress", "--out", str(out), flag]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would sum them)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit status {child.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    return {"train_images_per_s": summary["train_images_per_s"], "wall_s": summary["wall_seconds"],
            "test_top1": summary["final"].get("test_top1"), "page_faults": usage.ru_minflt,
            "system_s": usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--recipe", default="fast")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args()
    rows: dict[str, list[dict]] = {"default glibc malloc": [], "retained": []}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # alternated, so drift in the machine's speed hits both alike
            for name, retain in (("default glibc malloc", False), ("retained", True)):
                rows[name].append(run_once(args, retain, Path(tmp) / f"{i}-{retain}"))
                print(name, rows[name][-1], flush=True)
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in ("train_images_per_s", "wall_s",
                                                                            "page_faults", "system_s", "peak_rss_mib")}
               for name, runs in rows.items()}
    base, new = medians["default glibc malloc"], medians["retained"]
    ratios = {"train_images_per_s": new["train_images_per_s"] / base["train_images_per_s"],
              "wall_s": base["wall_s"] / new["wall_s"]}
    for name, m in medians.items():
        print(f"{name:22s} {m['train_images_per_s']:7.0f} images/s  wall {m['wall_s']:6.1f} s  "
              f"{m['page_faults']:9.0f} page faults  system {m['system_s']:5.1f} s  peak {m['peak_rss_mib']:5.0f} MiB")
    print(f"retained / default: step speed x{ratios['train_images_per_s']:.2f}, wall time x{ratios['wall_s']:.2f}")
    if args.out:
        write_json(args.out, {"benchmark": "retain_memory", "command": " ".join(sys.argv), "started": started,
                              "recipe": args.recipe, "iterations": args.iterations, "repeats": args.repeats,
                              "runs": rows, "medians": medians, "ratios": ratios,
                              "loadavg": os.getloadavg(), "environment": environment_info("cpu")})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
