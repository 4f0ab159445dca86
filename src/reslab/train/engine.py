"""Small step functions with explicit parameters, each testable alone: device/precision choice, the
optimizer, one training step, evaluation over a loader, and the weight EMA."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import platform
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.train.config import TrainConfig


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, out of memory, ...); the message says what to change."""


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``, read once; empty where it cannot be read)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return frozenset()
    return frozenset({flag for line in text.splitlines() if line.startswith(("flags", "Features"))
            for flag in line.split(":", 1)[1].split()})


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.lru_cache(maxsize=1)
def retain_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Keep freed memory (up to ``limit_bytes``) in the process instead of handing it back to the kernel.

    glibc's malloc serves large blocks (activations, gradients) with fresh ``mmap`` pages and unmaps them on
    free, so each training step faults in and zeroes the same tens of megabytes again: on the 2-core EPYC VM
    this was 5,000-12,000 page faults and 40-70 ms of kernel time per ``fast``-recipe step (docs/performance.md,
    "Memory allocator"). Raising the mmap and trim thresholds lets the next step reuse the blocks, as jemalloc
    or tcmalloc would (PyTorch's CPU performance tuning guide). Inference pays the same way for each batch's
    activations, so ``reslab eval``, ``predict`` and ``serve`` apply it too (eager fp32 ResNets ~1.5x faster in
    fresh processes; docs/performance.md). Process-wide and lasting; applied once.
    Returns whether it took effect (False where the C library is not glibc).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, limit_bytes))


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast is faster than fp32 on CPUs with native bf16 dot products (AVX512-BF16 or AMX)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (None: full fp32)."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov), AdamW or Muon; BN parameters and biases optionally excluded from weight decay.

    ``muon`` (``reslab.train.muon``, airbench94_muon's split): every conv filter bank (4-D weight) outside the
    classifier gets Muon at ``muon_lr`` with ``muon_momentum`` and no weight decay; everything else Nesterov SGD at
    ``lr``. Both follow the schedule: the Muon group's ``lr_mult`` is ``muon_lr / lr``.

    With ``backbone_lr_mult != 1`` every parameter outside the classifier ``fc`` learns at ``lr * backbone_lr_mult``
    (discriminative fine-tuning, Howard & Ruder 2018, §3.2): each group carries its ``lr_mult`` for ``set_lr``.
    ``norm_bias_lr_mult`` multiplies the lr of BN and whitening biases (airbench's ``bias_scaler``, 64 there).
    Frozen parameters (``requires_grad=False``) are left out.
    """
    mults = [cfg.backbone_lr_mult] if cfg.backbone_lr_mult == 1.0 else [cfg.backbone_lr_mult, 1.0]
    if cfg.norm_bias_lr_mult != 1.0:
        mults.append(cfg.backbone_lr_mult * cfg.norm_bias_lr_mult)
    buckets: dict[tuple[float, bool], list] = {(m, d): [] for m in mults for d in (True, False)}
    filters: list[nn.Parameter] = []  # --optimizer muon: the conv filter banks
    norm_biases = {id(p) for p in _norm_biases(model)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.optimizer == "muon" and p.ndim == 4 and not name.startswith("fc."):
            filters.append(p)
            continue
        mult = 1.0 if name.startswith("fc.") else cfg.backbone_lr_mult
        if id(p) in norm_biases:
            mult *= cfg.norm_bias_lr_mult
        buckets[(mult, not (cfg.no_decay_bn_bias and p.ndim <= 1))].append(p)
    groups = [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_mult": mult}
              for (mult, decay), params in buckets.items() if params or (decay and mult == mults[0])]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "muon":
        from reslab.train.muon import Muon

        if filters:  # outside the classifier, so at the backbone's lr multiplier
            groups.append({"params": filters, "muon": True, "weight_decay": 0.0, "momentum": cfg.muon_momentum,
                           "lr_mult": cfg.backbone_lr_mult * cfg.muon_lr / cfg.lr})
        return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.optimizer == "nesterov")


_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)  # BN (any dimension, sync BN) and GroupNorm


def _norm_biases(model: nn.Module) -> list[nn.Parameter]:
    """The per-channel biases of normalization layers and of data-dependent stems (patch whitening):
    the parameters airbench's ``bias_scaler`` speeds up (Jordan 2024, §3.4)."""
    from reslab.models.whitening import PatchWhitening

    kinds = (*_NORM_LAYERS, nn.LayerNorm, PatchWhitening)
    return [m.bias for m in model.modules() if isinstance(m, kinds) and isinstance(m.bias, nn.Parameter)]


def freeze_norm_weights(model: nn.Module) -> int:
    """Fix every BN/GroupNorm scale at its value (1 at initialisation) so only the biases learn, as in
    airbench's BatchNorm (Jordan 2024): with a BN after every conv the scale is redundant with the filters'.
    Returns the number of layers frozen."""
    layers = [m for m in model.modules() if isinstance(m, _NORM_LAYERS) and isinstance(m.weight, nn.Parameter)]
    for m in layers:
        m.weight.requires_grad_(False)
    return len(layers)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss of the batch (detached)
    correct: torch.Tensor  # number of correct top-1 predictions (detached)
    finite: bool


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, *,
               device: torch.device, amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler | None,
               label_smoothing: float = 0.0, objective=None, before_update=None,
               agree: Callable[[bool], bool] | None = None, check_finite: bool = True) -> StepResult:
    """One optimiser step on ``objective(model, x, y) -> (loss, logits)`` (default: cross-entropy).

    ``before_update(model)`` runs between backward and the update (e.g. gradient noise). A non-finite loss
    skips the update and reports ``finite=False``. ``agree`` (data parallel: ``DistContext.all_true``) turns
    "finite here" into "finite on every rank", so all ranks skip or step together and none is left waiting
    in the gradient all_reduce.
    """
    with autocast(device, amp_dtype):
        if objective is None:
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        else:
            loss, logits = objective(model, x, y)
    # A host sync per step: free on a CPU, a pipeline stall on a GPU. With check_finite=False the update always
    # runs and the loop checks the epoch's loss instead (nan_policy "stop").
    finite = bool(torch.isfinite(loss)) if check_finite else True
    if agree is not None:
        finite = agree(finite)
    optimizer.zero_grad(set_to_none=True)
    if finite:
        if scaler is not None:
            scaler.scale(loss).backward()
            if before_update is not None:
                scaler.unscale_(optimizer)
                before_update(model)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if before_update is not None:
                before_update(model)
            optimizer.step()
    with torch.no_grad():
        correct = (logits.argmax(1) == y).sum()
    return StepResult(loss.detach(), correct, finite)


def _translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift (B, C, H, W) images by (dy, dx) pixels, filling the border by reflection."""
    s = max(abs(dy), abs(dx))
    h, w = x.shape[-2:]
    if s >= min(h, w):  # reflection needs a border narrower than the image
        raise ValueError(f"tta_shift {s} is too large for {h}x{w} images (must be < {min(h, w)})")
    padded = F.pad(x, (s, s, s, s), mode="reflect")
    return padded[..., s - dy: s - dy + h, s - dx: s - dx + w]


def tta_logits(model: nn.Module, x: torch.Tensor, *, flip: bool = False, shift: int = 0) -> torch.Tensor:
    """Test-time augmentation: logits averaged over the image, its mirror (``flip``) and, with ``shift`` > 0,
    copies translated by (+shift, +shift) and (-shift, -shift) pixels (each with its mirror). The untranslated
    views weigh 1/2 and each translated pair 1/4, the weighting of airbench's multi-crop TTA (Jordan 2024, §3.6)."""
    def views(images):
        logits = model(images).float()
        return (logits + model(torch.flip(images, dims=[3])).float()) / 2 if flip else logits

    logits = views(x)
    if shift > 0:
        logits = logits / 2 + (views(_translate(x, shift, shift)) + views(_translate(x, -shift, -shift))) / 4
    return logits


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader, *, device: torch.device, amp_dtype: torch.dtype | None,
                    num_classes: int, tta_flip: bool = False, tta_shift: int = 0,
                    return_outputs: bool = False) -> dict:
    """Top-1, top-5, mean loss and per-class accuracy of ``model`` over every sample of ``loader``
    (with test-time augmentation when ``tta_flip``/``tta_shift`` ask for it, see :func:`tta_logits`)."""
    was_training = model.training
    model.eval()
    total, loss_sum, correct1, correct5 = 0, 0.0, 0, 0
    class_total = torch.zeros(num_classes, dtype=torch.long)
    class_correct = torch.zeros(num_classes, dtype=torch.long)
    all_logits, all_labels = [], []
    k = min(5, num_classes)
    for x, y in loader:
        with autocast(device, amp_dtype):
            logits = tta_logits(model, x, flip=tta_flip, shift=tta_shift)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        topk = logits.topk(k, dim=1).indices
        # argmax, not topk[:, 0]: the two break exact ties differently, and int8 logits tie often (9 of 10,000
        # CIFAR-10 test images for a quantized resnet20); argmax is what the quantize report and the rest use
        hit1 = logits.argmax(1) == y
        correct1 += int(hit1.sum())
        correct5 += int((topk == y[:, None]).any(1).sum())
        total += y.numel()
        y_cpu, hit_cpu = y.cpu(), hit1.cpu()
        class_total += torch.bincount(y_cpu, minlength=num_classes)
        class_correct += torch.bincount(y_cpu[hit_cpu], minlength=num_classes)
        if return_outputs:
            all_logits.append(logits.cpu())
            all_labels.append(y_cpu)
    model.train(was_training)
    if total == 0:
        raise TrainingError("evaluation set is empty")
    out = {
        "top1": correct1 / total,
        "top5": correct5 / total,
        "loss": loss_sum / total,
        "count": total,
        "per_class_accuracy": [(c / t) if t else None for c, t in zip(class_correct.tolist(), class_total.tolist())],
    }
    if return_outputs:
        out["logits"] = torch.cat(all_logits)
        out["labels"] = torch.cat(all_labels)
    return out


class ModelEMA:
    """Exponential moving average of weights (and a copy of buffers), evaluated instead of the raw weights.

    ``decay`` is per step; Polyak & Juditsky 1992, as used by modern recipes (e.g. timm's ModelEmaV2).
    """

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if value.dtype.is_floating_point:
                target.lerp_(value.detach(), 1 - self.decay)
            else:
                target.copy_(value)


class Lookahead:
    """Lookahead (Zhang et al. 2019) in airbench's form (Jordan 2024, airbench94 §3.5): every ``every`` steps
    the slow weights move towards the fast ones, ``slow <- decay * slow + (1 - decay) * fast``, and the fast
    weights restart from the slow ones; after the last step the model keeps the slow weights.

    ``decay`` ramps up as ``peak * (step / total_steps) ** 3``: early on the slow copy simply follows the
    fast one, and averaging takes over as the learning rate anneals. BN running statistics are averaged with
    the weights, so the final model is consistent. The slow copy costs one lerp and one copy per ``every``
    steps, not per step as ``ModelEMA`` does.
    """

    def __init__(self, model: nn.Module, every: int, peak_decay: float, total_steps: int):
        self.every, self.peak_decay, self.total_steps = every, peak_decay, total_steps
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    def decay(self, step: int) -> float:
        return self.peak_decay * (step / self.total_steps) ** 3

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """Call with the number of steps taken so far (1 after the first)."""
        sync = step % self.every == 0
        if not sync and step < self.total_steps:
            return
        fast, weight = model.state_dict(), 1 - self.decay(step)
        for name, slow in self.slow.items():
            if sync:  # after the last step, hand the slow weights back whether or not it is a sync step
                slow.lerp_(fast[name], weight)
            fast[name].copy_(slow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.slow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, slow in self.slow.items():
            slow.copy_(state[name])


def check_loss(result: StepResult, step: int, policy: str) -> None:
    if not result.finite and policy == "stop":
        raise TrainingError(f"the loss became {result.loss.item()} at step {step}; lower --lr, check the data, "
                            "or pass --nan-policy skip to skip such steps and halve the learning rate")


def out_of_memory_message(batch_size: int) -> str:
    return (f"out of memory with batch size {batch_size}; try --batch-size {max(1, batch_size // 2)} "
            "(the learning rate keeps its meaning for the global batch; scale --lr with it if you change it)")


def eval_out_of_memory_message(eval_batch_size: int) -> str:
    return (f"out of memory during evaluation with --eval-batch-size {eval_batch_size}; try --eval-batch-size "
            f"{max(1, eval_batch_size // 2)} (it changes only the speed of evaluation, not its results)")


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
