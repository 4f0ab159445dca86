"""``reslab eval`` and ``reslab predict``: a trained run on a dataset, or on single image files."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from reslab.train.engine import autocast_dtype, evaluate_loader, retain_freed_memory
from reslab.train.rundir import environment_info, write_json


def load_data_for_model(card: dict, data: str | None, **kwargs):
    """Load ``data`` (default: the data the model was trained on) decoded the way the model expects,
    with labels mapped onto the model's class list by name."""
    from reslab.data import load_data

    prep = card["preprocessing"]
    spec = data or card["data"]
    splits = load_data(spec, image_size=_stored_side(prep), channels=prep["channels"], progress=False, **kwargs)
    if list(splits.classes) != list(card["classes"]):
        unknown = sorted(set(splits.classes) - set(card["classes"]))
        if unknown:
            raise ValueError(f"--data {spec}: classes {unknown[:5]} are not among the model's "
                             f"{len(card['classes'])} classes; evaluate on data with the model's classes "
                             "or fine-tune first (`reslab finetune`)")
        index = {c: i for i, c in enumerate(card["classes"])}
        remap = np.array([index[c] for c in splits.classes])
        for split in (splits.train, splits.val, splits.test):
            if split is not None:
                split.labels = remap[split.labels]
    return splits


def _stored_side(prep: dict) -> int | None:
    h, w = prep["stored_size"]
    return h if h == w else None


def model_loader(card: dict, images, *, device, batch_size: int = 512):
    from reslab.data import BatchLoader

    prep = card["preprocessing"]
    h, w = prep["input_size"]
    return BatchLoader(images, batch_size=batch_size, mean=prep["mean"], std=prep["std"], device=device,
                       image_size=h if (h, w) != tuple(prep["stored_size"]) else None)


def evaluate(run: str | Path, data: str | None = None, *, split: str = "test", device: str = "auto",
             batch_size: int = 512, amp: str = "auto", tta_flip: bool = False, tta_shift: int = 0,
             out: str | Path | None = None, retain_memory: bool = True) -> dict[str, Any]:
    """Top-1, top-5, loss and per-class accuracy of a run's best checkpoint on a split of ``data``; ``run``
    may also be a folder written by ``reslab export`` or ``reslab quantize``, whose model file is then what runs
    (:mod:`reslab.deploy.artifact`, on the CPU).

    Writes ``eval-<split>.json`` into the run directory (or ``out``) and returns the same dict.
    ``retain_memory``: :func:`reslab.train.engine.retain_freed_memory` for this process, as in training.
    """
    from reslab.deploy.artifact import load_for_inference
    from reslab.evaluate.analyze import run_dir_of

    if retain_memory:
        retain_freed_memory()
    loaded = load_for_inference(run, device=device)
    model, card, run_dir, dev = loaded.model, loaded.card, loaded.run_dir, loaded.device
    split_kwargs = {}
    if split == "val" and run_dir is not None and (run_dir / "config.yaml").is_file():
        # The validation images the run held out of its training split: same fraction, same seed.
        from reslab.train.config import load_config_file

        cfg = load_config_file(run_dir / "config.yaml")
        split_kwargs = {"val_fraction": cfg.val_fraction, "seed": cfg.seed}
    splits = load_data_for_model(card, data, **split_kwargs)
    images = {"test": splits.test, "val": splits.val, "train": splits.train}.get(split)
    if images is None:
        raise ValueError(f"--split {split}: the data has no such split (choose test, val or train; val needs a "
                         "run trained with --val-fraction)")
    amp_dtype = None if loaded.deployed else autocast_dtype(dev, amp)  # a deployed file keeps its own precision
    result = evaluate_loader(model, model_loader(card, images, device=dev, batch_size=batch_size), device=dev,
                             amp_dtype=amp_dtype, num_classes=card["num_classes"],
                             tta_flip=tta_flip, tta_shift=tta_shift)
    if loaded.deployed:
        result["deployed"] = {"format": card["format"], "runtime": model.runtime}
    result.update({"split": split, "tta": {"flip": tta_flip, "shift": tta_shift}, "data": data or card["data"],
                   "checkpoint": str(loaded.source), "classes": card["classes"],
                   "per_class_accuracy": dict(zip(card["classes"], result["per_class_accuracy"])),
                   "environment": environment_info(str(dev))})
    target = Path(out) if out else run_dir_of(run) / f"eval-{split}.json"
    write_json(target, result)
    result["written_to"] = str(target)
    return result


def predict(run: str | Path, images: list[str | Path], *, topk: int = 5, device: str = "auto",
            amp: str = "auto", retain_memory: bool = True) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for each image file, using the preprocessing stored with the model.

    Runs reslab's inference path (``reslab.evaluate.inference``: on a CPU, BN folded, channels_last, bf16 where
    ``amp`` allows, frozen TorchScript); for an exported or quantized folder, its model file.
    ``retain_memory``: as for :func:`evaluate`."""
    from reslab.data import ImageArray
    from reslab.data.sources import decode_image
    from reslab.deploy.artifact import load_for_inference
    from reslab.evaluate.calibration import stored_temperature
    from reslab.evaluate.inference import inference_runner

    if retain_memory:
        retain_freed_memory()
    loaded = load_for_inference(run, device=device)
    model, card, dev = loaded.model, loaded.card, loaded.device
    temperature = stored_temperature(run)  # 1.0 unless `reslab calibrate` fitted one
    prep = card["preprocessing"]
    arrays = [decode_image(p, channels=prep["channels"], size=tuple(prep["stored_size"])) for p in images]
    batch = ImageArray(images=np.stack(arrays), labels=np.zeros(len(arrays), dtype=np.int64),
                       files=[str(p) for p in images])
    k = min(topk, card["num_classes"])
    results = []
    amp_dtype = autocast_dtype(dev, amp)
    runner = None
    probs = []
    for x, _ in model_loader(card, batch, device=dev, batch_size=64):
        # a deployed file already is what inference_runner would build
        runner = runner or (model if loaded.deployed else inference_runner(model, x, device=dev, amp_dtype=amp_dtype))
        probs.append(torch.softmax(runner(x) / temperature, dim=1).cpu())
    probs = torch.cat(probs)
    for path, p in zip(images, probs):
        values, idx = p.topk(k)
        results.append({"file": str(path),
                        "top": [{"class": card["classes"][i], "probability": float(v)}
                                for v, i in zip(values.tolist(), idx.tolist())]})
    return results
