"""Patch-whitening stem: a first convolution whose filters are fixed to whiten the training images' patches.

Coates & Ng 2011 ("An Analysis of Single-Layer Networks in Unsupervised Feature Learning", §3: ZCA whitening
of patches) showed that whitened patches make a first layer far more useful; Jordan 2024 ("94% on CIFAR-10 in
3.29 Seconds on a Single GPU", airbench, §3.2) uses it as the frozen first layer of a fast CIFAR net: the
k x k x C patches' covariance ``Sigma = V diag(lambda) V^T`` gives ``k*k*C`` filters ``v_i / sqrt(lambda_i + eps)``,
each used with both signs so the ReLU after it keeps the whole signal. Only the biases train.

The filters depend on the data, so they are fitted once before training (``fit_data_dependent_init``, which
the training loop calls on a sample of training images) and then stored with the weights like any parameter:
a checkpoint restores them and a resumed run does not refit.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchWhitening(nn.Module):
    """``kernel_size`` x ``kernel_size`` conv (no padding) with ``2 * C * k * k`` frozen whitening filters and
    trainable biases. ``fitted`` says whether :meth:`fit` has run (an unfitted stem is an error in training)."""

    def __init__(self, in_channels: int = 3, kernel_size: int = 2, eps: float = 5e-4):
        super().__init__()
        self.in_channels, self.kernel_size, self.eps = in_channels, kernel_size, eps
        patch_dim = in_channels * kernel_size * kernel_size
        self.out_channels = 2 * patch_dim
        self.weight = nn.Parameter(torch.zeros(self.out_channels, in_channels, kernel_size, kernel_size),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_channels))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        """Set the filters from normalised training images (N, C, H, W): eigenvectors of the patch covariance
        scaled by 1/sqrt(eigenvalue + eps), strongest first, then the same filters negated."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"PatchWhitening.fit expects (N, {self.in_channels}, H, W) images, got "
                             f"{tuple(images.shape)}")
        k = self.kernel_size
        # Covariance from the second moment of the unfolded (N, C*k*k, positions) patches: no transposed copy of
        # the ~5000 x 961 patch matrix, float32 products summed in float64 (3x faster than a float64 copy).
        patches = F.unfold(images.float(), k)
        n = patches.shape[0] * patches.shape[2]
        mean = patches.mean(dim=(0, 2), dtype=torch.float64)
        second = torch.bmm(patches, patches.transpose(1, 2)).sum(0, dtype=torch.float64) / n
        covariance = (second - torch.outer(mean, mean)) * n / max(1, n - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + self.eps)).T
        filters = filters.reshape(-1, self.in_channels, k, k).to(self.weight)
        self.weight.copy_(torch.cat([filters, -filters]))
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, eps={self.eps}"


def data_dependent_modules(model: nn.Module) -> list[PatchWhitening]:
    return [m for m in model.modules() if isinstance(m, PatchWhitening)]


def set_whitening_bias_trainable(model: nn.Module, trainable: bool) -> bool:
    """Train or freeze the biases of every patch-whitening stem; returns whether anything changed.

    airbench trains them for the first 3 epochs only (Jordan 2024, airbench94's ``whiten_bias_train_steps``):
    once they are frozen nothing before the first 3x3 conv learns, so backward skips that conv's input
    gradient and the stem's, which on a CPU is 1.07-1.14x on the ``fast`` net's step (docs/performance.md)."""
    changed = False
    for module in data_dependent_modules(model):
        if module.bias.requires_grad != trainable:
            module.bias.requires_grad_(trainable)
            changed = True
    return changed


def fit_data_dependent_init(model: nn.Module, images: torch.Tensor) -> int:
    """Fit every data-dependent layer of ``model`` (its patch-whitening stems) on ``images``; returns how many."""
    modules = data_dependent_modules(model)
    for module in modules:
        module.fit(images.to(module.weight.device))
    return len(modules)
