"""Training objectives and gradient transforms: what one step minimises, beyond plain cross-entropy.

An objective is called as ``objective(model, x, y) -> (loss, logits)``; the loop composes them from the config:
- cross-entropy with label smoothing (Szegedy et al. 2016, §7);
- Matryoshka nested loss (Kusupati et al. 2022, MRL-E: one classifier whose weight is sliced per nested size);
- knowledge distillation from a teacher run (Hinton et al. 2015: soft targets at temperature T, weight T^2);
- guidance of a target network by a frozen guide through linear CKA of stage or residual-block outputs
  (Subramaniam et al. 2024, "Training the Untrainable"; CKA: Kornblith et al. 2019, Eq. 2 with linear kernels).
Gradient noise (Neelakantan et al. 2015) and ScheduledDropPath (Zoph et al. 2018) act around the step.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def unwrap(model: nn.Module) -> nn.Module:
    """The ClassifierNet under DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class CrossEntropy:
    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, model, x, y):
        logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing), logits


def matryoshka_logits(net: nn.Module, pooled: torch.Tensor, dims: list[int]) -> list[torch.Tensor]:
    """Logits from the first ``m`` features for each nested size ``m`` (MRL-E: the fc weight sliced)."""
    fc = net.fc
    return [F.linear(pooled[:, :m], fc.weight[:, :m], fc.bias) for m in dims]


class Matryoshka:
    """Sum of cross-entropies of the nested truncations ``dims`` of the pooled embedding (Kusupati et al. 2022, Eq. 1,
    uniform weights). The full-size logits are returned for accuracy bookkeeping."""

    def __init__(self, dims: list[int], label_smoothing: float = 0.0):
        self.dims = sorted(dims)
        self.label_smoothing = label_smoothing

    def __call__(self, model, x, y):
        net = unwrap(model)
        if self.dims[-1] > net.num_features:
            raise ValueError(f"--matryoshka {self.dims}: the largest size exceeds the model's "
                             f"{net.num_features}-dimensional embedding")
        # Through the wrapper's forward: DistributedDataParallel prepares its gradient all-reduce there, and a
        # call to the bare network would leave every rank with its own gradients. ``fc`` is applied below, in the
        # same backward pass, so its gradients are averaged too.
        pooled = model(x, pre_logits=True)
        all_logits = matryoshka_logits(net, pooled, self.dims)
        loss = sum(F.cross_entropy(lg.float(), y, label_smoothing=self.label_smoothing) for lg in all_logits)
        return loss / len(all_logits), net.fc(pooled)


class Distillation:
    """(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9,
                 label_smoothing: float = 0.0):
        self.teacher, self.t, self.alpha, self.label_smoothing = teacher.eval(), temperature, alpha, label_smoothing
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, model, x, y):
        logits = model(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x).float()
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        kd = F.kl_div(F.log_softmax(logits.float() / self.t, 1), F.log_softmax(teacher_logits / self.t, 1),
                      reduction="batchmean", log_target=True) * self.t ** 2
        return (1 - self.alpha) * ce + self.alpha * kd, logits


def linear_cka(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Linear centred kernel alignment between two batches of representations (n, ...) and (n, ...).

    Computed on n x n Gram matrices, so feature maps of any width compare; 1 means identical up to an
    orthogonal transform and isotropic scaling.
    """
    x = x.flatten(1).float()
    y = y.flatten(1).float()
    # CKA is scale-invariant: normalising first keeps the Gram matrices finite for huge activations
    # (an untrained deep guide in eval mode grows its activations block by block).
    x = x / x.norm().clamp_min(eps)
    y = y / y.norm().clamp_min(eps)
    k, l = x @ x.T, y @ y.T
    n = k.shape[0]
    h = torch.eye(n, device=x.device) - 1.0 / n
    kc, lc = h @ k @ h, h @ l @ h
    return (kc * lc).sum() / (kc.norm() * lc.norm() + eps)


def guided_modules(net: nn.Module, layers: str = "stages") -> list[nn.Module]:
    """The modules whose outputs guidance aligns: each stage (``stage_info``), or each residual block.

    Subramaniam et al. 2024 align the networks layer by layer; ``blocks`` does so at the granularity of the
    residual blocks (a plain net's blocks are ``ResidualBlock``s without shortcut), ``stages`` only at the
    stage outputs.
    """
    if layers == "stages":
        return [net.get_submodule(s.name) for s in net.stage_info]
    if layers != "blocks":
        raise ValueError(f"--guide-layers {layers!r}: choose stages or blocks")
    from reslab.models.blocks import ResidualBlock

    blocks = [m for m in net.modules() if isinstance(m, ResidualBlock)]
    if not blocks:
        raise ValueError(f"--guide-layers blocks: {type(net).__name__} has no residual blocks; "
                         "use --guide-layers stages")
    return blocks


class LayerOutputs:
    """Forward hooks collecting the outputs of ``modules`` (in execution order) during ``collect()``."""

    def __init__(self, modules: list[nn.Module]):
        self.outputs: list[torch.Tensor] = []
        self.active = False  # collect only inside `collect()`, so evaluation passes hold nothing
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, inputs, output):
        if self.active:
            self.outputs.append(output)

    def collect(self, forward, x) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run ``forward(x)`` and return its output with the hooked outputs it produced."""
        self.active, self.outputs = True, []
        try:
            out = forward(x)
            return out, self.outputs
        finally:
            self.active, self.outputs = False, []


class Guidance:
    """CE + weight * sum over aligned layers of (1 - CKA(target layer output, guide layer output)).

    The guide is frozen; ``layers`` (see :func:`guided_modules`) are aligned by position from the last, so a
    guide with as many stages or blocks aligns one to one (plain56/resnet56: 3 stages, 27 blocks).
    """

    def __init__(self, model: nn.Module, guide: nn.Module, weight: float, label_smoothing: float = 0.0,
                 layers: str = "stages"):
        self.guide, self.weight, self.label_smoothing = guide.eval(), weight, label_smoothing
        for p in self.guide.parameters():
            p.requires_grad_(False)
        self.target_layers = LayerOutputs(guided_modules(unwrap(model), layers))
        self.guide_layers = LayerOutputs(guided_modules(self.guide, layers))
        self.pairs = min(len(self.target_layers.handles), len(self.guide_layers.handles))

    def alignments(self, model, x) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The target's logits and CKA(target, guide) of each aligned pair of layer outputs, in depth order."""
        logits, target = self.target_layers.collect(model, x)
        with torch.no_grad():
            _, guide = self.guide_layers.collect(self.guide, x)
        return logits, [linear_cka(t, g) for t, g in zip(target[-self.pairs:], guide[-self.pairs:])]

    def __call__(self, model, x, y):
        logits, cka = self.alignments(model, x)
        align = sum(1 - c for c in cka)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        return ce + self.weight * align, logits


def load_reference_model(spec: str, *, num_classes: int, in_chans: int, device, seed: int = 0) -> nn.Module:
    """A trained run (directory) or, given a registry name, an untrained model (He init, seeded)."""
    from reslab.models import create_model
    from reslab.train.checkpoint import load_model

    if Path(spec).exists():
        model, card = load_model(spec, device=device)
        if card["num_classes"] != num_classes:
            raise ValueError(f"{spec} predicts {card['num_classes']} classes but the data has {num_classes}")
        return model
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed + 7919)  # a fixed, distinct init that leaves the training RNG stream untouched
    try:
        model = create_model(spec, num_classes=num_classes, in_chans=in_chans)
    finally:
        torch.set_rng_state(generator_state)
    return model.to(device).eval()


def add_gradient_noise(model: nn.Module, step: int, eta: float, gamma: float = 0.55,
                       generator: torch.Generator | None = None) -> None:
    """g += N(0, sigma_t^2) with sigma_t^2 = eta / (1 + t)^gamma (Neelakantan et al. 2015, Eq. 1)."""
    std = (eta / (1 + step) ** gamma) ** 0.5
    for p in model.parameters():
        if p.grad is not None:
            noise = torch.randn(p.grad.shape, generator=generator, dtype=p.grad.dtype, device="cpu")
            p.grad.add_(noise.to(p.grad.device), alpha=std)


def set_drop_path_scale(model: nn.Module, scale: float) -> None:
    """ScheduledDropPath: every DropPath's rate is its configured rate times ``scale`` (rising 0 -> 1)."""
    from reslab.models.blocks import DropPath

    for m in unwrap(model).modules():
        if isinstance(m, DropPath):
            if not hasattr(m, "base_p"):
                m.base_p = m.p
            m.p = m.base_p * scale


def build_objective(cfg, model: nn.Module, *, num_classes: int, in_chans: int, device):
    """The objective a config asks for (None: plain cross-entropy, the fast default path)."""
    if cfg.matryoshka:
        return Matryoshka(cfg.matryoshka, cfg.label_smoothing)
    if cfg.distill_from:
        teacher = load_reference_model(cfg.distill_from, num_classes=num_classes, in_chans=in_chans, device=device)
        return Distillation(teacher, cfg.distill_temperature, cfg.distill_weight, cfg.label_smoothing)
    if cfg.guide:
        guide = load_reference_model(cfg.guide, num_classes=num_classes, in_chans=in_chans, device=device,
                                     seed=cfg.seed)
        if cfg.channels_last:
            guide = guide.to(memory_format=torch.channels_last)
        return Guidance(model, guide, cfg.guide_weight, cfg.label_smoothing, cfg.guide_layers)
    return None


def gradient_noise_hook(cfg, step_ref: list[int]):
    """A ``before_update`` callback adding seeded gradient noise at the current step (None when off)."""
    if not cfg.grad_noise:
        return None
    generator = torch.Generator()

    def hook(model):
        generator.manual_seed(cfg.seed * 1_000_003 + step_ref[0])  # reproducible on resume
        add_gradient_noise(model, step_ref[0], cfg.grad_noise, cfg.grad_noise_gamma, generator)

    return hook
