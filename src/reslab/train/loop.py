"""The training loop, top to bottom: setup, data, model, optimiser, resume, epochs, evaluation, checkpoints.

``train(config)`` is what ``reslab train`` calls. Under ``torchrun`` (WORLD_SIZE > 1) it runs data-parallel
with DistributedDataParallel; only rank 0 writes to the run directory.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from reslab.models import count_macs, count_params, create_model
from reslab.models.whitening import data_dependent_modules, fit_data_dependent_init, set_whitening_bias_trainable
from reslab.train import distributed as dist_utils
from reslab.train.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from reslab.train.config import TrainConfig, load_config_file, save_config
from reslab.train.engine import (Lookahead, ModelEMA, TrainingError, autocast_dtype, build_optimizer, check_loss,
                                 eval_out_of_memory_message, evaluate_loader, freeze_norm_weights, is_oom,
                                 out_of_memory_message, retain_freed_memory, select_device, set_lr, train_step)
from reslab.train.objectives import build_objective, gradient_noise_hook, set_drop_path_scale
from reslab.train.rundir import JsonlLog, default_run_dir, environment_info, read_jsonl, write_json
from reslab.train.schedules import lr_multiplier, progressive_size, resolve_milestones


WHITENING_SAMPLE = 5000  # training images that fit a patch-whitening stem (as airbench does)


@dataclass
class TrainSummary:
    run_dir: str
    status: str  # finished | interrupted
    model: str
    data: str
    epochs_done: int
    steps: int
    final: dict[str, Any]  # metrics of the last evaluation
    best: dict[str, Any]  # metrics of the best checkpoint (selected on validation when there is one)
    params: int
    macs: int
    wall_seconds: float
    train_images_per_s: float
    seed: int
    environment: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0
    skipped_files: int = 0
    init_seconds: float = 0.0  # data-dependent initialisation before step 0 (whitening fit): part of training time

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------
# Setup helpers


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:  # training batches keep one shape (drop_last), so cuDNN's per-shape algorithm search pays off at once
        torch.backends.cudnn.benchmark = True


def preprocessing_card(splits, cfg: TrainConfig) -> dict[str, Any]:
    """How an image must be prepared for this model: stored with every checkpoint, read by predict/export/serve."""
    h, w = splits.image_size
    return {
        "channels": splits.channels,
        "stored_size": [h, w],  # decode: resize shorter side, centre-crop to this (reslab.data rules)
        "input_size": [cfg.image_size or h, cfg.image_size or w],  # then bilinear-resize to this for the model
        "mean": list(splits.mean),
        "std": list(splits.std),
    }


def model_card(cfg: TrainConfig, splits, model: nn.Module, macs: int) -> dict[str, Any]:
    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    return {
        "model": cfg.model,
        "model_kwargs": kwargs,
        "num_classes": splits.num_classes,
        "in_chans": splits.channels,
        "classes": list(splits.classes),
        "preprocessing": preprocessing_card(splits, cfg),
        "params": count_params(model),
        "macs": macs,
        "data": cfg.data,
    }


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.state_dict()


def _load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig | None = None, *, resume: str | Path | None = None,
          on_step: Callable[[int], None] | None = None, **overrides) -> TrainSummary:
    """Train a model as ``cfg`` says and return a summary; see ``reslab train --help`` for every option.

    ``resume``: a run directory to continue exactly where its last checkpoint stopped (its saved config is
    used, updated with ``overrides``). ``on_step(step)``: called after every optimiser step (for tests/hooks).
    """
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise TrainingError(f"--resume {run_dir}: no config.yaml there; is it a reslab run directory?")
        base = load_config_file(run_dir / "config.yaml")
        cfg = dataclasses.replace(base, **overrides, out=str(run_dir)).validate()
    else:
        cfg = dataclasses.replace(cfg or TrainConfig(), **overrides).validate()
        run_dir = Path(cfg.out) if cfg.out else None
        # has_checkpoint also sees <last>.prev: a kill between two renames must not restart from scratch.
        if run_dir is not None and has_checkpoint(run_dir / "checkpoints" / "last"):
            if not cfg.auto_resume:
                raise TrainingError(f"--out {run_dir} already holds a run; continue it with --resume {run_dir} "
                                    "(or --auto-resume), or choose another --out")
            return train(resume=run_dir, on_step=on_step, **overrides)

    dist = dist_utils.setup(cfg.device)
    try:
        return _train(cfg, run_dir, resume is not None, dist, on_step)
    finally:
        dist_utils.teardown(dist)


def _train(cfg: TrainConfig, run_dir: Path | None, resuming: bool, dist, on_step) -> TrainSummary:
    from reslab.data import BatchLoader, load_data
    from reslab.data.augment import resize_batch
    from reslab.data.sources import stratified_split

    t_start = time.perf_counter()
    device = dist.device if dist.enabled else select_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.retain_memory:
        retain_freed_memory()
    seed_everything(cfg.seed, cfg.deterministic)
    amp_dtype = autocast_dtype(device, cfg.amp)
    is_main = dist.rank == 0

    # --- data: decoded once into a uint8 cache, held on the device, augmented there in batches
    splits = load_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, progress=cfg.progress and is_main)
    if cfg.train_fraction < 1:
        # Held-out parts of a seeded per-class permutation are nested across fractions.
        splits.train = splits.train.subset(stratified_split(splits.train.labels, cfg.train_fraction, cfg.seed)[1])
    common = dict(mean=splits.mean, std=splits.std, device=device, channels_last=cfg.channels_last,
                  image_size=cfg.image_size)
    augment = cfg.batch_augment()
    train_loader = BatchLoader(splits.train, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                               augment=augment, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                               **common)
    if len(train_loader) == 0:
        raise TrainingError(f"--batch-size {cfg.batch_size} is larger than the training set "
                            f"({len(splits.train.labels)} images); use a smaller batch")
    eval_loaders = {"test": BatchLoader(splits.test, batch_size=cfg.eval_batch_size, **common)}
    if splits.val is not None:
        eval_loaders["val"] = BatchLoader(splits.val, batch_size=cfg.eval_batch_size, **common)

    steps_per_epoch = len(train_loader)
    total_steps = cfg.iterations or cfg.epochs * steps_per_epoch
    cfg.milestones = resolve_milestones(cfg, steps_per_epoch)

    # --- model, optimiser, EMA
    model_kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path_rate:
        model_kwargs["drop_path_rate"] = cfg.drop_path_rate
    try:
        model = create_model(cfg.model, num_classes=splits.num_classes, in_chans=splits.channels, **model_kwargs)
    except TypeError as e:
        raise TrainingError(f"--model {cfg.model} does not accept these options ({e}); "
                            "check --model-kwargs / --drop-path-rate") from None
    if cfg.drop_path_rate and not any(getattr(m, "use_shortcut", False) for m in model.modules()):
        raise TrainingError(f"--drop-path-rate: {cfg.model} has no residual branches to drop (stochastic depth "
                            "needs shortcuts); use a residual model")
    if cfg.init_from and not resuming:  # fine-tuning: trained weights, a fresh head when the classes differ
        from reslab.transfer.finetune import load_initial_weights

        load_initial_weights(model, cfg.init_from, model_name=cfg.model, in_chans=splits.channels,
                             classes=list(splits.classes))
    if cfg.freeze:  # before build_optimizer, which leaves frozen parameters out
        from reslab.transfer.finetune import freeze_modules

        freeze_modules(model, cfg.freeze)
    if cfg.freeze_norm_weight and not freeze_norm_weights(model):
        raise TrainingError(f"--freeze-norm-weight: {cfg.model} has no BatchNorm/GroupNorm scales to freeze")
    if cfg.whiten_bias_epochs is not None and not data_dependent_modules(model):
        raise TrainingError(f"--whiten-bias-epochs: {cfg.model} has no patch-whitening stem (resnet9 has one with "
                            "--model-kwargs '{\"stem\": \"whiten\"}')")
    init_seconds = 0.0
    if not resuming and not cfg.init_from and data_dependent_modules(model):
        # Patch-whitening stems are fitted on training images before the first step (then checkpointed).
        t_init = time.perf_counter()
        n = len(splits.train.labels)  # a seeded random sample: the stored order may be sorted by class
        sample = splits.train.subset(np.sort(np.random.default_rng(cfg.seed).permutation(n)[:WHITENING_SAMPLE]))
        x, _ = next(iter(BatchLoader(sample, batch_size=len(sample.labels), mean=splits.mean, std=splits.std,
                                     image_size=cfg.image_size)))
        fit_data_dependent_init(model, x)
        init_seconds = time.perf_counter() - t_init
    input_hw = tuple(cfg.image_size and (cfg.image_size, cfg.image_size) or splits.image_size)
    if cfg.progressive_sizes and max(cfg.progressive_sizes) > min(input_hw):
        raise TrainingError(f"--progressive-sizes {cfg.progressive_sizes}: sides above the training images' "
                            f"{input_hw[0]}x{input_hw[1]} would upsample (slower, no information gained); "
                            f"use sizes <= {min(input_hw)}")
    macs = count_macs(model, (splits.channels, *input_hw))
    card = model_card(cfg, splits, model, macs)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.enabled and cfg.sync_bn:
        model = dist.convert_sync_batchnorm(model)  # global-batch statistics; CPU (gloo) too
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    lookahead = (Lookahead(model, cfg.lookahead_every, cfg.lookahead_decay, total_steps)
                 if cfg.lookahead_every else None)

    # --- run directory
    if run_dir is None:
        run_dir = Path(dist.broadcast_object(str(default_run_dir(cfg.model, cfg.data)) if is_main else None))
    cfg.out = str(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    metrics_log = JsonlLog(run_dir / "metrics.jsonl")
    env = environment_info(str(device))
    env["world_size"] = dist.world_size
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    # --- resume: weights, optimiser, scaler, RNG and data order
    step, epoch, best_score, best_metrics, skipped_steps, lr_scale = 0, 0, -1.0, {}, 0, 1.0
    prior_train_seconds, prior_train_images = 0.0, 0
    if resuming and has_checkpoint(ckpt_dir / "last"):
        ckpt = load_checkpoint(ckpt_dir / "last")
        _load_into(model, ckpt.model_state)
        if ema is not None and ckpt.ema_state is not None:
            ema.module.load_state_dict(ckpt.ema_state)
        st = ckpt.train_state
        optimizer.load_state_dict(st["optimizer"])
        if lookahead is not None and st.get("lookahead") is not None:
            lookahead.load_state_dict(st["lookahead"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(st["rng_cpu"])
        if device.type == "cuda" and st.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(st["rng_cuda"])
        train_loader.load_state_dict(st["loader"])
        step, epoch = st["step"], st["epoch"]
        best_score, best_metrics = st["best_score"], st.get("best_metrics", {})
        skipped_steps, lr_scale = st.get("skipped_steps", 0), st.get("lr_scale", 1.0)
        prior_train_seconds, prior_train_images = st.get("train_seconds", 0.0), st.get("train_images", 0)

    objective = build_objective(cfg, model, num_classes=splits.num_classes, in_chans=splits.channels,
                                device=device)
    step_ref = [step]  # the step the gradient-noise hook sees
    before_update = gradient_noise_hook(cfg, step_ref)

    def wrap_for_training(model: nn.Module) -> nn.Module:
        wrapped = dist.wrap(model)
        return torch.compile(wrapped) if cfg.compile else wrapped

    train_model = wrap_for_training(model)

    def save(name: str, metrics: dict | None = None) -> None:
        if not is_main:
            return
        train_state = {
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            "loader": train_loader.state_dict(),
            "step": step, "epoch": epoch, "best_score": best_score, "best_metrics": best_metrics,
            "skipped_steps": skipped_steps, "lr_scale": lr_scale,
            "train_seconds": train_seconds, "train_images": train_images,
            "lookahead": lookahead.state_dict() if lookahead is not None else None,
        }
        save_checkpoint(ckpt_dir / name, model_state=_state_dict(model), train_state=train_state,
                        ema_state=ema.module.state_dict() if ema is not None else None,
                        manifest={**card, "step": step, "epoch": epoch, "metrics": metrics or {}})

    def evaluate_now() -> dict[str, Any]:
        eval_model = ema.module if ema is not None else model
        out = {}
        for split, loader in eval_loaders.items():
            try:
                r = evaluate_loader(eval_model, loader, device=device, amp_dtype=amp_dtype,
                                    num_classes=splits.num_classes, tta_flip=cfg.tta_flip,
                                    tta_shift=cfg.tta_shift)
            except RuntimeError as e:
                if is_oom(e):
                    raise TrainingError(eval_out_of_memory_message(cfg.eval_batch_size)) from e
                raise
            out.update({f"{split}_top1": r["top1"], f"{split}_top5": r["top5"], f"{split}_loss": r["loss"]})
        return out

    progress = progress_bar(cfg.progress and is_main, total_steps, step, cfg.model)
    writer = _tensorboard(run_dir) if cfg.tensorboard and is_main else None
    status, last_eval = "finished", {}
    train_seconds, train_images = prior_train_seconds, prior_train_images
    check_finite = _check_every_step(cfg, device)
    # Without the per-step check the losses stay on the device, so a non-finite epoch can name its first bad step.
    step_losses = None if check_finite else torch.zeros(steps_per_epoch, device=device)
    try:
        while step < total_steps:
            if train_loader.state_dict()["epoch"] != epoch:  # equal only when resuming mid-epoch
                train_loader.set_epoch(epoch)
            model.train()
            if cfg.whiten_bias_epochs is not None and set_whitening_bias_trainable(
                    model, epoch < cfg.whiten_bias_epochs) and dist.enabled:
                train_model = wrap_for_training(model)  # DDP registers the parameters that need gradients
            loss_sum = torch.zeros((), device=device)
            correct_sum = torch.zeros((), device=device, dtype=torch.long)
            seen, t_epoch, epoch_start = 0, time.perf_counter(), step
            for x, y in train_loader:
                side = progressive_size(step, total_steps, cfg.progressive_sizes)
                if side is not None:
                    x = resize_batch(x, side)
                lr = cfg.lr * lr_scale * lr_multiplier(step, total_steps, cfg)
                set_lr(optimizer, lr)
                step_ref[0] = step
                if cfg.drop_path_schedule == "linear":
                    set_drop_path_scale(model, step / max(1, total_steps - 1))  # 0 at the first step, max at the last
                try:
                    result = train_step(train_model, x, y, optimizer, device=device, amp_dtype=amp_dtype,
                                        scaler=scaler, label_smoothing=cfg.label_smoothing,
                                        objective=objective, before_update=before_update,
                                        agree=dist.all_true if dist.enabled else None,
                                        check_finite=check_finite)
                except RuntimeError as e:
                    if is_oom(e):
                        raise TrainingError(out_of_memory_message(cfg.batch_size)) from e
                    raise
                check_loss(result, step, cfg.nan_policy)
                if step_losses is not None:
                    step_losses[step - epoch_start] = result.loss
                if not result.finite:
                    skipped_steps += 1
                    lr_scale *= 0.5
                else:
                    if ema is not None:
                        ema.update(model)
                    loss_sum += result.loss * y.numel()
                    correct_sum += result.correct
                    seen += y.numel()
                step += 1
                if lookahead is not None:
                    lookahead.after_step(model, step)
                if progress is not None:
                    progress.update(1)
                    if step % 10 == 0 or step == total_steps:
                        rate = seen * dist.world_size / max(1e-9, time.perf_counter() - t_epoch)
                        progress.set_postfix(epoch=epoch + 1, loss=f"{loss_sum.item() / seen:.3f}",
                                             acc=f"{correct_sum.item() / seen:.3f}", img_s=f"{rate:.0f}",
                                             refresh=False)
                if on_step is not None:
                    on_step(step)
                if step >= total_steps:
                    break
            if device.type == "cuda":  # CUDA runs asynchronously: the epoch ends when its kernels have run
                torch.cuda.synchronize(device)
            epoch_seconds = time.perf_counter() - t_epoch
            train_seconds += epoch_seconds
            train_images += seen * dist.world_size
            epoch += 1
            stats = dist.all_reduce_sum(torch.stack([loss_sum.float(), correct_sum.float(),
                                                     torch.tensor(float(seen), device=device)]))
            record = {"epoch": epoch, "step": step, "lr": lr,
                      "train_loss": (stats[0] / stats[2]).item(), "train_top1": (stats[1] / stats[2]).item(),
                      "images_per_s": seen * dist.world_size / max(1e-9, epoch_seconds),
                      "seconds": epoch_seconds}
            if cfg.progressive_sizes:  # the side of the epoch's last step
                record["train_image_size"] = progressive_size(step - 1, total_steps, cfg.progressive_sizes)
            if step_losses is not None and not math.isfinite(record["train_loss"]):
                # The first step whose loss was non-finite on any rank (every rank takes this branch together).
                bad = torch.nonzero(~torch.isfinite(dist.all_reduce_sum(step_losses[:step - epoch_start])))
                at = f"at step {epoch_start + int(bad[0])}" if len(bad) else f"during epoch {epoch}"
                raise TrainingError(f"the loss became non-finite {at}; lower --lr, check the data, "
                                    "or pass --nan-policy skip to skip such steps and halve the learning rate")
            done = step >= total_steps
            if is_main and (epoch % cfg.eval_every == 0 or done):
                last_eval = evaluate_now()
                record.update(last_eval)
                record["elapsed"] = time.perf_counter() - t_start
                metrics_log.append(record)
                if writer is not None:
                    for k, v in record.items():
                        writer.add_scalar(k, v, step)
                save("last", record)
                # Model selection on the validation split only; the test set is for reporting.
                if "val" in eval_loaders and last_eval["val_top1"] > best_score:
                    best_score, best_metrics = last_eval["val_top1"], record
                    _copy_checkpoint(ckpt_dir / "last", ckpt_dir / "best")
            elif is_main:
                record["elapsed"] = time.perf_counter() - t_start
                metrics_log.append(record)
                save("last", record)
            dist.barrier()
    except KeyboardInterrupt:
        status = "interrupted"
        save("last", {"interrupted_at_step": step})
        if progress is not None:
            progress.write(f"interrupted: checkpoint saved at step {step} in {ckpt_dir / 'last'}; "
                           f"continue with `reslab train --resume {run_dir}`")
    finally:
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()

    if is_main and status == "finished" and not last_eval:
        # Resumed from a checkpoint written after the last step (killed before the summary): evaluate it now.
        last_eval = evaluate_now()
    if is_main and status == "finished" and "val" not in eval_loaders:
        # Without a validation split there is nothing honest to select on: best is the final model.
        best_metrics = read_jsonl(metrics_log.path)[-1] if metrics_log.path.exists() else {}
        _copy_checkpoint(ckpt_dir / "last", ckpt_dir / "best")
    summary = TrainSummary(
        run_dir=str(run_dir), status=status, model=cfg.model, data=cfg.data, epochs_done=epoch, steps=step,
        final=last_eval, best=best_metrics, params=card["params"], macs=macs,
        wall_seconds=time.perf_counter() - t_start,
        train_images_per_s=train_images / max(1e-9, train_seconds), seed=cfg.seed, environment=env,
        skipped_steps=skipped_steps, skipped_files=len(getattr(splits, "skipped", []) or []),
        init_seconds=init_seconds)
    if is_main:
        write_json(run_dir / "summary.json", summary.to_dict())
        write_json(run_dir / "model.json", {**card, "metrics": last_eval, "run": str(run_dir)})
        try:
            from reslab.evaluate.curves import plot_curves

            plot_curves(run_dir)
        except Exception as e:  # a figure must never cost the run
            print(f"warning: could not draw curves.png: {e}")
    if status == "interrupted":
        raise KeyboardInterrupt
    return summary


def _check_every_step(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether each step's loss is checked for finiteness at once. The check is a host sync per step, free on a
    CPU but a pipeline stall on a GPU, so on CUDA with ``--nan-policy stop`` the losses are checked at the end of
    each epoch instead (the updates after the first bad step are then wasted, and the error still names it)."""
    return cfg.nan_policy == "skip" or device.type != "cuda"


def _copy_checkpoint(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.copy")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dst.with_name(dst.name + ".prev")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(tmp, dst)


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    """A step progress bar (tqdm: rate and ETA) on stderr, or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TrainingError("--tensorboard needs the tensorboard package: pip install 'reslab[tensorboard]'") from e
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
