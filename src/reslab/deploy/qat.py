"""Quantization-aware fine-tuning (QAT) for the ONNX Runtime int8 path of ``reslab quantize``.

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", §3, and Krishnamoorthi 2018, "Quantizing deep convolutional networks for efficient inference: A
whitepaper", §3.2: fine-tune the trained fp32 model for a few epochs with the quantization ONNX Runtime will
apply simulated in the forward pass ("fake quantization": quantize, then dequantize, in float), with
straight-through gradients, so the weights move to where the rounding hurts least. The fine-tuned fp32
weights (fake quantization removed) then go through the unchanged post-training path (export, min/max
calibration, optional bias correction), so the int8 file and its speed are the same as without QAT.

What is simulated, following what ``quantize_onnx`` produces (QDQ, ``ActivationSymmetric=False``,
``WeightSymmetric=True``, ``quant_pre_process`` folding BN into the convs):

* weights: per-output-channel symmetric int8, range [-127, 127], scale = max|w| / 127 (or [-64, 64] and / 64 with
  ``weight_qmax=64``, ONNX Runtime's ``reduce_range``, which ``reslab quantize`` uses on CPUs without VNNI), of the BN-*folded*
  conv weight (BN in eval mode, statistics frozen, folded on the fly as in the whitepaper §3.2), and of the
  Linear weight;
* activations: per-tensor asymmetric uint8 (scale = (max(hi, 0) - min(lo, 0)) / 255, integer zero point) at
  the tensors ONNX Runtime quantizes: the network input, every ReLU output (ONNX Runtime removes a ReLU after a
  Conv or Add and gives the producer's output the ReLU's range), every input of a residual Add that is not
  already quantized (the ``conv3``/downsample outputs), every Add output not followed by a ReLU, and the input
  of every Conv/Linear (e.g. max-pool and global-pool outputs). So the block outputs and both branches of
  every Add are covered.

Ranges come from min/max observers: initialised as the min/max over the calibration images (else of the first
batch), then an exponential moving average of each batch's min/max (averaging constant 0.01, as PyTorch's
``MovingAverageMinMaxObserver``) and frozen for the last ``freeze_fraction`` of the steps (``reslab quantize``:
at the plain min/max over its calibration images, i.e. the ranges ONNX Runtime will then choose).
``torch.fake_quantize_per_tensor_affine``/``torch.fake_quantize_per_channel_affine`` do the rounding, with
straight-through gradients (zero outside the clamp range). The graph is rewritten with ``torch.fx``; the
model's own modules are shared with it, so the returned model is the plain fp32 model with new weights.
"""
from __future__ import annotations

import copy
import inspect
import math
import operator
import time
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

SCHEME = {"weights": "int8 symmetric per-channel [-127, 127], BN folded (frozen statistics)",
          "activations": "uint8 asymmetric per-tensor: input, Conv/Linear inputs and outputs (after the ReLU "
                         "when one follows), residual Add inputs and outputs",
          "observers": "min/max, moving average (0.01), frozen for the last 25 % of the steps", "gradients": "straight-through"}


class ActivationFakeQuant(nn.Module):
    """Per-tensor asymmetric uint8 fake quantization with a min/max observer (ONNX Runtime's scale/zero point)."""

    def __init__(self, averaging_constant: float = 0.01):
        super().__init__()
        self.averaging_constant = averaging_constant
        self.observe = True   # update the range from each batch
        self.enabled = True   # quantize (off: identity, observing only)
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.min().float(), x.max().float()
        if not torch.isfinite(self.lo):
            self.lo.copy_(lo), self.hi.copy_(hi)
        elif self.averaging_constant is None:  # plain running min/max (ONNX Runtime's MinMax calibration)
            self.lo.clamp_(max=lo), self.hi.clamp_(min=hi)
        else:
            c = self.averaging_constant
            self.lo.lerp_(lo, c), self.hi.lerp_(hi, c)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.lo.clamp(max=0.0), self.hi.clamp(min=0.0)
        scale = ((hi - lo) / 255.0).clamp_min(torch.finfo(torch.float32).tiny)
        zero_point = torch.round(-lo / scale).clamp(0, 255).to(torch.int32)
        return scale, zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe:
            self._update(x)
        if not self.enabled or not torch.isfinite(self.lo):
            return x
        scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


def fake_quant_weight(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Per-output-channel symmetric int8 fake quantization (scale = max|w| / qmax, zero point 0, range [-qmax,
    qmax]): ONNX Runtime's ``WeightSymmetric`` per-channel weights (qmax 64 with ``reduce_range``).
    Straight-through gradient; the scale is not differentiated."""
    scale = (w.detach().abs().flatten(1).amax(1) / float(qmax)).clamp_min(torch.finfo(torch.float32).tiny)
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zero_point, 0, -qmax, qmax)


class FakeQuantConvBN(nn.Module):
    """Conv (+ optional following BatchNorm in eval mode, folded on the fly) with int8 fake-quant weights.
    Holds references to the model's own conv and BN, so training this updates their parameters."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, qmax: int = 127):
        super().__init__()
        self.conv, self.bn, self.qmax = conv, bn, qmax
        self.enabled = True  # off: the float (folded) conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        w, b = conv.weight, conv.bias
        if bn is not None:  # frozen statistics: y = gamma * (conv(x) - mean) / std + beta
            factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            w = w * factor.view(-1, 1, 1, 1)
            b = bn.bias - bn.running_mean * factor + (b * factor if b is not None else 0.0)
        w = fake_quant_weight(w, self.qmax) if self.enabled else w
        return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


class FakeQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, qmax: int = 127):
        super().__init__()
        self.linear, self.qmax = linear, qmax
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight
        return F.linear(x, fake_quant_weight(w, self.qmax) if self.enabled else w, self.linear.bias)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return ((node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU)) or
            (node.op == "call_function" and node.target in (F.relu, torch.relu)) or
            (node.op == "call_method" and node.target == "relu"))


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or
            (node.op == "call_method" and node.target in ("add", "add_")))


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Ops ONNX Runtime runs on the int8 values with the input's scale (max pooling, slicing, zero padding,
    reshapes): quantizing their output is quantizing their input."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), (nn.MaxPool2d, nn.Flatten, nn.Identity))
    if node.op == "call_function":
        return node.target in (operator.getitem, F.pad, torch.flatten, torch.reshape, F.max_pool2d)
    return node.op == "call_method" and node.target in ("view", "reshape", "flatten")


def prepare_qat(model: nn.Module, weight_qmax: int = 127) -> tuple[fx.GraphModule, list[ActivationFakeQuant]]:
    """A ``torch.fx`` copy of ``model``'s graph with fake quantization inserted (see the module docstring;
    ``weight_qmax``: the weights' range). It shares ``model``'s parameters and BN buffers, so training it trains
    ``model``. Returns it and its observers."""
    concrete = {"pre_logits": False} if "pre_logits" in inspect.signature(model.forward).parameters else None
    try:
        gm = fx.symbolic_trace(model, concrete_args=concrete)
    except Exception as exc:  # noqa: BLE001 - data-dependent control flow
        raise ValueError(f"quantization-aware training needs a torch.fx-traceable model: {exc}") from exc
    graph = gm.graph
    modules = dict(gm.named_modules())
    # 1. Conv (+ BN) and Linear -> fake-quant-weight modules.
    for i, node in enumerate(list(graph.nodes)):
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        if isinstance(mod, nn.Conv2d):
            users = list(node.users)
            bn_node = users[0] if len(users) == 1 and users[0].op == "call_module" and \
                isinstance(modules[users[0].target], nn.BatchNorm2d) else None
            wrapper = FakeQuantConvBN(mod, modules[bn_node.target] if bn_node is not None else None, weight_qmax)
        elif isinstance(mod, nn.Linear):
            bn_node, wrapper = None, FakeQuantLinear(mod, weight_qmax)
        else:
            continue
        name = f"qat_w{i}"
        gm.add_submodule(name, wrapper)
        with graph.inserting_after(bn_node or node):
            new = graph.call_module(name, node.args, node.kwargs)
        (bn_node or node).replace_all_uses_with(new)
        if bn_node is not None:
            graph.erase_node(bn_node)
        graph.erase_node(node)
    # 2. Which tensors ONNX Runtime quantizes.
    modules = dict(gm.named_modules())
    sites: list[fx.Node] = []

    def mark(n: Any) -> None:
        while isinstance(n, fx.Node) and _is_passthrough(n, modules):  # shares its input's quantization
            n = n.args[0]
        if isinstance(n, fx.Node) and n not in sites:
            sites.append(n)

    mark(next(n for n in graph.nodes if n.op == "placeholder"))  # the image batch (pre_logits is a constant)
    for node in graph.nodes:
        if _is_relu(node, modules):
            mark(node)
        elif _is_add(node):
            for a in node.args:
                mark(a)
            if not (len(node.users) == 1 and _is_relu(next(iter(node.users)), modules)):
                mark(node)
        elif node.op == "call_module" and isinstance(modules[node.target], (FakeQuantConvBN, FakeQuantLinear)):
            mark(node.args[0])
            mark(node)  # its output (or, when a ReLU follows, the ReLU's; see below)
    # A ReLU removed by ONNX Runtime gives its range to the producer: quantize after the ReLU, not before it.
    sites = [n for n in sites if not (len(n.users) == 1 and _is_relu(next(iter(n.users)), modules))]
    observers = []
    for k, node in enumerate(sites):
        fq = ActivationFakeQuant()
        gm.add_submodule(f"qat_a{k}", fq)
        observers.append(fq)
        with graph.inserting_after(node):
            new = graph.call_module(f"qat_a{k}", (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    graph.lint()
    gm.recompile()
    return gm, observers


@torch.no_grad()
def calibrate(gm: nn.Module, observers: list[ActivationFakeQuant], batches: Iterable[torch.Tensor]) -> None:
    """Set every observer's range to the plain min/max over ``batches`` of the unquantized network, as ONNX
    Runtime's MinMax calibration does (then ``gm`` simulates the int8 model ``quantize_onnx`` makes from them)."""
    weights = [m for m in gm.modules() if isinstance(m, (FakeQuantConvBN, FakeQuantLinear))]
    saved = [(fq.averaging_constant, fq.enabled) for fq in observers]
    for m in weights:
        m.enabled = False
    for fq in observers:
        fq.lo.fill_(float("inf")), fq.hi.fill_(float("-inf"))
        fq.averaging_constant, fq.enabled, fq.observe = None, False, True
    for x in batches:
        gm(x)
    for fq, (c, enabled) in zip(observers, saved):
        fq.averaging_constant, fq.enabled, fq.observe = c, enabled, False
    for m in weights:
        m.enabled = True


def qat_finetune(model: nn.Module, batches: Iterable, *, epochs: int, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, nesterov: bool = False, label_smoothing: float = 0.0,
                 freeze_fraction: float = 0.25, calibration: list[torch.Tensor] | None = None, set_epoch=None,
                 log=print, weight_qmax: int = 127) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of ``model`` with fake quantization for ``epochs`` passes over ``batches`` (an
    iterable of ``(x, y)`` CPU batches, re-iterated each epoch; ``set_epoch(e)`` is called first when given).
    SGD, cosine decay of ``lr`` to 0; BN in eval mode (frozen statistics, folded); observers frozen for the last
    ``freeze_fraction`` of the steps; when ``calibration`` batches are given, the observers start at their plain
    min/max (the post-training model's ranges; without them, at the first batch's) and are frozen at it again
    (:func:`calibrate`, the ranges ONNX Runtime's MinMax calibration on the same images will pick), else at the
    moving averages. Returns the fine-tuned fp32 model (no fake quantization; same
    ``state_dict`` keys as ``model``) and a summary for the report."""
    model = copy.deepcopy(model).cpu().float().eval()
    gm, observers = prepare_qat(model, weight_qmax)
    gm.eval()  # BN statistics frozen; nothing else in these nets depends on the mode
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                nesterov=nesterov and momentum > 0)
    if calibration is not None:  # start from the post-training int8 model's ranges, then follow the weights
        calibrate(gm, observers, calibration)
        for fq in observers:
            fq.observe = True
    steps_per_epoch = None
    total, step, images, history = None, 0, 0, []
    for epoch in range(epochs):
        if set_epoch is not None:
            set_epoch(epoch)
        seen, loss_sum, correct, start = 0, 0.0, 0, time.perf_counter()
        for x, y in batches:
            if total is None:
                steps_per_epoch = len(batches) if hasattr(batches, "__len__") else None
                total = epochs * steps_per_epoch if steps_per_epoch else None
            if total is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                if step == int(round((1 - freeze_fraction) * total)):
                    if calibration is not None:
                        calibrate(gm, observers, calibration)
                    for fq in observers:
                        fq.observe = False
            x, y = x.float(), y.long()
            logits = gm(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * y.numel()
            correct += int((logits.argmax(1) == y).sum())
            seen += y.numel()
            step += 1
        images += seen
        entry = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "train_top1_fake_quant":
                 correct / max(1, seen), "images": seen, "seconds": time.perf_counter() - start}
        history.append(entry)
        if log is not None:
            log(f"qat epoch {epoch + 1}/{epochs}: loss {entry['train_loss']:.4f}  fake-quant train top-1 "
                f"{100 * entry['train_top1_fake_quant']:.2f}%  ({seen} images, {entry['seconds']:.0f} s)")
    for p in model.parameters():
        p.grad = None
    info = {"epochs": epochs, "lr": lr, "schedule": "cosine to 0", "optimizer": "sgd" + (" nesterov" if nesterov else ""),
            "momentum": momentum, "weight_decay": weight_decay, "label_smoothing": label_smoothing,
            "images_per_epoch": history[0]["images"] if history else 0, "steps": step,
            "observers_frozen_after_step": int(round((1 - freeze_fraction) * total)) if total else None,
            "initial_ranges": "min/max over the calibration images" if calibration is not None else "first batch",
            "frozen_ranges": "min/max over the calibration images" if calibration is not None else "moving average",
            "activation_sites": len(observers),
            "fake_quant": {**SCHEME, "weights": SCHEME["weights"].replace("[-127, 127]", f"[-{weight_qmax}, {weight_qmax}]")}, "history": history}
    return model.eval(), info
