"""What `--retain-memory` (glibc malloc thresholds, `reslab.train.engine.retain_freed_memory`) saves, measured
on whole `reslab train` runs, or (``--inference``) on the inference paths of `reslab eval/predict/serve`.

The setting is process-wide, so the two sides cannot share a process: each repetition runs `reslab train`
twice in fresh subprocesses, `--no-retain-memory` then `--retain-memory`, on the same recipe, data and seed,
and records the loop's images/s and wall time (from `summary.json`) with the kernel's account of the child
(page faults, system seconds, peak resident memory, from ``os.wait4``). Medians over the repetitions and their
ratios are printed and written as JSON; both sides end with the same test top-1 (the allocator does not change the arithmetic).

    python benchmarks/retain_memory.py --data /tmp/cifar10 --threads 2 \
        --out benchmarks/results/retain_memory-<machine>-<date>.json

``--inference``: for resnet20 (32x32, batch 64) and resnet50 (224x224, batch 16), freshly initialised (speed
does not depend on the weights), each inference path timed in a fresh process with and without the setting,
alternated: eager fp32 (what `reslab eval` runs without native bf16), reslab's default path
(`inference_runner`, what `reslab predict` and `reslab serve` run: ONNX Runtime fp32 without native bf16,
frozen bf16 TorchScript with it), frozen fp32 TorchScript, and PyTorch int8 (`reslab quantize --runtime
pytorch`). Median images/s of 5 timed stretches of 1.5 s per process, then the median over the repetitions.

    python benchmarks/retain_memory.py --inference --threads 2 \
        --out benchmarks/results/retain_memory-inference-<machine>-<date>.json
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


INFERENCE_MODELS = {"resnet20": (32, 64), "resnet50": (224, 16)}  # name: (image side, batch)
INFERENCE_PATHS = ("eager fp32", "reslab default", "TorchScript fp32", "PyTorch int8")


def inference_sample(model_name: str, path: str, retain: bool, threads: int | None) -> float:
    """Images/s of one inference path in this (fresh) process; runs in the child."""
    import torch

    from reslab.deploy.quantize_torch import quantize_torch
    from reslab.evaluate.inference import fast_inference_model, inference_runner
    from reslab.models import create_model
    from reslab.train.engine import autocast_dtype, retain_freed_memory

    if retain:
        retain_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    side, batch = INFERENCE_MODELS[model_name]
    model = create_model(model_name, num_classes=10).eval()
    x = torch.randn(batch, 3, side, side)
    cpu = torch.device("cpu")
    if path == "eager fp32":
        run = model
    elif path == "reslab default":
        run = inference_runner(model, x, device=cpu, amp_dtype=autocast_dtype(cpu, "auto"))
    elif path == "TorchScript fp32":
        run = fast_inference_model(model, x, bf16=False)
    else:
        run = quantize_torch(model, [torch.randn(batch, 3, side, side) for _ in range(2)])
    rates = []
    with torch.no_grad():
        for _ in range(3):
            run(x)
        for _ in range(5):
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < 1.5:
                run(x)
                count += batch
            rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def inference_main(args) -> None:
    rows: dict[str, dict[str, list[float]]] = {}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for i in range(args.repeats):  # alternated, so drift in the machine's speed hits both alike
        for model_name in INFERENCE_MODELS:
            for path in INFERENCE_PATHS:
                for retain in (False, True):
                    key = f"{model_name} | {path} | {'retained' if retain else 'default glibc malloc'}"
                    cmd = [sys.executable, __file__, "--inference-sample", json.dumps([model_name, path, retain,
                                                                                        args.threads])]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1]
                    rows.setdefault(key, []).append(float(out))
                    print(key, f"{rows[key][-1]:.1f} images/s", flush=True)
    medians = {key: statistics.median(v) for key, v in rows.items()}
    table = []
    for model_name in INFERENCE_MODELS:
        for path in INFERENCE_PATHS:
            base = medians[f"{model_name} | {path} | default glibc malloc"]
            new = medians[f"{model_name} | {path} | retained"]
            table.append({"model": model_name, "path": path, "default_images_per_s": base,
                          "retained_images_per_s": new, "ratio": new / base})
            print(f"{model_name:9s} {path:18s} {base:9.1f} -> {new:9.1f} images/s  x{new / base:.2f}")
    if args.out:
        write_json(args.out, {"benchmark": "retain_memory_inference", "command": " ".join(sys.argv),
                              "started": started, "models": INFERENCE_MODELS, "repeats": args.repeats,
                              "samples": rows, "table": table, "loadavg": os.getloadavg(),
                              "environment": environment_info("cpu")})
        print(f"wrote {args.out}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--inference-sample":  # a child of inference_main
        print(inference_sample(*json.loads(sys.argv[2])))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inference", action="store_true", help="time inference paths instead of training runs")
    p.add_argument("--data", default=None, help="training data (required without --inference)")
    p.add_argument("--recipe", default="fast")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args()
    if args.inference:
        return inference_main(args)
    if not args.data:
        p.error("--data is required (the training runs need data)")
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
