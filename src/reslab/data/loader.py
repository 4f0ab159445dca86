"""Device-resident batch loader: the whole uint8 split lives on the device, batches are gathered,
normalised and augmented there with tensor ops.

For data sets that fit in device memory (CIFAR-10 train is 150 MB as uint8) this removes the
worker processes, per-image Python transforms and host-to-device copies of a classic
Dataset + DataLoader pipeline; one batch is an ``index_select`` plus a few element-wise ops.

Determinism and resumption: the order of an epoch is a function of ``(seed, epoch)`` only,
and the augmentation of a batch is seeded from ``(seed, epoch, step, rank)``, so a run resumed
from ``state_dict() == {"epoch": e, "step": s}`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .augment import BatchAugment, alternating_flip_mask
from .sources import ImageArray

__all__ = ["BatchLoader", "mix_seed"]

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64 finaliser per value); stable across
    processes and Python versions, unlike ``hash``."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (int(v) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


# Distinct streams, so the shuffle and the augmentation never share random numbers.
_ORDER_STREAM, _AUGMENT_STREAM, _FLIP_STREAM = 1, 2, 3


class BatchLoader:
    """Iterate over one split in batches of normalised (and optionally augmented) tensors.

    Args:
        data: the split (uint8 N x H x W x C images, int64 labels).
        batch_size: the GLOBAL batch size. With ``world_size > 1`` every rank draws the same epoch
            permutation and takes its own contiguous ``batch_size // world_size`` slice of each
            global batch, so the union over ranks is exactly the single-process batch.
        mean, std: per-channel statistics in [0, 1] (``DataSplits.mean``/``std``).
        device: where the uint8 split, the batches and the augmentation live.
        shuffle: a fresh permutation per epoch (a function of ``seed`` and the epoch).
        drop_last: drop the final partial batch. Otherwise it is kept; with ``world_size > 1`` it
            is padded by repeating the first samples of the epoch so all ranks get equal-size
            batches (as ``DistributedSampler`` does): exact evaluation counts need world_size 1.
        augment: a :class:`BatchAugment` applied after normalisation (so zero padding is the mean colour).
        seed: base seed of the order and of the augmentation.
        channels_last: return batches in ``torch.channels_last`` memory format.
        dtype: floating type of the returned images.
        rank, world_size: data-parallel position.
        image_size: resize batches (bilinear) to this square size when the stored size differs,
            e.g. 8x8 digits to 32x32.

    Usage::

        loader = BatchLoader(splits.train, batch_size=512, mean=splits.mean, std=splits.std,
                             device="cuda", shuffle=True, drop_last=True, augment=BatchAugment())
        for epoch in range(start_epoch, epochs):
            loader.set_epoch(epoch)          # keeps a step restored by load_state_dict
            for x, y in loader:
                ...
    """

    def __init__(
        self,
        data: ImageArray,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "cpu",
        shuffle: bool = False,
        drop_last: bool = False,
        augment: BatchAugment | None = None,
        seed: int = 0,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
        image_size: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(f"the global batch_size {batch_size} must be divisible by world_size {world_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.channels_last, self.dtype = channels_last, dtype
        self.image_size = (image_size, image_size) if image_size else None

        self.images = _to_device_nchw(data.images, self.device)  # uint8 (N, C, H, W)
        self.labels = torch.as_tensor(np.asarray(data.labels), dtype=torch.int64).to(self.device)
        channels = self.images.shape[1]
        mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        if mean_t.shape[1] not in (1, channels) or std_t.shape[1] not in (1, channels):
            raise ValueError(f"mean/std have {mean_t.shape[1]}/{std_t.shape[1]} values for {channels} channels")
        # x_normalised = (u8 / 255 - mean) / std = u8 * scale - shift, in two fused in-place ops.
        self._scale = (1.0 / (255.0 * std_t)).to(self.device)
        self._shift = (mean_t / std_t).to(self.device)

        self._first_epoch_flips = None
        if augment is not None and augment.flip and augment.flip_mode == "alternate":
            g = torch.Generator().manual_seed(mix_seed(self.seed, _FLIP_STREAM))
            self._first_epoch_flips = (torch.rand(self.num_samples, generator=g) < 0.5).to(self.device)

        self.epoch = 0
        self.start_step = 0  # first batch of the next pass (set by load_state_dict)
        self._step = 0  # batches already yielded in the current epoch

    # ---------------------------------------------------------------- sizes and state
    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and augmentation) the next pass uses. Moving to another
        epoch restarts at step 0; the current epoch keeps a step restored by ``load_state_dict``."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.start_step = 0
            self._step = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        step = int(state["step"])
        if not 0 <= step <= len(self):
            raise ValueError(f"step {step} is outside this loader's epoch of {len(self)} batches")
        self.epoch = int(state["epoch"])
        self.start_step = self._step = step

    # ---------------------------------------------------------------- iteration
    def epoch_order(self, epoch: int | None = None) -> torch.Tensor:
        """The global sample order of an epoch (identical on every rank), on the CPU."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, _ORDER_STREAM))
        return torch.randperm(self.num_samples, generator=g)

    def batch_indices(self, order: torch.Tensor, step: int) -> torch.Tensor:
        """This rank's sample indices for batch ``step`` of an epoch ``order``."""
        n, gb = order.shape[0], self.batch_size
        idx = order[step * gb : (step + 1) * gb]
        if self.world_size == 1:
            return idx
        per_rank = self.local_batch_size if idx.shape[0] == gb else math.ceil(idx.shape[0] / self.world_size)
        missing = per_rank * self.world_size - idx.shape[0]
        if missing:  # pad the last partial batch by wrapping around the epoch order
            idx = torch.cat([idx, order[torch.arange(missing, device=order.device) % n]])
        return idx[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start, self.start_step = self.start_step, 0  # a later pass over this epoch starts at the top
        self._step = start
        order = self.epoch_order().to(self.device)
        for step in range(start, len(self)):
            batch = self._make_batch(self.batch_indices(order, step), step)
            self._step = step + 1
            yield batch

    def _make_batch(self, index: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images.index_select(0, index).to(torch.float32)
        x.mul_(self._scale).sub_(self._shift)
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            shrinking = self.image_size[0] < x.shape[-2] or self.image_size[1] < x.shape[-1]
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=shrinking)
        if self.augment is not None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, step, self.rank, _AUGMENT_STREAM))
            flips = (None if self._first_epoch_flips is None
                     else alternating_flip_mask(self._first_epoch_flips, index, self.epoch))
            x = self.augment(x, g, flip_mask=flips)
        if self.dtype != torch.float32:
            x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels.index_select(0, index)


def _to_device_nchw(images: np.ndarray, device: torch.device, chunk: int = 8192) -> torch.Tensor:
    """uint8 (N, H, W, C) array or memmap -> one uint8 (N, C, H, W) tensor on ``device``, copied in
    chunks so a memmap is read once without a second full-size host copy."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C), got {images.shape}")
    n, h, w, c = images.shape
    out = torch.empty((n, c, h, w), dtype=torch.uint8, device=device)
    for i in range(0, n, chunk):
        block = torch.from_numpy(np.array(images[i : i + chunk], dtype=np.uint8, copy=True))
        out[i : i + chunk] = block.to(device).permute(0, 3, 1, 2)
    return out
