"""Crash-proof runs: a training process killed with SIGKILL at random moments and restarted with
``--auto-resume`` ends with exactly the weights of an uninterrupted run; logs survive torn writes."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from reslab.cli import main
from reslab.train.rundir import JsonlLog, read_jsonl

# 5 steps an epoch (12 % of digits, batch 32), 8 epochs; the quick recipe otherwise (augmentation, one-cycle).
FLAGS = ["--data", "digits", "--train-fraction", "0.12", "--batch-size", "32", "--epochs", "8", "--threads", "1",
         "--image-size", "8", "--amp", "off", "--device", "cpu", "--deterministic", "--no-progress", "--seed", "3"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "RESLAB_CACHE": str(tmp_path / "cache")}


def _checkpoint_step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoints" / "last" / "manifest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _wait_for_new_checkpoint(run: Path, proc: subprocess.Popen, after_step: int) -> tuple[int, float]:
    """Poll until ``run``'s last checkpoint is newer than ``after_step`` (or the process ends); returns the new
    step and the time it was seen."""
    deadline = time.time() + 120
    step = _checkpoint_step(run)
    while step <= after_step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
        step = _checkpoint_step(run)
    return step, time.time()


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_weights(tmp_path):
    reference = tmp_path / "reference"
    assert main(["train", *FLAGS, "--out", str(reference)]) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "reslab", "train", *FLAGS, "--auto-resume", "--out", str(out)]
    rng = random.Random(0)
    kills, launches = 0, 0
    while True:
        launches += 1
        assert launches <= 12, "the run never finished"
        proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if kills < 3:
            # Let this launch save two new checkpoints (so the run progresses and the epoch's duration is
            # measured on this machine), then kill it at a random moment of the following epoch: mid-step,
            # mid-evaluation or mid-save. A fixed sleep would overshoot to the end of the run on a fast machine.
            first = _wait_for_new_checkpoint(out, proc, _checkpoint_step(out))
            second = _wait_for_new_checkpoint(out, proc, first[0])
            time.sleep(rng.uniform(0.0, max(second[1] - first[1], 0.02)))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        stdout, stderr = proc.communicate(timeout=180)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    assert kills >= 2

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 40
    for name in ("last", "best"):
        a = load_file(reference / "checkpoints" / name / "model.safetensors")
        b = load_file(out / "checkpoints" / name / "model.safetensors")
        different = [k for k in a if not (a[k] == b[k]).all()]
        assert not different, f"{name}: {different[:5]}"
    # Everything logged survived: each epoch is there (an epoch redone after a kill may appear twice).
    epochs = [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")]
    assert set(epochs) == set(range(1, 9)) and epochs == sorted(epochs)


def test_resume_from_a_truncated_last_checkpoint_falls_back_and_finishes(tmp_path):
    """A run whose ``checkpoints/last`` weights were truncated resumes from ``last.prev`` (one epoch earlier),
    with a warning, redoes that epoch and ends with the step count of the longer schedule."""
    flags = [f for f in FLAGS]
    flags[flags.index("--epochs") + 1] = "2"
    run = tmp_path / "run"
    assert main(["train", *flags, "--out", str(run)]) == 0  # 2 epochs of 5 steps
    weights = run / "checkpoints" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"model\.safetensors is corrupt or truncated.*falling back to the previous"):
        assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 15 and summary["epochs_done"] == 3
    # Epoch 2 was redone from the epoch-1 checkpoint; every logged step count is that of its epoch.
    records = read_jsonl(run / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 5), (2, 10), (2, 10), (3, 15)]
    assert json.loads((run / "checkpoints" / "last" / "manifest.json").read_text())["step"] == 15


def test_jsonl_log_survives_a_torn_last_line(tmp_path):
    log = JsonlLog(tmp_path / "metrics.jsonl")
    log.append({"epoch": 1, "loss": 0.5})
    log.append({"epoch": 2, "loss": 0.4})
    with open(log.path, "a") as f:  # a crash in the middle of writing record 3
        f.write('{"epoch": 3, "lo')
    assert [r["epoch"] for r in log.read()] == [1, 2]
    # The resumed run appends: its records must be readable too, and nothing earlier is rewritten.
    before = log.path.read_bytes()
    log.append({"epoch": 3, "loss": 0.3})
    assert log.path.read_bytes().startswith(before)
    assert [r["epoch"] for r in log.read()] == [1, 2, 3]


def test_jsonl_log_is_append_only(tmp_path):
    log = JsonlLog(tmp_path / "m.jsonl")
    sizes = []
    for i in range(5):
        log.append({"i": i})
        sizes.append(log.path.stat().st_size)
    assert sizes == sorted(sizes) and len(set(sizes)) == 5
    assert read_jsonl(tmp_path / "absent.jsonl") == []
