"""``reslab prune``: one-shot structured channel pruning to a multiply-add budget, keeping what features matter.

Only the inside of residual blocks is pruned: the outputs of conv1 in a ``BasicBlock``, of conv1 and conv2
in a ``Bottleneck``. Each such group of channels (a *unit*: producer conv + its BN, read by one consumer
conv) can lose channels without touching the residual stream, so every shortcut and addition keeps its
width and the result is a plain, smaller, dense network of the same family (built with the
``inner_channels`` option of the ResNet builders, recorded in the checkpoint's ``model_kwargs``).

Importance, in the spirit of OPTIN (Khaki & Luo 2024, "The Need for Speed: Pruning Transformers with One
Recipe"), which prunes in one shot by how much removing a unit perturbs the features that follow:
the score of channel ``c`` is the energy of the change its removal causes in the *next layer's* feature
map, measured on a few calibration batches of training images,

    score_c = E_x,p || gamma / sigma  *  (conv_next(h_c(x)) - its mean) ||^2

(``h_c`` the channel's activation, ``conv_next`` the consumer conv restricted to that input channel,
``gamma / sigma`` the consumer BN's eval-mode scale), which is exact for the consumer's BN output because
the conv and BN are linear in ``h_c`` (computed from k*k patch Gram matrices, no per-channel forward).
The mean part of the change is not lost: it is folded into the
consumer BN's running mean when the channel is removed (a bias correction), so only the varying part
counts against the channel. Scores are divided by their unit's total so units of different
scale compare, and channels are removed greedily, cheapest importance per multiply-add first, until the
MAC budget is met (never below ``min_keep`` of a unit). The pruned net's BN statistics are then
re-estimated on the same calibration images (no gradient step). A short optional fine-tune reuses
reslab.train's step functions.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.models import count_macs, count_params, create_model
from reslab.models.blocks import BasicBlock, Bottleneck
from reslab.train.rundir import environment_info, write_json


@dataclass
class Unit:
    """A prunable group of channels: the outputs of ``producer`` (+ ``bn``), the inputs of ``consumer``."""

    name: str  # e.g. "layer2.1.conv1"
    block_index: int  # position of the block in network order (index into inner_channels)
    slot: int  # 0: conv1 outputs, 1: conv2 outputs (bottleneck)
    producer: nn.Conv2d
    bn: nn.BatchNorm2d
    consumer: nn.Conv2d
    consumer_bn: nn.BatchNorm2d

    @property
    def width(self) -> int:
        return self.producer.out_channels


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's residual blocks in network order (stage by stage), as (qualified name, module)."""
    infos = getattr(model, "stage_info", None)
    if not infos:
        raise ValueError(f"{type(model).__name__} has no stage_info; only reslab ResNets can be pruned")
    blocks = []
    for info in infos:
        for i, block in enumerate(getattr(model, info.name)):
            blocks.append((f"{info.name}.{i}", block))
    return blocks


def prunable_units(model: nn.Module) -> list[Unit]:
    """Every unit of a reslab ResNet (``BasicBlock``/``Bottleneck`` with ungrouped convs); others raise."""
    units = []
    for index, (name, block) in enumerate(residual_blocks(model)):
        if type(block) is BasicBlock:
            units.append(Unit(f"{name}.conv1", index, 0, block.conv1, block.bn1, block.conv2, block.bn2))
        elif type(block) is Bottleneck and block.conv2.groups == 1:
            units.append(Unit(f"{name}.conv1", index, 0, block.conv1, block.bn1, block.conv2, block.bn2))
            units.append(Unit(f"{name}.conv2", index, 1, block.conv2, block.bn2, block.conv3, block.bn3))
        else:
            raise ValueError(f"cannot prune {name} ({type(block).__name__}): reslab prune supports the resnet*/plain* "
                             "families (BasicBlock, ungrouped Bottleneck)")
    return units


def inner_channels_of(model: nn.Module) -> list[list[int]]:
    """The ``inner_channels`` model argument describing ``model``'s current block interiors."""
    widths: dict[int, list[int]] = {}
    for u in prunable_units(model):
        widths.setdefault(u.block_index, []).append(u.width)
    return [widths[i] for i in sorted(widths)]


# ---------------------------------------------------------------------------------------------------------
# Importance
# ---------------------------------------------------------------------------------------------------------
def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)


@torch.no_grad()
def _feature_sums(h: torch.Tensor, unit: Unit, chunk_elements: int = 2 ** 24) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For each input channel c of ``unit.consumer`` and output channel o: the sums over batch and positions
    of conv(h_c)[o] and of its square (pre-BN), and the number of positions summed.

    conv(h_c)[o] at a position is ``w_oc . p_c`` with ``p_c`` the channel's k*k input patch there, so the
    sums are ``w_oc . sum(p_c)`` and ``w_oc^T (sum p_c p_c^T) w_oc``: one k*k Gram matrix per channel
    (``F.unfold`` patches, zero padding and stride included) serves every output channel. Chunked over
    channels to bound memory.
    """
    conv = unit.consumer
    if conv.groups != 1:
        raise ValueError(f"{unit.name}: grouped consumer convolutions are not supported")
    weight = conv.weight.detach().float()  # (O, C, kh, kw)
    out_channels, in_channels = weight.shape[:2]
    kk = weight.shape[2] * weight.shape[3]
    batch = h.shape[0]
    first = torch.empty(in_channels, out_channels, dtype=torch.float64)
    second = torch.empty(in_channels, out_channels, dtype=torch.float64)
    positions = 0
    step = max(1, chunk_elements // max(1, batch * kk * h.shape[2] * h.shape[3]))
    for start in range(0, in_channels, step):
        stop = min(in_channels, start + step)
        n = stop - start
        cols = F.unfold(h[:, start:stop], conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                        stride=conv.stride).view(batch, n, kk, -1)
        positions = batch * cols.shape[-1]
        sums = cols.sum(dim=(0, 3)).double()  # (n, kk)
        gram = torch.einsum("bnkl,bnjl->nkj", cols, cols).double()  # (n, kk, kk)
        w = weight[:, start:stop].reshape(out_channels, n, kk).transpose(0, 1).double()  # (n, O, kk)
        first[start:stop] = torch.einsum("nok,nk->no", w, sums)
        second[start:stop] = torch.einsum("nok,nkj,noj->no", w, gram, w)
    return first, second, positions


@torch.no_grad()
def feature_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Per unit: ``score`` (one per channel, see the module docstring) and ``mean`` (C x O: the mean
    contribution of each channel to each pre-BN output of the consumer, used to correct the consumer BN's
    running mean when the channel is removed)."""
    model = model.eval()
    units = prunable_units(model)
    sums = {u.name: [0.0, 0.0, 0] for u in units}
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for u in units:
        def hook(_module, inputs, name=u.name):
            captured[name] = inputs[0].detach().float()
        handles.append(u.consumer.register_forward_pre_hook(hook))
    try:
        for x in batches:
            captured.clear()
            model(x.float())
            for u in units:
                first, second, n = _feature_sums(captured[u.name], u)
                acc = sums[u.name]
                acc[0], acc[1], acc[2] = acc[0] + first, acc[1] + second, acc[2] + n
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for u in units:
        first, second, n = sums[u.name]
        if n == 0:
            raise ValueError("feature_statistics needs at least one calibration batch")
        mean = first / n
        # Energy of the change around its mean: the mean part is restored exactly by shifting the
        # consumer BN's running mean (see _slice_state), so only the varying part is lost.
        centred = (second / n - mean.pow(2)).clamp_min(0)
        scale2 = _bn_scale(u.consumer_bn).double().pow(2)
        stats[u.name] = {"score": (centred * scale2).sum(1), "mean": mean}
    return stats


def channel_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Score of every prunable channel (see the module docstring): the per-position mean squared change
    its removal causes in the next layer's BN output, around its mean, over calibration images."""
    return {k: v["score"] for k, v in feature_statistics(model, batches).items()}


# ---------------------------------------------------------------------------------------------------------
# Selection under a multiply-add budget
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _conv_geometry(model: nn.Module, input_size: tuple[int, int, int]) -> dict[nn.Conv2d, int]:
    """Output spatial size (h*w) of every conv, recorded with hooks on one zero image."""
    sizes = {}
    handles = [m.register_forward_hook(lambda m, _i, o: sizes.__setitem__(m, o.shape[2] * o.shape[3]))
               for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        model.eval()(torch.zeros(1, *input_size))
    finally:
        for h in handles:
            h.remove()
    return sizes


def select_channels(model: nn.Module, scores: dict[str, torch.Tensor], target_macs: float,
                    input_size: tuple[int, int, int], *, min_keep: float = 0.1,
                    round_to: int = 1) -> dict[str, list[int]]:
    """Channels to keep per unit so that MACs <= ``target_macs`` x the original.

    Greedy: channels sorted by (score / unit total) / (MACs the channel costs), lowest first, removed one by
    one while the exact MAC count (recomputed from the widths) is above budget. A unit keeps at least
    ``max(1, ceil(min_keep * width))`` channels. Raises when the budget cannot be met.

    ``round_to``: every pruned unit keeps a multiple of this many channels (or its full width), so the
    convolutions' channel counts fill the CPU's SIMD blocks (8 fp32 lanes with AVX2, 16 with AVX-512): a
    unit's channels, least important first, are removed in chunks of ``round_to`` (the first chunk takes
    the remainder ``width % round_to``), each chunk ranked by its summed share per multiply-add.
    """
    if not 0 < target_macs <= 1:
        raise ValueError(f"--target-macs must be a fraction in (0, 1], got {target_macs}")
    if round_to < 1:
        raise ValueError(f"--round-to must be a positive number of channels, got {round_to}")
    units = prunable_units(model)
    original = count_macs(model, input_size)
    hw = _conv_geometry(model, input_size)
    k = {u.name: (u.producer.kernel_size[0] * u.producer.kernel_size[1],
                  u.consumer.kernel_size[0] * u.consumer.kernel_size[1]) for u in units}
    width = {u.name: u.width for u in units}
    by_producer = {u.producer: u for u in units}
    by_consumer = {u.consumer: u for u in units}

    def conv_macs(conv: nn.Conv2d) -> int:
        cin = width[by_consumer[conv].name] if conv in by_consumer else conv.in_channels
        cout = width[by_producer[conv].name] if conv in by_producer else conv.out_channels
        return cin * cout * conv.kernel_size[0] * conv.kernel_size[1] * hw[conv] // conv.groups

    convs = {u.producer for u in units} | {u.consumer for u in units}
    fixed = original - sum(conv_macs(c) for c in convs)

    def total() -> int:
        return fixed + sum(conv_macs(c) for c in convs)

    def channel_cost(u: Unit) -> int:
        # MACs saved by removing one channel: one output map of the producer, one input of the consumer.
        cin = width[by_consumer[u.producer].name] if u.producer in by_consumer else u.producer.in_channels
        return (cin * k[u.name][0] * hw[u.producer] + u.consumer.out_channels * k[u.name][1] * hw[u.consumer])

    # Removal candidates: chunks of a unit's channels, least important first. A unit's chunks rank in
    # ascending order (channel cost is the same across a unit), so the greedy order removes them in turn.
    candidates = []
    for u in units:
        s = scores[u.name].double()
        share = s / s.sum().clamp_min(1e-30)
        cost = channel_cost(u) / original
        order = torch.argsort(share, stable=True).tolist()
        bounds = [0, *range(u.width % round_to or round_to, u.width, round_to), u.width]
        for start, end in zip(bounds, bounds[1:]):
            chunk = order[start:end]
            candidates.append((float(share[chunk].sum()) / (cost * len(chunk)), u.name, start, chunk))
    candidates.sort()
    floor = {u.name: max(1, math.ceil(min_keep * u.width)) for u in units}
    removed: dict[str, set[int]] = {u.name: set() for u in units}
    budget = target_macs * original
    current = total()
    for _, name, _, chunk in candidates:
        if current <= budget:
            break
        if width[name] - len(chunk) < floor[name]:
            continue
        removed[name].update(chunk)
        width[name] -= len(chunk)
        current = total()
    if current > budget * 1.0001:
        rounding = f" in multiples of {round_to} channels (--round-to)" if round_to > 1 else ""
        raise ValueError(f"--target-macs {target_macs}: cannot go below {current / original:.3f} of the MACs "
                         f"while keeping {min_keep:.0%} of every block's inner channels{rounding}; "
                         "lower --min-keep" + (" or --round-to" if round_to > 1 else ""))
    return {u.name: [c for c in range(u.width) if c not in removed[u.name]] for u in units}


# ---------------------------------------------------------------------------------------------------------
# Building the smaller dense model
# ---------------------------------------------------------------------------------------------------------
def _slice_state(model: nn.Module, keep: dict[str, list[int]],
                 means: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state_dict with pruned channels cut out of producer, its BN and consumer.

    ``means`` (unit -> C x O mean contributions): the consumer BN's running mean loses the mean
    contribution of each removed channel, so the BN keeps centring its input correctly.
    """
    names = {m: n for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    units = prunable_units(model)
    for u in units:
        if means is not None and u.name in means:
            removed = sorted(set(range(u.width)) - set(keep[u.name]))
            if removed:
                shift = means[u.name][removed].sum(0).to(state[f"{names[u.consumer_bn]}.running_mean"].dtype)
                state[f"{names[u.consumer_bn]}.running_mean"] -= shift
    for u in units:
        idx = torch.tensor(keep[u.name], dtype=torch.long)
        p, bn, c = names[u.producer], names[u.bn], names[u.consumer]
        state[f"{p}.weight"] = state[f"{p}.weight"].index_select(0, idx)
        if u.producer.bias is not None:
            state[f"{p}.bias"] = state[f"{p}.bias"].index_select(0, idx)
        for key in ("weight", "bias", "running_mean", "running_var"):
            state[f"{bn}.{key}"] = state[f"{bn}.{key}"].index_select(0, idx)
        state[f"{c}.weight"] = state[f"{c}.weight"].index_select(1, idx)
    return state


def build_pruned(model: nn.Module, keep: dict[str, list[int]], *, model_name: str | None = None,
                 num_classes: int | None = None, in_chans: int | None = None, model_kwargs: dict | None = None,
                 means: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, dict]:
    """A new, smaller dense model of the same family with only the kept channels, and its model_kwargs."""
    name = model_name or getattr(model, "model_name", None)
    if name is None:
        raise ValueError("the model has no registry name (model_name); pass model_name=")
    units = prunable_units(model)
    widths: dict[int, list[int]] = {}
    for u in units:
        widths.setdefault(u.block_index, []).append(len(keep[u.name]))
    kwargs = {**(model_kwargs or {}), "inner_channels": [widths[i] for i in sorted(widths)]}
    pruned = create_model(name, num_classes=num_classes or model.num_classes,
                          in_chans=in_chans or model.conv1.in_channels, **kwargs)
    pruned.load_state_dict(_slice_state(model, keep, means))
    return pruned.eval(), kwargs


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate every BN's running statistics on ``batches`` (cumulative average, no weight changes).

    Removing channels shifts the mean and variance each consumer BN sees; re-estimating them on the
    calibration images (as EagleEye, Li et al. 2020, "adaptive BN") recovers most of the one-shot loss.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all calibration batches
    model.train()
    try:
        for x in batches:
            model(x.float())
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.eval()
    return model


def prune_model(model: nn.Module, calibration: list[torch.Tensor], target_macs: float, *,
                input_size: tuple[int, int, int], min_keep: float = 0.1, model_name: str | None = None,
                model_kwargs: dict | None = None, recalibrate_bn: bool = True,
                round_to: int = 1, stats: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """One-shot prune ``model`` to ``target_macs`` of its MACs. Returns (pruned model, info dict).

    ``recalibrate_bn``: re-estimate BN statistics of the pruned model on the calibration batches.
    ``round_to``: keep a multiple of this many channels per pruned unit (:func:`select_channels`).
    ``stats``: :func:`feature_statistics` of ``model`` on ``calibration``, when already computed.
    """
    model = copy.deepcopy(model).cpu().float().eval()
    stats = stats if stats is not None else feature_statistics(model, calibration)
    keep = select_channels(model, {k: v["score"] for k, v in stats.items()}, target_macs, input_size,
                           min_keep=min_keep, round_to=round_to)
    pruned, kwargs = build_pruned(model, keep, model_name=model_name, model_kwargs=model_kwargs,
                                  in_chans=input_size[0], means={k: v["mean"] for k, v in stats.items()})
    if recalibrate_bn:
        recalibrate_batchnorm(pruned, calibration)
    macs_before, macs_after = count_macs(model, input_size), count_macs(pruned, input_size)
    info = {"target_macs": target_macs, "macs_before": macs_before, "macs_after": macs_after,
            "macs_fraction": macs_after / macs_before, "params_before": count_params(model),
            "params_after": count_params(pruned), "model_kwargs": kwargs,
            "kept_channels": {k: len(v) for k, v in keep.items()}, "round_to": round_to,
            "calibration_images": int(sum(b.shape[0] for b in calibration)), "recalibrated_bn": recalibrate_bn}
    return pruned, info


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning (reslab.train's step functions) and the run-level command
# ---------------------------------------------------------------------------------------------------------
def finetune(model: nn.Module, splits, card: dict, cfg, epochs: int, *, lr: float, device: torch.device,
             log=None, progress: bool = True, desc: str = "fine-tune") -> nn.Module:
    """A short fine-tune: SGD with cosine decay from ``lr`` over ``epochs``, the run's augmentation and
    batch size, ``train_step`` from reslab.train.engine. ``progress``: a step progress bar on stderr."""
    from reslab.data import BatchLoader
    from reslab.train.engine import autocast_dtype, build_optimizer, set_lr, train_step
    from reslab.train.loop import progress_bar

    prep = card["preprocessing"]
    h, w = prep["input_size"]
    loader = BatchLoader(splits.train, batch_size=min(cfg.batch_size, len(splits.train.labels)), mean=prep["mean"],
                         std=prep["std"], device=device, shuffle=True, drop_last=True, seed=cfg.seed,
                         augment=cfg.batch_augment(),
                         image_size=h if (h, w) != tuple(prep["stored_size"]) else None)
    model = model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    amp_dtype = autocast_dtype(device, cfg.amp)
    total, step = epochs * len(loader), 0
    bar = progress_bar(progress, total, 0, desc)
    try:
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            seen, loss_sum, start = 0, 0.0, time.perf_counter()
            for x, y in loader:
                set_lr(optimizer, lr * 0.5 * (1 + math.cos(math.pi * step / total)))
                result = train_step(model, x, y, optimizer, device=device, amp_dtype=amp_dtype, scaler=None)
                loss_sum += float(result.loss) * y.numel()
                seen += y.numel()
                step += 1
                if bar is not None:
                    bar.update(1)
            if log is not None:
                log.append({"finetune_epoch": epoch + 1, "train_loss": loss_sum / max(1, seen),
                            "seconds": time.perf_counter() - start})
    finally:
        if bar is not None:
            bar.close()
    return model.eval()


def time_models(models: dict[str, nn.Module], x: torch.Tensor, *, repeats: int = 5,
                min_seconds: float = 0.3) -> dict[str, dict[str, float]]:
    """images/s of each model on batch ``x`` along two paths, all timed side by side (interleaved, medians):
    ``eager`` (fp32 PyTorch, what the MAC count predicts least well: per-layer overhead stays) and
    ``deployed``, the path ``reslab predict``/``serve`` run on this CPU
    (:func:`reslab.evaluate.inference.inference_runner`: ONNX Runtime fp32 without native bf16, BN-folded
    frozen bf16 TorchScript with it)."""
    from reslab.bench import time_interleaved
    from reslab.evaluate.inference import inference_runner
    from reslab.train.engine import autocast_dtype

    cpu = torch.device("cpu")
    amp = autocast_dtype(cpu, "auto")
    fns = {}
    for name, model in models.items():
        model = model.cpu().eval()
        deployed = inference_runner(model, x, device=cpu, amp_dtype=amp)

        def eager(model=model):
            with torch.inference_mode():
                model(x)

        fns[(name, "eager")] = eager
        fns[(name, "deployed")] = lambda deployed=deployed: deployed(x)
    samples = time_interleaved(fns, repeats=repeats, min_seconds=min_seconds)
    speed: dict[str, dict[str, float]] = {name: {} for name in models}
    for (name, path), seconds in samples.items():
        speed[name][f"{path}_images_per_s"] = x.shape[0] / statistics.median(seconds)
    return speed


def _write_point(info: dict, base: dict, speed_note: str | None, device: torch.device) -> None:
    write_json(Path(info["run"]) / "prune.json",
               {**info, "baseline": base, "speed": speed_note, "environment": environment_info(str(device))})


def prune(run: str | Path, target_macs: float | list[float] = 0.5, *, data: str | None = None,
          finetune_epochs: int = 0, finetune_lr: float | None = None, calibration_images: int = 256,
          min_keep: float = 0.1, round_to: int = 1, out: str | Path | None = None, device: str = "auto",
          measure_speed: bool = True, export_onnx: bool = False, seed: int = 0,
          speed_repeats: int = 5, progress: bool = True) -> dict[str, Any]:
    """``reslab prune RUN``: one pruned run per budget in ``out`` (default ``RUN/pruned``) and a report.

    Each budget ``t`` gives ``out/macs-<t>/`` (checkpoints, model.json, prune.json, config.yaml) that
    ``reslab eval``/``export`` read like any run. With several budgets, ``out/prune-curve.json`` and
    ``.png`` hold top-1 against multiply-adds. The unpruned and every pruned model are timed side by side
    at the end (:func:`time_models`), so the speedups of one report share the machine's load.
    """
    from reslab.deploy.quantize import _split_batches
    from reslab.evaluate.evaluate import load_data_for_model
    from reslab.train.checkpoint import checkpoint_run_dir, find_checkpoint, load_model, save_checkpoint
    from reslab.train.config import TrainConfig, load_config_file, save_config
    from reslab.train.engine import select_device
    from reslab.train.rundir import JsonlLog

    targets = [target_macs] if isinstance(target_macs, (int, float)) else list(target_macs)
    for t in targets:
        if not 0 < t <= 1:
            raise ValueError(f"--target-macs must be fractions in (0, 1], got {t}")
    dev = select_device(device)
    model, card = load_model(run, device="cpu")
    ckpt = find_checkpoint(run)
    run_dir = checkpoint_run_dir(ckpt)
    out = Path(out) if out else run_dir / "pruned"
    cfg = load_config_file(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else TrainConfig()
    splits = load_data_for_model(card, data)
    calibration, _ = _split_batches(splits.train, card, calibration_images, batch_size=64, seed=seed)
    test_batches, test_labels = _split_batches(splits.test, card, None, batch_size=512)
    h, w = card["preprocessing"]["input_size"]
    input_size = (card["in_chans"], h, w)
    bench_x = torch.cat(test_batches)[: 64 if h * w <= 64 * 64 else 16].contiguous()

    def top1(m: nn.Module) -> float:
        with torch.no_grad():
            m = m.cpu().eval()
            return float(torch.cat([m(x).argmax(1) for x in test_batches]).eq(test_labels).float().mean())

    base = {"macs": count_macs(model, input_size), "params": count_params(model), "top1": top1(model),
            # the same BN re-estimation the pruned nets get, so their comparison with the baseline is fair
            "top1_bn_recalibrated": top1(recalibrate_batchnorm(copy.deepcopy(model), calibration))}
    # Every budget is checked before any fine-tuning, so an unreachable one fails in seconds, not after the others.
    stats = feature_statistics(copy.deepcopy(model).eval(), calibration)
    for t in targets:
        select_channels(model, {k: v["score"] for k, v in stats.items()}, t, input_size, min_keep=min_keep,
                        round_to=round_to)
    if finetune_epochs > 0:  # the control: the same fine-tune on the unpruned net (extra training helps it too)
        torch.manual_seed(seed)
        tuned = finetune(copy.deepcopy(model), splits, card, cfg, finetune_epochs, lr=finetune_lr or cfg.lr * 0.1,
                         device=dev, progress=progress, desc="fine-tune unpruned (control)")
        base["top1_finetuned"] = top1(tuned)
        del tuned
    points, pruned_models = [], {}
    for t in targets:
        torch.manual_seed(seed)
        pruned, info = prune_model(model, calibration, t, input_size=input_size, min_keep=min_keep,
                                   model_name=card["model"], model_kwargs=card.get("model_kwargs", {}),
                                   round_to=round_to, stats=stats)
        info["top1_oneshot"] = top1(pruned)
        folder = out / f"macs-{t:.2f}"
        log = JsonlLog(folder / "metrics.jsonl")
        if finetune_epochs > 0:
            pruned = finetune(pruned, splits, card, cfg, finetune_epochs, lr=finetune_lr or cfg.lr * 0.1,
                              device=dev, log=log, progress=progress, desc=f"fine-tune macs-{t:.2f}").cpu()
            info["top1_finetuned"] = top1(pruned)
        info["top1"] = info.get("top1_finetuned", info["top1_oneshot"])
        info["finetune_epochs"] = finetune_epochs
        manifest = {k: v for k, v in card.items() if k not in ("files", "format_version", "step", "epoch")}
        manifest.update({"model_kwargs": info["model_kwargs"], "params": info["params_after"],
                         "macs": info["macs_after"], "metrics": {"test_top1": info["top1"]},
                         "pruned_from": str(ckpt), "prune": {"target_macs": t, "macs_fraction": info["macs_fraction"]}})
        for name in ("last", "best"):
            save_checkpoint(folder / "checkpoints" / name, model_state=pruned.state_dict(), manifest=manifest)
        # The source run's config with the pruned architecture: `reslab train` on it would train the
        # smaller net from scratch; the weights here are the pruned (and fine-tuned) ones.
        save_config(dataclasses.replace(cfg, model_kwargs=info["model_kwargs"], out=str(folder)),
                    folder / "config.yaml")
        write_json(folder / "model.json", {**manifest, "run": str(folder)})
        info["run"] = str(folder)
        if export_onnx:
            from reslab.deploy.export import export_model

            info["onnx"] = export_model(folder, "onnx", folder / "export")["parity"]
        log.append({"top1_oneshot": info["top1_oneshot"], "top1": info["top1"]})
        _write_point(info, base, None, dev)  # on disk now; rewritten with the speeds once all are timed
        points.append(info)
        pruned_models[f"{t:.2f}"] = pruned
    speed_note = None
    if measure_speed:
        speed = time_models({"unpruned": model, **pruned_models}, bench_x, repeats=speed_repeats)
        base.update(speed["unpruned"])
        for info in points:
            info.update(speed[f"{info['target_macs']:.2f}"])
            for path in ("eager", "deployed"):
                info[f"{path}_speedup"] = info[f"{path}_images_per_s"] / base[f"{path}_images_per_s"]
        speed_note = (f"images/s on one batch of {bench_x.shape[0]}, {torch.get_num_threads()} threads, CPU, "
                      f"the unpruned and every pruned model timed side by side (median of {speed_repeats}): "
                      "eager = fp32 PyTorch; deployed = what reslab predict/serve run here")
        for info in points:
            _write_point(info, base, speed_note, dev)
    report = {"run": str(run_dir), "checkpoint": str(ckpt), "baseline": base, "points": points,
              "speed": speed_note, "environment": environment_info(str(dev))}
    out.mkdir(parents=True, exist_ok=True)
    if len(targets) > 1:
        write_json(out / "prune-curve.json", report)
        plot_curve(report, out / "prune-curve.png")
    report["written_to"] = str(out)
    return report


def plot_curve(report: dict, path: str | Path) -> None:
    """Top-1 against multiply-adds for the baseline and every pruning budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = report["baseline"]
    pts = sorted(report["points"], key=lambda p: p["macs_after"])
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.plot([p["macs_after"] / 1e6 for p in pts], [100 * p["top1_oneshot"] for p in pts], "o--",
            label="one-shot (no fine-tune)")
    if any("top1_finetuned" in p for p in pts):
        ax.plot([p["macs_after"] / 1e6 for p in pts if "top1_finetuned" in p],
                [100 * p["top1_finetuned"] for p in pts if "top1_finetuned" in p], "o-",
                label=f"+ fine-tune ({pts[0]['finetune_epochs']} ep)")
    ax.plot([base["macs"] / 1e6], [100 * base["top1"]], "k*", markersize=10, label="unpruned")
    if "top1_bn_recalibrated" in base:
        ax.plot([base["macs"] / 1e6], [100 * base["top1_bn_recalibrated"]], "kx", markersize=8,
                label="unpruned, BN re-estimated")
    if "top1_finetuned" in base:
        ax.plot([base["macs"] / 1e6], [100 * base["top1_finetuned"]], "k^", markersize=7,
                label="unpruned, same fine-tune")
    for p in pts:
        ax.annotate(f"{p['target_macs']:.1f}", (p["macs_after"] / 1e6, 100 * p["top1"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("multiply-adds per image (M)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
