"""Muon for convolutional nets (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
the conv-filter form of airbench94_muon, Jordan 2024, which holds the CIFAR-10 speed record).

Each conv filter bank ``W`` (out x in x k x k) is treated as the matrix ``out x (in k k)``; its Nesterov momentum
``M`` is replaced by the nearest semi-orthogonal matrix ``U V^T`` (``M = U S V^T``), approximated by five steps of
the quintic Newton-Schulz iteration ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` and Jordan's coefficients
(a, b, c) = (3.4445, -4.7750, 2.0315). Every singular direction of the update then moves at the same rate, which is
what lets few, large steps train a net. As in airbench94_muon, the filter bank is first rescaled to Frobenius norm
``sqrt(out)``: a conv followed by BatchNorm computes the same function at any scale, so fixing the scale keeps the
effective step size where the schedule puts it (this assumes BN, or another normaliser, after each such conv).

``torch.optim.Muon`` takes 2-D parameters only, so conv filters (4-D) need this form. Parameters in groups with
``muon=False`` (biases, BN affine, the classifier) get plain SGD with (Nesterov) momentum and weight decay, so one
optimizer object carries the whole model (one state dict for checkpoints, one ``lr`` per group for schedules).
"""
from __future__ import annotations

import torch

NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (as in the reference) and on CPUs with native bf16 dot products; fp32 on other CPUs, where
    bf16 matmuls are emulated and hundreds of times slower."""
    from reslab.train.engine import cpu_has_fast_bf16  # engine imports this module lazily; no cycle

    return torch.bfloat16 if device.type == "cuda" or cpu_has_fast_bf16() else torch.float32


def orthogonalize(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate ``U V^T`` of ``matrix = U S V^T`` by the quintic Newton-Schulz iteration (singular values land
    in roughly [0.7, 1.2], which is all Muon needs), computed in ``dtype`` (default:
    :func:`newton_schulz_dtype` of the matrix's device)."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrix.to(dtype or newton_schulz_dtype(matrix.device))
    transposed = x.size(0) > x.size(1)
    if transposed:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.T
    return x.to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Muon on groups with ``muon=True`` (parameters of 2 or more dimensions, flattened to ``rows x rest``),
    SGD with momentum on the others. Options per group: ``lr``, ``momentum``, ``nesterov``, ``weight_decay``
    (SGD groups only, L2 as in ``torch.optim.SGD``), ``normalize`` (Muon groups: rescale each weight to norm
    ``sqrt(rows)`` before the step; see the module docstring)."""

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 0.0, muon: bool = False, normalize: bool = True, ns_steps: int = 5):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      muon=muon, normalize=normalize, ns_steps=ns_steps))
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups take weight matrices or conv filters (ndim >= 2); put biases and "
                                 "norm parameters in a group with muon=False")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["muon"] and group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(grad)
                update = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                if group["muon"]:
                    if group["normalize"]:
                        p.mul_(p.size(0) ** 0.5 / (p.norm() + 1e-12))
                    update = orthogonalize(update.reshape(p.size(0), -1), group["ns_steps"]).view_as(p)
                p.add_(update, alpha=-lr)
        return loss
