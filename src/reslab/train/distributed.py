"""Data parallelism on PyTorch's own engine (torch.distributed), as launched by ``torchrun``.

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; ``setup`` reads them, starts the process
group (NCCL on GPUs, gloo on CPUs) and returns a small context object. Outside torchrun everything here is a
no-op, so the training loop has one code path.

The contract (see docs/reliability.md):

* ``--batch-size`` is the global batch: each of the N ranks takes ``batch_size // N`` disjoint samples of the
  same global batch (``BatchLoader``), and DistributedDataParallel averages the gradients, so one step with N
  processes is the step one process takes on the whole batch (exactly so with ``--sync-bn``, which makes
  BatchNorm use the statistics of the global batch as in He et al. 2016 §3.4 / Ioffe & Szegedy 2015).
* Only rank 0 writes to the run directory.
* Collectives time out after ``RESLAB_DIST_TIMEOUT`` seconds (default 600), so a rank that died without
  torchrun noticing cannot leave the others waiting for PyTorch's default 30 minutes; under torchrun the agent
  stops every worker as soon as one fails (and restarts them all with ``--max-restarts``).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

DEFAULT_TIMEOUT_S = 600


@dataclass
class DistContext:
    enabled: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``model`` (unchanged when not distributed).

        DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts from the same
        weights even if they were initialised (or resumed) separately.
        """
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if self.device is None or self.device.type == "cpu":
            _cpu_sync_batchnorm_in_place(model)
        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def convert_sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """BatchNorm layers that normalise with the statistics of the global batch (``--sync-bn``).

        PyTorch's SyncBatchNorm runs on GPUs only; on CPUs (gloo) an all_reduce-based equivalent is used.
        """
        if not self.enabled:
            return model
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.device is None or self.device.type == "cpu":
            _cpu_sync_batchnorm_in_place(model)
        return model

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (e.g. "the loss is finite"), so all ranks take the same branch."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([0.0 if flag else 1.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return bool(t.item() == 0)

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(device_name: str = "auto") -> DistContext:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a disabled context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(enabled=False)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with "
                           "`torchrun --nproc_per_node=N -m reslab train ...` or `reslab train --nproc N`")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node; "
                               "use --nproc_per_node <= the number of GPUs (or --device cpu)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("RESLAB_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        kwargs = {"device_id": device} if use_cuda else {}
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout,
                                store=_rendezvous_store(rank, world_size, timeout), rank=rank,
                                world_size=world_size, **kwargs)
    return DistContext(True, rank, world_size, local_rank, device)


def _rendezvous_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The key-value store the ranks meet in, namespaced by torchrun's restart count.

    After an elastic restart torchrun's agent keeps serving the same store, which still holds the previous
    attempt's gloo addresses; a new rank that reads its dead peer's address fails with "connection refused".
    A prefix per attempt keeps every attempt's keys apart. Without torchrun's agent store, rank 0 hosts it.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts_store, timeout=timeout)
    return dist.PrefixStore(f"reslab/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# SyncBatchNorm for CPUs (gloo)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm whose statistics are all-reduced with autograd-aware collectives, so it runs on CPUs.

    Batch statistics over the union of every rank's batch (Ioffe & Szegedy 2015, Alg. 1, on the global batch):
    mean from an all_reduced sum, then the biased variance from an all_reduced sum of squared deviations
    (two passes: as accurate as single-process BatchNorm). The running variance is updated with the unbiased
    estimate, as nn.BatchNorm2d does. Outside training or outside a process group it is plain BatchNorm.
    (Not a subclass of nn.SyncBatchNorm: DistributedDataParallel refuses those on CPUs.)
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = all_reduce(torch.tensor([input.numel() // input.size(1)], dtype=input.dtype))
        total = all_reduce(input.sum(dims))
        mean = total / count
        centred = input - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = float(count)
                unbiased = var.detach() * (n / max(n - 1, 1))
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(unbiased, factor)
        return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is again the sum over ranks (every rank's loss depends on the sum)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _cpu_sync_batchnorm_in_place(model: nn.Module) -> None:
    """Give every nn.SyncBatchNorm the CPU implementation, keeping its parameters (and the optimiser's
    references to them): only the class changes."""
    for module in model.modules():
        if type(module) is nn.SyncBatchNorm:
            module.__class__ = CPUSyncBatchNorm


__all__ = ["CPUSyncBatchNorm", "DistContext", "setup", "teardown"]
