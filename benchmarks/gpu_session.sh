#!/usr/bin/env bash
# Issue #3, target 3 on a lent GPU machine: `fast-gpu` time to accuracy (3 seeds) on the CIFAR-10 JPEG set.
#
# The lent machine (the `device` tool's `run`) receives the repository and at most 64 MiB in all per call, and
# the JPEG tar is 88 MiB, so it travels in two halves, in two calls made back to back (the machine stays warm
# for about 30 s after a call, and keeps its /tmp while warm):
#
#   here, once:  bash benchmarks/gpu_session.sh split ../shared/data/cifar10-jpeg.tar   # -> .gpu/a, .gpu/b
#   call 1:      run  command="bash benchmarks/gpu_session.sh stash"    carry=[".gpu/a"]
#   call 2:      run  command="bash benchmarks/gpu_session.sh measure"  carry=[".gpu/b"]  timeout_s=540
#   or first:    run  command="bash benchmarks/gpu_session.sh sweep '{\"epochs\": 8}' '{\"epochs\": 12}'"  carry=[".gpu/b"]
#
# `measure` and `sweep` join and check the tar, extract it (once per machine), and run reslab from src/ with the
# machine's own PyTorch (no install: torch, numpy, Pillow, PyYAML, tqdm, safetensors, scipy and scikit-learn are
# already there). `measure` is the claim: `reslab bench time-to-accuracy --recipe fast-gpu` on the test split.
# `sweep` is how to choose the recipe's settings: one seed per JSON of TrainConfig overrides, each trained on a
# 45k/5k split of train (`val_fraction` 0.1) and judged by its validation top-1. Results land in $OUT (the files
# the tool brings back); copy them into benchmarks/results/ and docs/performance.md ("fast-gpu (target 3)").
# Environment: SEEDS (3), WARMUP (30: untimed steps first, so the timed seeds find torch.compile's graphs
# built), SET (`measure` only: a JSON of overrides for `--set`, e.g. '{"epochs": 10}').
set -euo pipefail
cd "$(dirname "$0")/.."
stash=/tmp/reslab-gpu-stash
out=${OUT:-/tmp/reslab-gpu-out}

prepare() {  # the data in /tmp/cifar10 (once per machine), reslab importable from src/, the GPU on record
  if [ ! -d /tmp/cifar10/test ]; then
    [ -f "$stash/part-0" ] || { echo "no $stash/part-0: run 'stash' (call 1) first, within ~30 s" >&2; exit 2; }
    cat "$stash/part-0" .gpu/b/part-1 > /tmp/cifar10-jpeg.tar
    echo "$(cat .gpu/b/sha256)  /tmp/cifar10-jpeg.tar" | sha256sum -c -
    mkdir -p /tmp/cifar10 && tar xf /tmp/cifar10-jpeg.tar -C /tmp/cifar10
  fi
  mkdir -p "$out"
  # a folder of this call's own: a second `measure` or `sweep` on the same warm machine must not find the
  # first one's runs there (reslab refuses to train over an existing run)
  runs=$(mkdir -p /tmp/reslab-runs && mktemp -d /tmp/reslab-runs/XXXXXX)
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" RESLAB_CACHE=/tmp/reslab-cache
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } | tee "$out/gpu.txt"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee -a "$out/gpu.txt"
}

case "${1:-}" in
  split)
    tar_path=${2:?usage: gpu_session.sh split PATH/TO/cifar10-jpeg.tar}
    rm -rf .gpu && mkdir -p .gpu/a .gpu/b
    half=$(( ($(stat -c %s "$tar_path") + 1) / 2 ))
    split -b "$half" -d -a 1 "$tar_path" .gpu/part-
    mv .gpu/part-0 .gpu/a/part-0 && mv .gpu/part-1 .gpu/b/part-1
    sha256sum "$tar_path" | cut -d' ' -f1 > .gpu/b/sha256
    git check-ignore -q .gpu || echo "warning: .gpu is not git-ignored; it would travel in every call" >&2
    du -sh .gpu/a .gpu/b
    ;;
  stash)
    mkdir -p "$stash" && cp .gpu/a/part-0 "$stash/" && ls -l "$stash"
    ;;
  measure)
    prepare
    python3 -m reslab bench time-to-accuracy --recipe fast-gpu --data /tmp/cifar10 --seeds "${SEEDS:-3}" \
        --warmup-iterations "${WARMUP:-30}" ${SET:+--set "$SET"} --runs "$runs/tta" \
        --out "$out/time_to_accuracy_fast-gpu.json" 2>&1 | tee "$out/time_to_accuracy_fast-gpu.log"
    ;;
  sweep)
    shift
    [ $# -gt 0 ] || { echo "usage: gpu_session.sh sweep JSON [JSON ...]  (TrainConfig overrides, one run each)" >&2; exit 2; }
    prepare
    # One process for every candidate: torch.compile's graphs (and cuDNN's choices) built for the first are reused
    # by the next ones of the same shapes instead of being compiled again in a new process. sweep.json is
    # rewritten after each candidate, so a call stopped at its time limit still brings back the finished ones.
    python3 - "$out/sweep.json" "$runs" "${WARMUP:-30}" "$@" <<'PY' 2>&1 | tee "$out/sweep.log"
import json, sys
from reslab.bench.time_to_accuracy import bench_time_to_accuracy, print_time_to_accuracy
from reslab.train.config import coerce_values

out, runs, warmup, *candidates = sys.argv[1:]
rows = []
for i, text in enumerate(candidates, 1):
    overrides = {"val_fraction": 0.1, **coerce_values(json.loads(text))}
    r = bench_time_to_accuracy("fast-gpu", seeds=1, data="/tmp/cifar10", out_root=f"{runs}/{i}",
                               out=f"{runs}/{i}.json", warmup_iterations=int(warmup), **overrides)
    print_time_to_accuracy(r)
    rows.append({"overrides": r["overrides"], "val_top1": r["runs"][0]["val_top1"], "test_top1": r["test_top1_mean"],
                 "train_seconds": r["train_seconds_mean"], "warmup": r["warmup"], "environment": json.load(open(r["path"]))["environment"]})
    json.dump(rows, open(out, "w"), indent=1)
for row in rows:
    print(f"val {row['val_top1']:.4f}  train {row['train_seconds']:.2f} s  {json.dumps(row['overrides'])}")
PY
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
    ;;
esac
