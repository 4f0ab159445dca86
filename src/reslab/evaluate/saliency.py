"""``reslab explain``: which pixels a prediction rests on, by Grad-CAM and layer-wise relevance propagation.

- Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
  Localization", Eq. 1-2): the last feature map ``A`` (``forward_features``), weighted per channel by the
  spatial mean of d logit / d A, summed and passed through a ReLU, then upsampled to the image.
- LRP (Bach et al. 2015, "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise
  Relevance Propagation"; Montavon et al. 2019, "Layer-Wise Relevance Propagation: An Overview"): the logit
  of the target class is redistributed layer by layer down to the pixels.
  * BatchNorm (eval mode) is folded into the convolution before it, so each conv+BN is one affine layer; a BN
    with no conv right before it (pre-activation blocks, the final BN-ReLU) is a per-channel affine layer.
  * Affine layers (conv, fc, global average pooling) use LRP-epsilon, ``R_i = a_i w_ij R_j / (z_j + eps sign z_j)``,
    or LRP-alpha-beta, ``R_i = (alpha z+_ij / z+_j - beta z-_ij / z-_j) R_j`` with alpha - beta = 1 (Bach et al.,
    Eq. 60), where the positive part of a contribution is ``w+ a+ + w- a-`` (inputs of either sign: the pixels);
    a neuron whose contributions all have one sign uses alpha=1, beta=0 on that sign, so relevance is conserved.
    Both are computed with the gradient trick of Montavon et al. 2019, §10.2.3.
  * ReLU and ReLU6 pass relevance through; max pooling gives it to the winning input (the epsilon rule on max);
    average pooling is a bias-free affine layer; dropout and DropPath are identities in eval mode.
  * The residual sum ``y = shortcut(x) + branch(x)`` splits ``R_y`` in proportion to the two contributions,
    ``R_shortcut = shortcut * R_y / (y + eps sign y)`` and likewise for the branch, and the relevance of ``x``
    is the sum of what flows back through both paths (option A's zero-padded channels receive none);
    ``residual_scale`` is a constant factor on the branch. A pre-activation block whose projection shortcut
    takes the pre-activated input shares its first BN-ReLU between the two paths.
  * A channel concatenation (Inception branches) gives each branch the relevance of its channels; the input's
    relevance is the sum over the branches.

  Biases (from BN folding) and the epsilon absorb some relevance, so the pixel relevances sum to the logit
  only when biases are zero and epsilon is small (the conservation test of tests/test_saliency.py).
  Supported: every model of the registry, i.e. the classes ``CifarResNet`` and ``ResNet`` (resnet*, plain*,
  wide_resnet50_2, resnext50_32x4d), ``StagedNet`` (preact_resnet*, wrn*, resnext29_8x64d, simplenet,
  inception_resnet*) and ``MobileNetV2`` (mobilenet_v2*), with shortcuts A, B, C and none; another model class,
  or a module inside these that has no rule (e.g. a swapped-in GELU or GroupNorm), raises
  ``NotImplementedError`` naming it and suggesting ``--method gradcam``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("gradcam", "lrp-epsilon", "lrp-alphabeta")


# ---------------------------------------------------------------------------------------------------------
# Grad-CAM
# ---------------------------------------------------------------------------------------------------------


def gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
            layer: str | None = None) -> torch.Tensor:
    """Grad-CAM maps (B, H, W) in [0, 1] for ``target`` classes (default: the predicted ones).

    ``layer``: the module whose output is explained, by attribute path (e.g. "layer2"); default the last
    feature map (``forward_features``), the layer Selvaraju et al. recommend. On small images the last stage
    can see the whole image from every position, and an earlier stage localises better.
    """
    model.eval()
    x = x.detach()
    captured: dict[str, torch.Tensor] = {}
    handle = None
    if layer is not None:
        module = model.get_submodule(layer)

        def keep(mod, inputs, output):
            output.retain_grad()
            captured["a"] = output

        handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            features = model.forward_features(x)
            features.retain_grad()
            logits = model.forward_head(features)
            if target is None:
                target = logits.argmax(1)
            logits.gather(1, target.view(-1, 1)).sum().backward()
    finally:
        if handle is not None:
            handle.remove()
    activation = captured.get("a", features)
    weights = activation.grad.mean(dim=(2, 3), keepdim=True)  # alpha_k^c, Eq. 1
    cam = F.relu((weights * activation).sum(1, keepdim=True)).detach()  # Eq. 2
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return cam / peak


# ---------------------------------------------------------------------------------------------------------
# LRP: the network rewritten as a tree of layers, each knowing how to push relevance back
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LRPRule:
    kind: str = "epsilon"  # epsilon | alphabeta
    epsilon: float = 1e-6  # stabiliser of every denominator (and the epsilon of LRP-epsilon)
    alpha: float = 1.0  # alpha-beta rule weights, alpha - beta = 1 (alpha=1, beta=0: LRP-alpha1beta0)
    beta: float = 0.0


def _stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


class _Affine:
    """A conv or linear layer with BN folded in: ``y = fn(x, W) + b``."""

    def __init__(self, fn, weight: torch.Tensor, bias: torch.Tensor):
        self.fn, self.weight, self.bias = fn, weight, bias

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.fn(a, self.weight) + self.bias

    def relprop(self, a: torch.Tensor, relevance: torch.Tensor, rule: LRPRule) -> torch.Tensor:
        if rule.kind == "epsilon":
            return _gradient_trick(lambda t: self.fn(t, self.weight) + self.bias, a, relevance, rule.epsilon)
        w_pos, w_neg = self.weight.clamp(min=0), self.weight.clamp(max=0)
        a_pos, a_neg = a.clamp(min=0), a.clamp(max=0)
        b_pos, b_neg = self.bias.clamp(min=0), self.bias.clamp(max=0)
        # Positive contributions w+ a+ and w- a-; negative ones w+ a- and w- a+ (biases on their sign's side).
        positive = lambda p, q: self.fn(p, w_pos) + self.fn(q, w_neg) + b_pos  # noqa: E731
        negative = lambda p, q: self.fn(p, w_neg) + self.fn(q, w_pos) + b_neg  # noqa: E731
        with torch.no_grad():
            has_pos, has_neg = positive(a_pos, a_neg) > 0, negative(a_pos, a_neg) < 0
        # A neuron with contributions of one sign only has nothing to balance beta against: there the rule
        # falls back to alpha=1, beta=0 (or to the negative part alone), so alpha_j - beta_j = 1 everywhere.
        alpha = torch.where(has_pos & has_neg, rule.alpha, torch.where(has_pos, 1.0, 0.0))
        beta = torch.where(has_pos & has_neg, rule.beta, torch.where(has_pos, 0.0, -1.0))
        r_pos = _two_input_trick(positive, a_pos, a_neg, alpha * relevance, rule.epsilon)
        r_neg = _two_input_trick(negative, a_pos, a_neg, beta * relevance, rule.epsilon)
        return r_pos - r_neg


def _gradient_trick(fn, a: torch.Tensor, relevance: torch.Tensor, eps: float) -> torch.Tensor:
    """``R_in = a * d/da [fn(a) . s]`` with ``s = R / stabilise(fn(a))`` held constant (Montavon et al. 2019)."""
    a = a.detach().requires_grad_(True)
    z = fn(a)
    s = (relevance / _stabilise(z, eps)).detach()
    (grad,) = torch.autograd.grad((z * s).sum(), a)
    return (a * grad).detach()


def _two_input_trick(fn, p: torch.Tensor, q: torch.Tensor, relevance: torch.Tensor, eps: float) -> torch.Tensor:
    p, q = p.detach().requires_grad_(True), q.detach().requires_grad_(True)
    z = fn(p, q)
    s = (relevance / _stabilise(z, eps)).detach()
    gp, gq = torch.autograd.grad((z * s).sum(), (p, q))
    return (p * gp + q * gq).detach()


class _ReLU:
    def forward(self, a):
        return F.relu(a)

    def relprop(self, a, relevance, rule):
        return relevance


class _Pool:
    """Max pooling (winner takes all) or global average pooling (an affine layer without bias)."""

    def __init__(self, fn):
        self.fn = fn

    def forward(self, a):
        return self.fn(a)

    def relprop(self, a, relevance, rule):
        return _gradient_trick(self.fn, a, relevance, rule.epsilon)


class _Sequence:
    def __init__(self, layers: list):
        self.layers = layers

    def forward(self, a):
        for layer in self.layers:
            a = layer.forward(a)
        return a

    def relprop(self, a, relevance, rule):
        inputs = []
        for layer in self.layers:
            inputs.append(a)
            a = layer.forward(a)
        for layer, a_in in zip(reversed(self.layers), reversed(inputs)):
            relevance = layer.relprop(a_in, relevance, rule)
        return relevance


class _ResidualSum:
    """``shortcut(x) + branch(x)``; relevance split in proportion to the two contributions."""

    def __init__(self, branch: _Sequence, shortcut):
        self.branch, self.shortcut = branch, shortcut

    def forward(self, a):
        return self.shortcut.forward(a) + self.branch.forward(a)

    def relprop(self, a, relevance, rule):
        s_out, b_out = self.shortcut.forward(a), self.branch.forward(a)
        ratio = relevance / _stabilise(s_out + b_out, rule.epsilon)
        return (self.shortcut.relprop(a, s_out * ratio, rule) + self.branch.relprop(a, b_out * ratio, rule))


class _Identity:
    def forward(self, a):
        return a

    def relprop(self, a, relevance, rule):
        return relevance


class _PadShortcut:
    """Option A: subsample and zero-pad channels; relevance goes back to the sampled positions."""

    def __init__(self, module):
        self.module = module

    def forward(self, a):
        return self.module(a)

    def relprop(self, a, relevance, rule):
        out = torch.zeros_like(a)
        stride = self.module.stride
        c = a.shape[1]
        out[:, :, ::stride, ::stride] = relevance[:, :c]
        return out


class _ReLU6(_ReLU):
    """ReLU6 (MobileNetV2): relevance passes through like a ReLU's (it is zero where the unit is off)."""

    def forward(self, a):
        return F.relu6(a)


class _Concat:
    """Parallel branches on one input, concatenated along channels (Inception): each branch gets the
    relevance of its own channels, and the input's relevance is the sum over the branches."""

    def __init__(self, branches: list[_Sequence]):
        self.branches = branches

    def forward(self, a):
        return torch.cat([b.forward(a) for b in self.branches], dim=1)

    def relprop(self, a, relevance, rule):
        sizes = [b.forward(a).shape[1] for b in self.branches]
        parts = relevance.split(sizes, dim=1)
        return sum(b.relprop(a, r, rule) for b, r in zip(self.branches, parts))


def _bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm2d as ``x * scale + shift`` per channel."""
    if type(bn) is not nn.BatchNorm2d or not bn.track_running_stats or bn.running_var is None:
        raise NotImplementedError(f"LRP folds BatchNorm2d with running statistics, got {type(bn).__name__}")
    var, mean = bn.running_var.detach().float(), bn.running_mean.detach().float()
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> _Affine:
    w = conv.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(w.shape[0], device=w.device)
    if bn is not None:
        scale, shift = _bn_scale_shift(bn)
        w = w * scale.view(-1, 1, 1, 1)
        b = b * scale + shift
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    if conv.padding_mode != "zeros":
        raise NotImplementedError(f"LRP supports zero-padded convolutions, got padding_mode={conv.padding_mode!r}")
    return _Affine(lambda t, weight: F.conv2d(t, weight, **kw), w, b.view(1, -1, 1, 1))


def _standalone_bn(bn: nn.BatchNorm2d) -> _Affine:
    """A BN with no conv right before it (pre-activation blocks, the final BN-ReLU): a per-channel
    (diagonal) affine layer ``y = x * w + b``, through which relevance goes by the same rules."""
    scale, shift = _bn_scale_shift(bn)
    return _Affine(lambda t, weight: t * weight, scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1))


def _scale(factor: float) -> _Affine:
    """``residual_scale``: the branch times a constant (relevance passes unchanged)."""
    return _Affine(lambda t, weight: t * weight, torch.tensor(float(factor)), torch.tensor(0.0))


def _merge(block, branch: list, shortcut, pre: list | None = None) -> list:
    """Layers of ``ResidualBlock.merge``: the branch alone for a plain block, otherwise the residual sum
    (``residual_scale`` on the branch; DropPath is the identity in eval mode). ``pre``: layers that both
    paths share (the pre-activation of a projection-shortcut pre-act block)."""
    pre = pre or []
    if not block.use_shortcut:
        return [*pre, *branch]
    if block.residual_scale != 1.0:
        branch = [*branch, _scale(block.residual_scale)]
    return [*pre, _ResidualSum(_Sequence(branch), shortcut)]


def _shortcut(block):
    from reslab.models.blocks import PadShortcut

    ds = block.downsample
    if ds is None:
        return _Identity()
    if isinstance(ds, PadShortcut):
        return _PadShortcut(ds)
    if type(ds) is nn.Sequential and 1 <= len(ds) <= 2 and type(ds[0]) is nn.Conv2d:
        return _Sequence(_layers(ds))
    raise NotImplementedError(f"LRP does not support the shortcut {type(ds).__name__} of {type(block).__name__}")


def _block_layers(block) -> list:
    from reslab.models.blocks import (BasicBlock, Bottleneck, InvertedResidual, PreActBasicBlock,
                                      PreActBottleneck)

    kind = type(block)
    if kind in (BasicBlock, Bottleneck):  # conv-BN(-ReLU) pairs, the sum, then ReLU
        convs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        if kind is Bottleneck:
            convs.append((block.conv3, block.bn3))
        branch = [_fold_conv_bn(*convs[0])]
        for conv, bn in convs[1:]:
            branch += [_ReLU(), _fold_conv_bn(conv, bn)]
        return [*_merge(block, branch, _shortcut(block) if block.use_shortcut else None), _ReLU()]
    if kind in (PreActBasicBlock, PreActBottleneck):
        # BN-ReLU first (a standalone per-channel affine layer), each later BN folded into the conv before it;
        # no ReLU after the sum. A projection shortcut sees the pre-activated input, so the BN-ReLU is shared.
        pre = [_standalone_bn(block.bn1), _ReLU()]
        if kind is PreActBasicBlock:  # dropout between the convs is the identity in eval mode
            body = [_fold_conv_bn(block.conv1, block.bn2), _ReLU(), _fold_conv_bn(block.conv2, None)]
        else:
            body = [_fold_conv_bn(block.conv1, block.bn2), _ReLU(), _fold_conv_bn(block.conv2, block.bn3), _ReLU(),
                    _fold_conv_bn(block.conv3, None)]
        if not block.use_shortcut:
            return [*pre, *body]
        if block.downsample is not None:
            return _merge(block, body, _shortcut(block), pre=pre)
        return _merge(block, [*pre, *body], _Identity())
    if kind is InvertedResidual:  # expansion (ReLU6), depthwise (ReLU6), linear projection; identity shortcut
        return _merge(block, _layers(block.conv), _Identity())
    raise NotImplementedError(f"LRP has no rule for the block {kind.__name__}")


def _layers(module: nn.Module) -> list:
    """LRP layers computing ``module`` (eval mode); a conv directly followed by a BN is folded into one."""
    from reslab.models.blocks import DropPath, ResidualBlock
    from reslab.models.inception_resnet import BranchConcat, InceptionResidual

    kind = type(module)
    if isinstance(module, nn.Sequential) and kind.forward is nn.Sequential.forward:  # also ConvNormAct
        children, layers, i = list(module), [], 0
        while i < len(children):
            child = children[i]
            if type(child) is nn.Conv2d:
                bn = children[i + 1] if i + 1 < len(children) and type(children[i + 1]) is nn.BatchNorm2d else None
                layers.append(_fold_conv_bn(child, bn))
                i += 2 if bn is not None else 1
            else:
                layers.extend(_layers(child))
                i += 1
        return layers
    if kind is nn.Conv2d:
        return [_fold_conv_bn(module, None)]
    if kind is nn.BatchNorm2d:
        return [_standalone_bn(module)]
    if kind is nn.ReLU:
        return [_ReLU()]
    if kind is nn.ReLU6:
        return [_ReLU6()]
    if kind in (nn.Identity, nn.Dropout, nn.Dropout2d, DropPath):  # identities in eval mode
        return []
    if kind is nn.MaxPool2d:
        m = module
        return [_Pool(lambda t: F.max_pool2d(t, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode))]
    if kind is nn.AvgPool2d:
        m = module
        return [_Pool(lambda t: F.avg_pool2d(t, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                             m.count_include_pad, m.divisor_override))]
    if kind is BranchConcat:
        return [_Concat([_Sequence(_layers(b)) for b in module.branches])]
    if kind is InceptionResidual:  # branches, 1x1 expansion (bias, no BN), scaled sum, ReLU (or none)
        branch = [*_layers(module.branches), _fold_conv_bn(module.up, None)]
        return [*_merge(module, branch, _Identity()), *_layers(module.relu)]
    if isinstance(module, ResidualBlock):
        return _block_layers(module)
    raise NotImplementedError(f"LRP has no rule for {kind.__name__}")


def _classifier(fc: nn.Module) -> _Affine:
    if type(fc) is not nn.Linear:
        raise NotImplementedError("LRP needs a linear classifier (model.fc)")
    w = fc.weight.detach().float()
    b = fc.bias.detach().float() if fc.bias is not None else torch.zeros(fc.out_features, device=w.device)
    return _Affine(lambda t, weight: F.linear(t, weight), w, b)


def lrp_network(model: nn.Module) -> _Sequence:
    """The model (eval mode) as LRP layers: stem, blocks, global average pool, fc. Raises for unsupported models.

    Every registry family is covered: ``CifarResNet`` / ``ResNet`` (resnet*, plain*, wide_resnet50_2,
    resnext50_32x4d), ``StagedNet`` (preact_resnet*, wrn*, resnext29_8x64d, simplenet, inception_resnet*)
    and ``MobileNetV2`` (mobilenet_v2*). Unknown modules inside them raise ``NotImplementedError`` by name.
    """
    from reslab.models.base import ClassifierNet
    from reslab.models.blocks import StagedNet
    from reslab.models.mobilenet_v2 import MobileNetV2
    from reslab.models.resnet import ResNet
    from reslab.models.resnet_cifar import CifarResNet

    kind = type(model)
    if kind not in (CifarResNet, ResNet, StagedNet, MobileNetV2):
        raise NotImplementedError(f"LRP is implemented for the reslab model classes CifarResNet, ResNet, StagedNet "
                                  f"and MobileNetV2 (every `reslab models` entry), not {kind.__name__}; "
                                  f"use --method gradcam")
    if any(m.training for m in model.modules()):
        raise ValueError("LRP folds BatchNorm running statistics: put the model in eval mode first")
    if kind.pool is not ClassifierNet.pool:
        raise NotImplementedError(f"LRP expects global average pooling, {kind.__name__} overrides pool()")
    try:
        if kind in (CifarResNet, ResNet):
            layers: list = [_fold_conv_bn(model.conv1, model.bn1), _ReLU()]
            if kind is ResNet:
                layers.extend(_layers(model.maxpool))
            for info in model.stage_info:
                for block in getattr(model, info.name):
                    layers.extend(_block_layers(block))
        elif kind is StagedNet:
            layers = _layers(model.stem)
            for info in model.stage_info:
                layers.extend(_layers(getattr(model, info.name)))
            layers.extend(_layers(model.final_norm))
        else:
            layers = _layers(model.features)
        layers.append(_Pool(lambda t: t.mean(dim=(2, 3))))
        layers.append(_classifier(model.fc))  # MobileNetV2: classifier = (Dropout, fc), dropout off in eval mode
    except NotImplementedError as e:
        raise NotImplementedError(f"{e} (in {getattr(model, 'model_name', kind.__name__)}); use --method gradcam") \
            from None
    return _Sequence(layers)


def lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None, *, rule: str = "epsilon",
        epsilon: float = 1e-6, alpha: float = 1.0, beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Input relevance (B, C, H, W) of the ``target`` logits (default: predicted), and those logits (B,).

    ``rule``: "epsilon" (LRP-epsilon everywhere) or "alphabeta" (LRP-alpha-beta on the affine layers,
    ``alpha - beta`` must be 1). The relevance of the target logit starts the backward pass.
    """
    if rule not in ("epsilon", "alphabeta"):
        raise ValueError(f"LRP rule must be epsilon or alphabeta, got {rule!r}")
    if rule == "alphabeta" and abs(alpha - beta - 1) > 1e-9:
        raise ValueError(f"LRP-alpha-beta needs alpha - beta = 1, got alpha={alpha}, beta={beta}")
    net = lrp_network(model)
    x = x.detach().float()
    with torch.no_grad():
        logits = net.forward(x)
    if target is None:
        target = logits.argmax(1)
    start = torch.zeros_like(logits).scatter(1, target.view(-1, 1), logits.gather(1, target.view(-1, 1)))
    relevance = net.relprop(x, start, LRPRule(rule, epsilon, alpha, beta))
    return relevance, logits.gather(1, target.view(-1, 1))[:, 0]


def saliency_maps(model: nn.Module, x: torch.Tensor, method: str, target: torch.Tensor | None = None) -> np.ndarray:
    """(B, H, W) maps: Grad-CAM in [0, 1]; LRP relevance summed over channels, scaled to [-1, 1]."""
    if method == "gradcam":
        return gradcam(model, x, target).cpu().numpy()
    if method == "lrp-epsilon":
        rel, _ = lrp(model, x, target, rule="epsilon", epsilon=0.25)  # a larger eps keeps the map less noisy
    elif method == "lrp-alphabeta":
        rel, _ = lrp(model, x, target, rule="alphabeta", alpha=2.0, beta=1.0)
    else:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    heat = rel.sum(1).cpu().numpy()
    peak = np.abs(heat).reshape(len(heat), -1).max(1).clip(min=1e-12)
    return heat / peak[:, None, None]


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------


def plot_explanations(images: np.ndarray, maps: np.ndarray, titles: list[str], method: str, path: Path) -> Path:
    """Image, then the map over it, per input; up to 4 inputs per row."""
    from reslab.evaluate.analyze import display_image, pyplot, save_figure

    plt = pyplot()
    n = len(images)
    per_row = min(4, n)
    rows = int(np.ceil(n / per_row))
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(3.0 * per_row, 1.75 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    signed = method != "gradcam"
    for k in range(n):
        r, c = divmod(k, per_row)
        img, cmap = display_image(images[k])
        axes[r, 2 * c].imshow(img, cmap=cmap, interpolation="nearest")
        axes[r, 2 * c].set_title(titles[k], fontsize=7)
        axes[r, 2 * c + 1].imshow(img, cmap=cmap or None, interpolation="nearest", alpha=0.45 if not signed else 0.3)
        axes[r, 2 * c + 1].imshow(maps[k], cmap="bwr" if signed else "jet", vmin=-1 if signed else 0, vmax=1,
                                  alpha=0.7 if signed else 0.5, interpolation="bilinear")
        axes[r, 2 * c + 1].set_title(method, fontsize=7)
    fig.suptitle(f"{method}: red = evidence for the class" + ("" if not signed else ", blue = against"), fontsize=9)
    return save_figure(fig, path)


def explain(run: str | Path, images: list[str | Path], *, method: str = "gradcam", target: str | None = None,
            out: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Saliency maps of a run's model for image files, overlaid on the images in one figure.

    ``target``: a class name to explain for every image (default: each image's predicted class).
    Writes ``explain-<method>.png`` and ``explain-<method>.json`` into ``RUN/analysis/`` (or ``out``).
    """
    from reslab.data import ImageArray
    from reslab.data.sources import decode_image
    from reslab.evaluate.analyze import analysis_dir, model_logits, run_dir_of
    from reslab.train.checkpoint import load_model
    from reslab.train.engine import select_device
    from reslab.train.rundir import environment_info, write_json

    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if not images:
        raise ValueError("give at least one image file to explain")
    for p in images:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image {p} does not exist")
    dev = select_device(device)
    model, card = load_model(run, device=dev)
    model = model.float()
    prep = card["preprocessing"]
    classes = list(card["classes"])
    arrays = np.stack([decode_image(p, channels=prep["channels"], size=tuple(prep["stored_size"])) for p in images])
    batch = ImageArray(images=arrays, labels=np.zeros(len(arrays), dtype=np.int64), files=[str(p) for p in images])
    logits, _ = model_logits(model, card, batch, device=dev)
    probs = torch.softmax(logits, 1)
    if target is not None:
        if target not in classes:
            raise ValueError(f"--target {target!r} is not one of the model's classes: {', '.join(classes[:20])}")
        targets = torch.full((len(images),), classes.index(target), dtype=torch.long)
    else:
        targets = probs.argmax(1)
    from reslab.evaluate.evaluate import model_loader

    maps = []
    for (x, _), t in zip(model_loader(card, batch, device=dev, batch_size=16), targets.split(16)):
        try:
            maps.append(saliency_maps(model, x.contiguous(), method, t.to(dev)))
        except NotImplementedError as e:  # reported to CLI users as one line
            raise ValueError(f"--method {method}: {e}") from None
    maps = np.concatenate(maps)
    if maps.shape[-2:] != arrays.shape[1:3]:  # the model's input size differs from the stored size
        maps = F.interpolate(torch.from_numpy(maps)[:, None], size=arrays.shape[1:3], mode="bilinear")[:, 0].numpy()
    # parent folder + name: ImageFolder files are often named 0000.jpg in every class folder
    titles = [f"{(Path(p).parent.name + '/' + Path(p).name)[-22:]}\n{classes[t]} ({probs[i, t]:.2f})"
              for i, (p, t) in enumerate(zip(images, targets.tolist()))]
    target_dir = analysis_dir(run, out)
    figure = plot_explanations(arrays, maps, titles, method, target_dir / f"explain-{method}.png")
    result = {"run": str(run_dir_of(run)), "method": method,
              "images": [{"file": str(p), "target": classes[t], "p_target": float(probs[i, t]),
                          "predicted": classes[int(probs[i].argmax())], "p_predicted": float(probs[i].max())}
                         for i, (p, t) in enumerate(zip(images, targets.tolist()))],
              "figures": [str(figure)], "environment": environment_info(str(dev))}
    write_json(target_dir / f"explain-{method}.json", result)
    result["written_to"] = str(target_dir / f"explain-{method}.json")
    return result
