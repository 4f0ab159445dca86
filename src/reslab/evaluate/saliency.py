"""``reslab explain``: which pixels a prediction rests on, by Grad-CAM and layer-wise relevance propagation.

- Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
  Localization", Eq. 1-2): the last feature map ``A`` (``forward_features``), weighted per channel by the
  spatial mean of d logit / d A, summed and passed through a ReLU, then upsampled to the image.
- LRP (Bach et al. 2015, "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise
  Relevance Propagation"; Montavon et al. 2019, "Layer-Wise Relevance Propagation: An Overview"): the logit
  of the target class is redistributed layer by layer down to the pixels.
  * BatchNorm (eval mode) is folded into the convolution before it, so each conv+BN is one affine layer.
  * Affine layers (conv, fc, global average pooling) use LRP-epsilon, ``R_i = a_i w_ij R_j / (z_j + eps sign z_j)``,
    or LRP-alpha-beta, ``R_i = (alpha z+_ij / z+_j - beta z-_ij / z-_j) R_j`` with alpha - beta = 1 (Bach et al.,
    Eq. 60), where the positive part of a contribution is ``w+ a+ + w- a-`` (inputs of either sign: the pixels);
    a neuron whose contributions all have one sign uses alpha=1, beta=0 on that sign, so relevance is conserved.
    Both are computed with the gradient trick of Montavon et al. 2019, §10.2.3.
  * ReLU passes relevance through; max pooling gives it to the winning input (the epsilon rule on max).
  * The residual sum ``y = shortcut(x) + branch(x)`` splits ``R_y`` in proportion to the two contributions,
    ``R_shortcut = shortcut * R_y / (y + eps sign y)`` and likewise for the branch, and the relevance of ``x``
    is the sum of what flows back through both paths (option A's zero-padded channels receive none).

  Biases (from BN folding) and the epsilon absorb some relevance, so the pixel relevances sum to the logit
  only when biases are zero and epsilon is small (the conservation test of tests/test_saliency.py).
  Supported: the reslab ``CifarResNet`` and ``ResNet`` families (resnet*, plain*), BasicBlock and Bottleneck,
  shortcuts A, B, C and none; anything else raises ``NotImplementedError`` naming the module.
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


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> _Affine:
    w = conv.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(w.shape[0], device=w.device)
    if bn is not None:
        if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
            raise NotImplementedError(f"LRP folds BatchNorm2d with running statistics, got {type(bn).__name__}")
        scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
        w = w * scale.view(-1, 1, 1, 1)
        b = (b - bn.running_mean.float()) * scale + bn.bias.detach().float()
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    if conv.padding_mode != "zeros":
        raise NotImplementedError(f"LRP supports zero-padded convolutions, got padding_mode={conv.padding_mode!r}")
    return _Affine(lambda t, weight: F.conv2d(t, weight, **kw), w, b.view(1, -1, 1, 1))


def _block_layers(block) -> list:
    from reslab.models.blocks import BasicBlock, Bottleneck, PadShortcut

    if type(block) is BasicBlock:
        branch = [_fold_conv_bn(block.conv1, block.bn1), _ReLU(), _fold_conv_bn(block.conv2, block.bn2)]
    elif type(block) is Bottleneck:
        branch = [_fold_conv_bn(block.conv1, block.bn1), _ReLU(), _fold_conv_bn(block.conv2, block.bn2), _ReLU(),
                  _fold_conv_bn(block.conv3, block.bn3)]
    else:
        raise NotImplementedError(f"LRP supports BasicBlock and Bottleneck blocks, not {type(block).__name__}")
    if not block.use_shortcut:
        return [*branch, _ReLU()]
    ds = block.downsample
    if ds is None:
        shortcut = _Identity()
    elif isinstance(ds, PadShortcut):
        shortcut = _PadShortcut(ds)
    elif isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d):
        shortcut = _Sequence([_fold_conv_bn(ds[0], ds[1])])
    else:
        raise NotImplementedError(f"LRP does not support the shortcut {type(ds).__name__} of {type(block).__name__}")
    return [_ResidualSum(_Sequence(branch), shortcut), _ReLU()]


def lrp_network(model: nn.Module) -> _Sequence:
    """The model (eval mode) as LRP layers: stem, blocks, global average pool, fc. Raises for unsupported models."""
    from reslab.models.resnet import ResNet
    from reslab.models.resnet_cifar import CifarResNet

    if type(model) not in (CifarResNet, ResNet):
        raise NotImplementedError(f"LRP is implemented for the reslab CIFAR and ImageNet ResNets / plain nets "
                                  f"(CifarResNet, ResNet), not {type(model).__name__}; use --method gradcam")
    if model.training:
        raise ValueError("LRP folds BatchNorm running statistics: put the model in eval mode first")
    layers: list = [_fold_conv_bn(model.conv1, model.bn1), _ReLU()]
    if type(model) is ResNet:
        mp = model.maxpool
        layers.append(_Pool(lambda t: F.max_pool2d(t, mp.kernel_size, mp.stride, mp.padding)))
    for info in model.stage_info:
        for block in getattr(model, info.name):
            layers.extend(_block_layers(block))
    layers.append(_Pool(lambda t: t.mean(dim=(2, 3))))
    if not isinstance(model.fc, nn.Linear):
        raise NotImplementedError("LRP needs a linear classifier (model.fc)")
    fc_bias = model.fc.bias.detach().float() if model.fc.bias is not None else torch.zeros(model.fc.out_features)
    layers.append(_Affine(lambda t, weight: F.linear(t, weight), model.fc.weight.detach().float(), fc_bias))
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
