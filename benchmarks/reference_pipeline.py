"""The reference to beat: the CIFAR-10 training pipeline a PyTorch user writes from the tutorials.

torchvision ``ImageFolder`` over the JPEG files, PIL transforms per image (``RandomCrop(32, padding=4)``,
``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``), ``DataLoader(batch_size=128, shuffle=True,
num_workers=2)``, an eager fp32 CIFAR ResNet-20 (He et al. 2016, §4.2, option-A shortcuts) and SGD with
momentum. Nothing here imports reslab, so the script runs alone::

    OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python benchmarks/reference_pipeline.py --data /tmp/cifar10 --iterations 60

``reslab bench train`` loads this file and calls :func:`reference_throughput` in the same process as its
own measurement, interleaved, so both sides see the same machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# CIFAR-10 per-channel statistics, as written in most tutorials.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# ----------------------------------------------------------------------------------------------------------
# Network: the 6n+2-layer CIFAR ResNet of He et al. 2016, §4.2 (n=3: ResNet-20), option-A shortcuts


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes  # option A: subsample and zero-pad the identity

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad:
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, n: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------------------------------------
# Data and training


def make_loader(train_dir: str, batch_size: int = 128, num_workers: int = 2) -> torch.utils.data.DataLoader:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    dataset = ImageFolder(train_dir, transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                       drop_last=True, persistent_workers=num_workers > 0)


def cpu_seconds(loader=None) -> float | None:
    """CPU seconds (user + system) of this process and of ``loader``'s live worker processes (Linux /proc).

    On a machine shared with other jobs a 3-process pipeline gets more CPU than a 1-process one; images per
    CPU-second compares the pipelines' work independently of that share.
    """
    total = time.process_time()
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    for worker in workers:
        try:
            with open(f"/proc/{worker.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None
    return total


def reference_throughput(train_dir: str, *, iterations: int = 60, warmup: int = 5, batch_size: int = 128,
                         num_workers: int = 2, model: nn.Module | None = None, loader=None) -> dict:
    """Train ``iterations`` steps end to end (JPEG decode + PIL augmentation + fp32 eager step) and return the
    steady-state images/s, timed after ``warmup`` steps (worker start-up and first-batch latency excluded).

    Pass ``loader`` to reuse a DataLoader (with persistent workers) across repetitions.
    """
    model = model if model is not None else CifarResNet()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = loader if loader is not None else make_loader(train_dir, batch_size, num_workers)
    if len(loader) == 0:
        raise ValueError(f"{train_dir} holds fewer images than one batch of {batch_size}")
    criterion = nn.CrossEntropyLoss()
    step, images, t0, cpu0 = 0, 0, None, None
    while step < warmup + iterations:
        for x, y in loader:
            if step == warmup:
                t0, cpu0 = time.perf_counter(), cpu_seconds(loader)
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= warmup:
                images += y.numel()
            step += 1
            if step >= warmup + iterations:
                break
    seconds = time.perf_counter() - t0
    cpu1 = cpu_seconds(loader)
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return {"images_per_s": images / seconds, "seconds": seconds, "images": images, "cpu_seconds": cpu,
            "images_per_cpu_s": images / cpu if cpu else None, "final_loss": loss.item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/cifar10", help="ImageFolder root with train/<class>/*.jpg")
    p.add_argument("--iterations", type=int, default=60, help="timed steps (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    train_dir = os.path.join(args.data, "train") if os.path.isdir(os.path.join(args.data, "train")) else args.data
    loader = make_loader(train_dir, args.batch_size, args.workers)
    runs = [reference_throughput(train_dir, iterations=args.iterations, warmup=args.warmup, loader=loader)
            for _ in range(args.repeats)]
    rates = sorted(r["images_per_s"] for r in runs)
    print(json.dumps({"images_per_s_median": rates[len(rates) // 2], "images_per_s": rates,
                      "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
