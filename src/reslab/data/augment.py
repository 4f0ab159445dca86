"""Batched data augmentation on the training device.

The ResNet paper's CIFAR recipe (He et al. 2016, Sec. 4.2): "4 pixels are padded on each side,
and a 32x32 crop is randomly sampled from the padded image or its horizontal flip". Here every
image in a batch draws its own crop offset and flip from one ``torch.Generator``, and the whole
batch is transformed with a few tensor ops (a gather and a ``torch.where``): no per-image Python
loop, so augmentation keeps up with the GPU and stays fast on CPU.

Random parameters are drawn on the generator's device (a CPU generator is fine for CUDA
batches: only B integers travel), so a given generator state gives the same augmentation
on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["random_crop", "random_flip", "alternating_flip_mask", "cutout", "resize_batch", "BatchAugment",
           "FLIP_MODES", "CROP_MODES"]

FLIP_MODES = ("random", "alternate")
CROP_MODES = ("constant", "reflect")


def _randint(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` integers in [0, high), drawn on the generator's device, returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device, non_blocking=True)


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator | None = None, *, mode: str = "constant"
) -> torch.Tensor:
    """Pad-and-crop: pad (B, C, H, W) by ``padding`` on each side and cut an H x W window at an
    independent random offset per image.

    ``mode`` is "constant" (zeros: after normalisation that is the mean colour) or "reflect".
    Implemented as one ``gather`` with a per-image index grid.
    """
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    dy = _randint(2 * padding + 1, b, generator, x.device)
    dx = _randint(2 * padding + 1, b, generator, x.device)
    padded = F.pad(x, (padding, padding, padding, padding), mode=mode)
    wp = w + 2 * padding
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, index).view(b, c, h, w)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Mirror each image of (B, C, H, W) horizontally with probability ``p``, independently."""
    gen_device = generator.device if generator is not None else x.device
    flip = (torch.rand(x.shape[0], generator=generator, device=gen_device) < p).to(x.device, non_blocking=True)
    return mirror(x, flip)


def mirror(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror horizontally the images of (B, C, H, W) whose ``mask`` entry (one bool per image) is set."""
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def alternating_flip_mask(first_epoch_flips: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images of a batch to mirror under alternating flip (Jordan 2024, airbench §3.6): an image is
    mirrored in epoch 0 by a fair coin drawn once per image (``first_epoch_flips``, one bool per sample), then
    in every other epoch, so each one is seen mirrored and unmirrored equally often instead of repeating the
    same view by chance in short trainings."""
    return first_epoch_flips.index_select(0, index) ^ bool(epoch % 2)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square at an independent random centre per image, clipped at the
    borders (DeVries & Taylor 2017, "Improved Regularization of CNNs with Cutout")."""
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = _randint(h, b, generator, x.device)
    cx = _randint(w, b, generator, x.device)
    top, left = cy - size // 2, cx - size // 2
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    in_rows = (ys[None, :] >= top[:, None]) & (ys[None, :] < top[:, None] + size)  # (B, H)
    in_cols = (xs[None, :] >= left[:, None]) & (xs[None, :] < left[:, None] + size)  # (B, W)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(hole, 0.0)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, C, H, W) to ``size`` x ``size``: bilinear with antialiasing (PIL's downscaling filter, not
    a subsampling that would alias), keeping channels_last when the input has it. Used by progressive
    resizing (``reslab.train.schedules.progressive_size``)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    channels_last = x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


@dataclass
class BatchAugment:
    """Training augmentation for a batch: pad-and-crop, horizontal flip, optional cutout."""

    crop_padding: int = 4  # pixels of padding before the random crop (paper: 4 on 32x32); 0 = off
    flip: bool = True  # horizontal flip: with p = 0.5, or alternating by epoch (flip_mode)
    flip_mode: str = "random"  # "random" or "alternate" (the loader passes the per-image flip_mask)
    cutout: int = 0  # side of the cutout square in pixels; 0 = off
    crop_mode: str = "constant"  # padding fill: "constant" (zeros) or "reflect"

    def __post_init__(self):
        if self.flip_mode not in FLIP_MODES:
            raise ValueError(f"flip_mode must be one of {', '.join(FLIP_MODES)}, got {self.flip_mode!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 flip_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``flip_mask`` (one bool per image) decides the flips when ``flip_mode`` is "alternate"."""
        # Fixed order of draws, so a generator state fully determines the result.
        if self.crop_padding > 0:
            x = random_crop(x, self.crop_padding, generator, mode=self.crop_mode)
        if self.flip and self.flip_mode == "alternate":
            if flip_mask is None:
                raise ValueError("flip_mode='alternate' needs the per-image flip_mask (BatchLoader passes it)")
            x = mirror(x, flip_mask)
        elif self.flip:
            x = random_flip(x, generator)
        if self.cutout > 0:
            x = cutout(x, self.cutout, generator)
        return x
