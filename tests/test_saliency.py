"""LRP conserves relevance through conv, BN, ReLU, pooling and residual sums; Grad-CAM finds the region that
decides the label on a synthetic task."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from reslab.evaluate.saliency import gradcam, lrp, lrp_network, saliency_maps
from reslab.models import create_model
from reslab.models.blocks import BasicBlock, Bottleneck
from reslab.models.resnet import ResNet
from reslab.models.resnet_cifar import CifarResNet


def _randomise_bn(model: nn.Module, zero_bias: bool) -> nn.Module:
    """Non-trivial BN statistics; with ``zero_bias`` the folded biases are exactly zero (mean 0, beta 0)."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if zero_bias:
                m.running_mean.zero_()
                m.bias.data.zero_()
            else:
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=gen))
        if isinstance(m, nn.Linear):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=gen) * 0.3)
            if zero_bias:
                m.bias.data.zero_()
    return model.eval()


NETS = {
    "cifar-A": lambda: CifarResNet(BasicBlock, [1, 1, 1], num_classes=3, width=0.5, shortcut="A"),
    "cifar-B": lambda: CifarResNet(BasicBlock, [1, 1, 1], num_classes=3, width=0.5, shortcut="B"),
    "cifar-plain": lambda: CifarResNet(BasicBlock, [2, 1, 1], num_classes=3, width=0.5, shortcut="plain"),
    "imagenet-bottleneck": lambda: ResNet(Bottleneck, [1, 1, 1, 1], num_classes=3),
}


@pytest.mark.parametrize("name", list(NETS))
def test_lrp_network_reproduces_the_model(name):
    torch.manual_seed(0)
    model = _randomise_bn(NETS[name](), zero_bias=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(lrp_network(model).forward(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("rule", [dict(rule="epsilon", epsilon=1e-9), dict(rule="alphabeta", alpha=2.0, beta=1.0)])
def test_lrp_conserves_relevance_with_zero_biases(name, rule):
    torch.manual_seed(0)
    model = _randomise_bn(NETS[name](), zero_bias=True)
    x = torch.randn(3, 3, 32, 32)
    relevance, logit = lrp(model, x, **rule)
    assert relevance.shape == x.shape
    assert logit.abs().min() > 1e-4  # a meaningful amount to conserve
    torch.testing.assert_close(relevance.sum((1, 2, 3)), logit, rtol=2e-3, atol=1e-5)


# Every other registry family, small: (builder kwargs, input size). SimpleNet pools five times (needs 32x32).
REGISTRY_NETS = {
    "preact_resnet20": ({}, 16),
    "preact_resnet164": ({}, 8),  # pre-activation bottlenecks
    "preact_resnet18": ({}, 32),  # ImageNet layout: bare 7x7 conv + max pool stem
    "wrn16_4": ({"dropout": 0.3}, 8),
    "resnext29_8x64d": ({}, 8),
    "mobilenet_v2_cifar": ({"width_mult": 0.25}, 16),
    "simplenet": ({}, 32),
    "inception_resnet_cifar": ({"depths": (1, 1, 1)}, 16),
}


def _registry_net(name: str, zero_bias: bool) -> nn.Module:
    """A registry model in eval mode with BN statistics calibrated on one train-mode batch (so activations
    keep their scale however deep the net), random gamma and beta, a random classifier; ``zero_bias``: BN
    means and shifts and every bias zeroed, so the folded biases are exactly zero."""
    kwargs, size = REGISTRY_NETS[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size))
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            if zero_bias:
                m.running_mean.zero_()
                m.bias.data.zero_()
        if isinstance(m, nn.Linear):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=gen) * 0.3)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None and zero_bias:
            m.bias.data.zero_()
    return model.eval()


@pytest.mark.parametrize("name", list(REGISTRY_NETS))
def test_lrp_network_reproduces_registry_models(name):
    model = _registry_net(name, zero_bias=False)
    size = REGISTRY_NETS[name][1]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        # float32 rounding of the folded layers grows with depth (164 layers): tolerance on the logit scale
        torch.testing.assert_close(lrp_network(model).forward(x), expected, rtol=1e-3,
                                   atol=1e-4 * float(expected.abs().max()))


# alpha=2, beta=1 compounds layer after layer, so the stabiliser must be tiny too for the sum to be conserved.
# In MobileNetV2 (~50 conv layers, a signed linear-bottleneck stream) the relevances' absolute sum reaches ~10^4 x
# the logit and float32 rounding alone leaves ~1 % (in float64 with epsilon 1e-12 it is conserved to 1e-5).
@pytest.mark.parametrize("name", list(REGISTRY_NETS))
@pytest.mark.parametrize("rule", [dict(rule="epsilon", epsilon=1e-9),
                                  dict(rule="alphabeta", alpha=2.0, beta=1.0, epsilon=1e-9)])
def test_lrp_conserves_relevance_in_registry_models(name, rule):
    model = _registry_net(name, zero_bias=True)
    size = REGISTRY_NETS[name][1]
    x = torch.randn(2, 3, size, size)
    relevance, logit = lrp(model, x, **rule)
    assert relevance.shape == x.shape
    assert logit.abs().min() > 1e-4
    rtol = 2e-2 if name == "mobilenet_v2_cifar" and rule["rule"] == "alphabeta" else 2e-3
    torch.testing.assert_close(relevance.sum((1, 2, 3)), logit, rtol=rtol, atol=1e-5)


def test_lrp_bias_absorbs_relevance_when_biases_are_nonzero():
    torch.manual_seed(0)
    model = _randomise_bn(NETS["cifar-B"](), zero_bias=False)
    relevance, logit = lrp(model, torch.randn(2, 3, 32, 32), rule="epsilon", epsilon=1e-9)
    assert not torch.allclose(relevance.sum((1, 2, 3)), logit, rtol=1e-3)


def test_lrp_rejects_unsupported_architectures():
    class Other(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(NotImplementedError, match="CifarResNet.*gradcam"):
        lrp(Other(), torch.zeros(1, 3, 8, 8))
    odd = create_model("preact_resnet20", num_classes=3)
    odd.final_norm[1] = nn.GELU()  # a module with no LRP rule
    with pytest.raises(NotImplementedError, match="GELU.*preact_resnet20.*gradcam"):
        lrp(odd.eval(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="eval mode"):
        lrp(create_model("simplenet", num_classes=3).train(), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="alpha - beta"):
        lrp(NETS["cifar-A"]().eval(), torch.zeros(1, 3, 8, 8), rule="alphabeta", alpha=1.0, beta=1.0)


def _square_images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """16x16 noise images; label 1 = a bright 4x4 square somewhere in a random quadrant (returned), 0 = none.

    The square decides the label, and its quadrant is the region an explanation must point at.
    """
    x = 0.3 * torch.randn(n, 1, 16, 16, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    quadrant = torch.randint(0, 4, (n,), generator=gen)
    offsets = torch.randint(0, 5, (n, 2), generator=gen)
    for i in torch.nonzero(y).flatten().tolist():
        top = 8 * (int(quadrant[i]) // 2) + int(offsets[i, 0])
        left = 8 * (int(quadrant[i]) % 2) + int(offsets[i, 1])
        x[i, :, top:top + 4, left:left + 4] = 3.0
    return x, y, quadrant


@pytest.fixture(scope="module")
def square_model():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = CifarResNet(BasicBlock, [1, 1, 1], num_classes=2, in_chans=1, width=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):  # about 3 s of CPU
        x, y, _ = _square_images(64, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, quadrant = _square_images(96, gen)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.95  # the task was learnt
    keep = y == 1
    return model, x[keep], y[keep], quadrant[keep]


def _quadrant_mass(maps: torch.Tensor) -> torch.Tensor:
    """(B, 4) positive mass of a (B, 16, 16) map in each quadrant (row-major: TL, TR, BL, BR)."""
    q = maps.clamp(min=0).reshape(-1, 2, 8, 2, 8).sum((2, 4))
    return q.reshape(-1, 4)


@pytest.mark.parametrize("method", ["gradcam", "lrp-epsilon", "lrp-alphabeta"])
def test_saliency_highlights_the_square_that_decides_the_label(square_model, method):
    model, x, y, quadrant = square_model
    maps = torch.as_tensor(saliency_maps(model, x, method, y))
    assert maps.shape == (len(x), 16, 16)
    hit = (_quadrant_mass(maps).argmax(1) == quadrant).float().mean()
    assert hit > 0.9, f"{method} points at the square's quadrant for only {hit:.0%} of the images"
    if method == "gradcam":
        assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
        assert torch.equal(torch.as_tensor(saliency_maps(model, x, method, y)), maps)  # deterministic
        assert gradcam(model, x[:2], layer="layer2").shape == (2, 16, 16)
