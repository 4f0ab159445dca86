"""Data-parallel training on CPU with gloo, launched as users launch it (``reslab train --nproc`` and ``torchrun``).

* N=2 processes with the same global batch reach the weights of one process (SyncBatchNorm on, so the batch
  statistics are those of the global batch) and leave the same files in the run directory.
* Elastic restart: a worker killed with SIGKILL makes torchrun (``--max-restarts``) restart the group, which
  continues from the last checkpoint (``--auto-resume``) and finishes.
* An error stops every rank (no hang) with the message of the failing rank, also when only one rank fails.
* Objectives beyond cross-entropy (``--matryoshka``) average their gradients like plain training does.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reslab.cli import main
from reslab.train.distributed import CPUSyncBatchNorm, DistContext
from reslab.train.rundir import read_jsonl

pytestmark = pytest.mark.slow

# Tiny and well conditioned: 3 steps an epoch on 12 % of digits, plain SGD at a small constant lr, no
# augmentation (its random numbers are drawn per rank), fp32, contiguous tensors (the same kernels in both runs).
# Rounding differences (sums in another order) grow quickly with the number of steps on this small problem,
# so the runs are short: 3 epochs, 9 steps.
FLAGS = ["--data", "digits", "--train-fraction", "0.12", "--batch-size", "48", "--epochs", "3", "--amp", "off",
         "--sync-bn", "--crop-padding", "0", "--no-flip", "--threads", "1", "--image-size", "8", "--no-progress",
         "--device", "cpu", "--schedule", "constant", "--warmup-iters", "0", "--lr", "0.01", "--optimizer", "sgd",
         "--no-channels-last", "--seed", "0"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "RESLAB_CACHE": str(tmp_path / "cache"),
            "RESLAB_DIST_TIMEOUT": "60", "GLOO_SOCKET_IFNAME": "lo"}


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and not p.name.startswith("."))


def _max_diff(a: Path, b: Path) -> float:
    wa = load_file(a / "checkpoints" / "last" / "model.safetensors")
    wb = load_file(b / "checkpoints" / "last" / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


TOLERANCE = 2e-3  # largest weight difference after 9 steps; a missing gradient average or unsynced BN is > 1e-2


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The reference: one process, in this process, exactly as the CLI resolves the flags."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", *FLAGS, "--out", str(out)]) == 0
    return out


def test_two_processes_match_one_process(one_process_run, tmp_path):
    out = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "reslab", "train", "--nproc", "2", *FLAGS, "--out", str(out)],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert _max_diff(one_process_run, out) < TOLERANCE
    assert _files(one_process_run) == _files(out)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [3, 6, 9]
    import json

    env = json.loads((out / "summary.json").read_text())["environment"]
    assert env["world_size"] == 2


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_elastic_restart_after_sigkill_resumes_and_finishes(one_process_run, tmp_path):
    out = tmp_path / "elastic"
    log = tmp_path / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=3",
           "-m", "reslab", "train", *FLAGS, "--auto-resume", "--out", str(out)]
    with open(log, "w") as f:
        job = subprocess.Popen(cmd, env=_env(tmp_path), stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 180
            while not (out / "checkpoints" / "last" / "manifest.json").exists():
                assert job.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            workers = _children(job.pid)
            assert len(workers) == 2, workers
            os.kill(max(workers), signal.SIGKILL)  # mid-run: in epoch 2 of 3
            rc = job.wait(timeout=240)
        finally:
            if job.poll() is None:
                job.kill()
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "exitcode: -9" in text  # torchrun saw the kill and restarted the group
    records = read_jsonl(out / "metrics.jsonl")
    epochs = [r["epoch"] for r in records]
    assert sorted(set(epochs)) == [1, 2, 3] and epochs == sorted(epochs)
    assert epochs.count(1) == 1  # the restarted group continued from the checkpoint, not from scratch
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 9
    # The redone part of an epoch replays the same batches: the result is the uninterrupted one.
    assert _max_diff(one_process_run, out) < TOLERANCE


def test_error_on_the_ranks_stops_the_whole_job(tmp_path):
    """An absurd learning rate makes the loss non-finite: the job ends (no hang) naming the step."""
    flags = [f for f in FLAGS]
    flags[flags.index("--lr") + 1] = "1e6"
    proc = subprocess.run([sys.executable, "-m", "reslab", "train", "--nproc", "2", *flags, "--out", str(tmp_path / "nan")], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode != 0
    assert "the loss became" in proc.stderr and "at step" in proc.stderr


# Rank 1 alone is given data that does not exist; rank 0 goes on and waits for it in the first collective.
RANK1_FAILS = """
import os, sys
from reslab.cli import main
argv = sys.argv[1:]
if os.environ["RANK"] == "1":
    argv[argv.index("--data") + 1] = {missing!r}
sys.exit(main(argv))
"""


def test_error_on_one_rank_only_stops_the_whole_job_promptly(tmp_path):
    """The other rank is not left waiting for the collective timeout: torchrun stops it when rank 1 fails."""
    script = tmp_path / "rank1_fails.py"
    script.write_text(RANK1_FAILS.format(missing=str(tmp_path / "no-such-data")))
    env = {**_env(tmp_path), "RESLAB_DIST_TIMEOUT": "600"}  # the default: a hang would last 10 minutes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "train", *FLAGS, "--out", str(tmp_path / "run")]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert "no-such-data" in proc.stderr and "unknown data spec" in proc.stderr  # the failing rank's message
    assert "(SIGTERM)" in proc.stderr  # rank 0, still waiting for rank 1, was stopped by torchrun
    assert elapsed < 120, f"the job took {elapsed:.0f} s to stop"  # process start-up only, far from 600 s
    assert not (tmp_path / "run" / "checkpoints").exists()  # rank 0 never got to train


def _assert_two_processes_match_one(flags: list[str], tmp_path: Path) -> None:
    """``flags`` trained in this process and by ``--nproc 2`` reach the same weights."""
    single = tmp_path / "one"
    assert main(["train", *flags, "--out", str(single)]) == 0
    out = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "reslab", "train", "--nproc", "2", *flags, "--out", str(out)],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert _max_diff(single, out) < TOLERANCE


def test_matryoshka_gradients_are_averaged_across_ranks(tmp_path):
    """Issue 9: the nested loss used to call the bare network, outside DDP's forward, so gradients were never
    all-reduced and each rank trained on its half of the batch. Now 2 processes reach the weights of one."""
    flags = [*FLAGS, "--matryoshka", "8,16,32,64"]
    _assert_two_processes_match_one(flags, tmp_path)


def test_whitening_biases_frozen_mid_run_under_ddp(tmp_path):
    """--whiten-bias-epochs 1: the biases stop needing gradients after epoch 1, so DDP is rebuilt around the
    model (its reducer would otherwise wait for their gradients and hang); 2 processes still match one."""
    flags = [*FLAGS, "--model", "resnet9", "--image-size", "16", "--whiten-bias-epochs", "1", "--model-kwargs",
             '{"stem": "whiten", "widths": [8, 16, 16, 16], "pool_first": true}']
    _assert_two_processes_match_one(flags, tmp_path)


# ------------------------------------------------------------------------------------------------------------
# in-process pieces


def test_disabled_context_is_a_no_op():
    ctx = DistContext(enabled=False)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    assert ctx.wrap(model) is model and ctx.convert_sync_batchnorm(model) is model
    assert ctx.all_true(True) and not ctx.all_true(False)
    t = torch.ones(3)
    assert torch.equal(ctx.all_reduce_sum(t), t) and ctx.broadcast_object({"a": 1}) == {"a": 1}


def test_cpu_sync_batchnorm_outside_a_group_is_batchnorm():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(bn))
    sync[0].__class__ = CPUSyncBatchNorm
    ref = torch.nn.BatchNorm2d(4)
    x = torch.randn(8, 4, 5, 5)
    assert torch.allclose(sync(x), ref(x), atol=1e-6)
    assert torch.allclose(sync[0].running_var, ref.running_var)


def test_matryoshka_loss_runs_the_wrapped_forward():
    """The nested loss calls the wrapper (as DDP wraps the model), asking it for the pooled embedding."""
    from reslab.models import create_model
    from reslab.train.objectives import Matryoshka

    class RecordingWrapper(torch.nn.Module):  # DDP-like: the network as ``.module``, work done in forward
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, []

        def forward(self, *args, **kwargs):
            self.calls.append(kwargs)
            return self.module(*args, **kwargs)

    torch.manual_seed(0)
    net = create_model("resnet20", num_classes=10, in_chans=1)
    wrapped = RecordingWrapper(net)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    loss, logits = Matryoshka([8, 64])(wrapped, x, y)
    assert wrapped.calls == [{"pre_logits": True}]
    torch.testing.assert_close(logits, net(x))
    torch.testing.assert_close(net(x, pre_logits=True), net.forward_head(net.forward_features(x), pre_logits=True))
