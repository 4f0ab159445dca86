"""Data pipeline: sources -> uint8 cache -> device-resident batches -> batched augmentation.

``load_data(spec)`` returns a :class:`DataSplits` of uint8 arrays; :class:`BatchLoader` turns a
split into normalised, augmented tensor batches on the training device.
"""

from .augment import BatchAugment, cutout, random_crop, random_flip
from .loader import BatchLoader
from .sources import DataSplits, ImageArray, load_data

__all__ = [
    "ImageArray",
    "DataSplits",
    "load_data",
    "BatchLoader",
    "BatchAugment",
    "random_crop",
    "random_flip",
    "cutout",
]
