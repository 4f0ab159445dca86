"""``reslab bench data``: the one-time decode of an image folder into reslab's uint8 cache (parallel, into a
fresh temporary cache directory, so nothing cached earlier is reused), then the rate at which
``BatchLoader`` feeds augmented, normalised batches from that cache, next to the standard torchvision
``DataLoader`` + PIL transforms reading the same JPEGs (``benchmarks/reference_pipeline.py``), timed in the
same run.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from reslab.bench import format_table, loadavg, median_rate, set_threads, write_result


def decode_seconds(data: str, *, workers: int | None = None) -> dict[str, Any]:
    """Decode every image of ``data`` into a fresh cache directory; seconds and images/s.

    ``cpu_seconds`` (this process and its decode workers, user + system) does not grow with other people's
    load the way wall time does: ``cpu_seconds / workers`` estimates the wall time on an idle machine.
    """
    from reslab.data import load_data

    with tempfile.TemporaryDirectory(prefix="reslab-cache-") as cache:
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        splits = load_data(data, cache_dir=cache, progress=False, workers=workers)
        seconds = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu_start
    n = len(splits.train) + len(splits.test) + (len(splits.val) if splits.val is not None else 0)
    workers = workers or os.cpu_count()
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "workers": workers,
            "cpu_seconds": cpu, "idle_estimate_seconds": cpu / workers,
            "image_size": list(splits.image_size), "channels": splits.channels}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (e.g. a decode pool)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def loader_rate(splits, *, batch_size: int = 512, images: int = 50_000, channels_last: bool = True) -> dict:
    """Augmented (pad-crop + flip), normalised images per wall second and per CPU second of ``BatchLoader``
    over the train split (the CPU figure is what an idle core would give with one thread)."""
    from reslab.data import BatchAugment, BatchLoader

    loader = BatchLoader(splits.train, batch_size=batch_size, mean=splits.mean, std=splits.std, shuffle=True,
                         drop_last=True, augment=BatchAugment(), channels_last=channels_last)
    seen, epoch = 0, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while seen < images:
        loader.set_epoch(epoch)
        for x, _ in loader:
            seen += x.shape[0]
            if seen >= images:
                break
        epoch += 1
    return {"images_per_s": seen / (time.perf_counter() - start),
            "images_per_cpu_s": seen / max(1e-9, time.process_time() - cpu_start)}


def reference_loader_rate(train_dir: str, *, images: int = 2048, workers: int = 2, batch_size: int = 128,
                          reference=None) -> float:
    """Images/s of the standard DataLoader (ImageFolder + PIL transforms, ``workers`` processes), no model."""
    from reslab.bench.train_speed import load_reference

    ref = reference or load_reference()
    loader = ref.make_loader(train_dir, batch_size, workers)
    batches = iter(loader)
    next(batches)  # worker start-up is not counted
    seen, start = 0, time.perf_counter()
    while seen < images:
        for x, _ in batches:
            seen += x.shape[0]
            if seen >= images:
                break
        batches = iter(loader)
    rate = seen / (time.perf_counter() - start)
    del batches, loader
    return rate


def bench_data(data: str, *, workers: int | None = None, repeats: int = 3, batch_size: int = 512,
               loader_images: int = 50_000, reference_images: int = 2048, reference_workers: int = 2,
               reference_batch_size: int = 128,
               threads: int | None = None, out: str | None = None) -> dict[str, Any]:
    from reslab.bench.train_speed import load_reference, train_dir_of
    from reslab.data import load_data

    threads_used = set_threads(threads)
    load_before = loadavg()
    decode = decode_seconds(data, workers=workers)
    splits = load_data(data, progress=False)  # the regular cache (decoded once, reused across runs)
    train_dir = str(train_dir_of(data))
    ref = load_reference()
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(loader_rate(splits, batch_size=batch_size, images=loader_images))
        theirs.append(reference_loader_rate(train_dir, images=reference_images, workers=reference_workers,
                                            batch_size=reference_batch_size, reference=ref))
    rows = [
        {"pipeline": f"reslab BatchLoader (b{batch_size}, cached uint8, batched augment)",
         "images_per_s": median_rate([o["images_per_s"] for o in ours]),
         "images_per_cpu_s": median_rate([o["images_per_cpu_s"] for o in ours]),
         "samples": [o["images_per_s"] for o in ours]},
        {"pipeline": f"torchvision DataLoader (b{reference_batch_size}, {reference_workers} workers, PIL)",
         "images_per_s": median_rate(theirs), "samples": theirs},
    ]
    rows[0]["vs_reference"] = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    rows[1]["vs_reference"] = 1.0
    result = {"data": str(data), "decode": decode, "loader": rows, "repeats": repeats, "torch_threads": threads_used,
              "loadavg_before": load_before, "loadavg_after": loadavg()}
    result["path"] = str(write_result("data", result, out))
    return result


def print_data(result: dict) -> None:
    d = result["decode"]
    print(f"decode {d['images']:,} images into a fresh cache with {d['workers']} workers: {d['seconds']:.1f} s "
          f"({d['images_per_s']:,.0f} images/s; {d['cpu_seconds']:.1f} CPU s, i.e. ~{d['idle_estimate_seconds']:.1f} s "
          f"on {d['workers']} idle cores); load average {result['loadavg_before']} -> "
          f"{result['loadavg_after']}")
    print(format_table(result["loader"], [("pipeline", "loader"), ("images_per_s", "augmented images/s"),
                                          ("images_per_cpu_s", "per CPU-second"),
                                          ("vs_reference", "x reference")]))
    print(f"\nwritten to {result['path']}")

