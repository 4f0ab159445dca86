"""Model zoo tests: every registered model, plus reference numbers from He et al. 2016 and torchvision."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from reslab.models import (
    ClassifierNet,
    StageInfo,
    count_macs,
    count_params,
    create_model,
    list_models,
    model_entry,
)
from reslab.models.blocks import BasicBlock, Bottleneck, DropPath, PadShortcut, ResidualBlock, drop_path_rates
from reslab.models.complexity import model_summary

IMAGENET_RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
CIFAR_RESNETS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202"]
CIFAR_PLAINS = ["plain20", "plain32", "plain44", "plain56", "plain110"]
# The heaviest later models run the every-model checks on smaller inputs to keep this file fast on 2 CPU
# cores (test_model_family.py checks their exact parameter counts and torchvision equality).
REDUCED_INPUT = {"inception_resnet_v2": (3, 139, 139), "wide_resnet50_2": (3, 128, 128),
                 "wrn28_10": (3, 16, 16), "resnext29_8x64d": (3, 16, 16)}
# Inception-ResNet-v2's unpadded ('valid') convs lose a few pixels per stage: 299x299 ends as 8x8, not 9x9.
UNPADDED = {"inception_resnet_v2"}


def _test_input_size(name):
    return REDUCED_INPUT.get(name, model_entry(name).input_size)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------------
# Every registered model
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_models())
def test_forward_backward_native_input(name):
    entry = model_entry(name)
    model = create_model(name)
    assert isinstance(model, ClassifierNet)
    x = torch.randn(2, *_test_input_size(name))
    y = model(x)
    assert y.shape == (2, entry.num_classes)
    assert torch.isfinite(y).all()
    y.logsumexp(dim=1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", list_models())
def test_model_interface(name):
    # train mode: with fresh BN running statistics, eval mode is not normalised and resnet1202's residual
    # stream (variance ~doubling over 600 blocks) overflows at init; batch statistics keep it finite.
    model = create_model(name, num_classes=7).train()
    assert model.model_name == name
    assert model.num_classes == 7
    size = _test_input_size(name)
    x = torch.randn(2, *size)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[:2] == (2, model.num_features)
        last = model.stage_info[-1]
        assert isinstance(last, StageInfo) and last.channels == model.num_features
        expected = size[-1] // last.reduction
        assert features.shape[-1] == expected or (name in UNPADDED and 0 < features.shape[-1] < expected)
        # same seed for both passes: models with dropout (MobileNetV2, SimpleNet) are random in train mode
        torch.manual_seed(1)
        logits = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(logits, model.forward_head(model.forward_features(x)), rtol=0, atol=0)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        for info in model.stage_info:
            # a container of blocks, or a stage's last block in flat torchvision layouts (MobileNetV2)
            assert isinstance(model.get_submodule(info.name), (nn.Sequential, ResidualBlock))
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------
def test_list_models_patterns():
    assert list_models("plain*") == CIFAR_PLAINS
    assert list_models("resnet1*") == ["resnet18", "resnet101", "resnet110", "resnet152", "resnet1202"]
    assert set(IMAGENET_RESNETS + CIFAR_RESNETS + CIFAR_PLAINS) <= set(list_models())
    assert list_models("nope*") == []


def test_registry_metadata():
    assert model_entry("resnet56").input_size == (3, 32, 32)
    assert model_entry("resnet56").num_classes == 10
    assert "Table 6" in model_entry("resnet56").paper
    assert model_entry("resnet50").input_size == (3, 224, 224)
    assert model_entry("resnet50").num_classes == 1000
    assert "Table 1" in model_entry("resnet50").paper


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet57'"):
        create_model("resnet57")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet20", num_classes=-1)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet20", num_classes=0)
    with pytest.raises(ValueError, match="shortcut"):
        create_model("resnet20", shortcut="D")
    with pytest.raises(ValueError, match="plain"):
        create_model("plain20", shortcut="B")


def test_in_chans_and_width():
    model = create_model("resnet20", in_chans=1, num_classes=5)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    wide = create_model("resnet20", width=2)
    assert [s.channels for s in wide.stage_info] == [32, 64, 128]
    model = create_model("resnet18", in_chans=1)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


# ---------------------------------------------------------------------------------------------------------
# Parameter counts: He et al. 2016 Table 6 and torchvision
# ---------------------------------------------------------------------------------------------------------
# Table 6 prints millions with two decimals below 1M and one decimal above.
TABLE6_PARAMS_M = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85,
                   "resnet110": 1.7, "resnet1202": 19.4}


@pytest.mark.parametrize("name", CIFAR_RESNETS)
def test_cifar_params_match_table6(name):
    params = count_params(create_model(name))
    expected = TABLE6_PARAMS_M[name]
    digits = 2 if expected < 1 else 1
    assert round(params / 1e6, digits) == expected
    # plain counterparts have the same layers, and option A shortcuts have no parameters
    if name != "resnet1202":
        assert count_params(create_model(name.replace("resnet", "plain"))) == params


def test_resnet20_exact_params():
    # Option A: 269,722. Option B adds two 1x1 projections + BN: (16*32 + 64) + (32*64 + 128) = 2,752.
    assert count_params(create_model("resnet20")) == 269_722
    assert count_params(create_model("resnet20", shortcut="B")) == 272_474


TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "resnet152": 60_192_808}


@pytest.mark.parametrize("name", IMAGENET_RESNETS)
def test_imagenet_params_and_keys_match_torchvision(name):
    ours = create_model(name)
    theirs = getattr(torchvision.models, name)(weights=None)
    assert count_params(ours) == count_params(theirs) == TORCHVISION_PARAMS[name]
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


# (wide_resnet50_2, resnext50_32x4d and mobilenet_v2 are compared the same way in test_model_family.py)
@pytest.mark.parametrize("name", IMAGENET_RESNETS)
def test_torchvision_weights_give_identical_outputs(name):
    theirs = getattr(torchvision.models, name)(weights=None)
    # random BN statistics/affine so the comparison exercises every BN, not the identity init
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    ours = create_model(name)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 64, 64)  # small input: the same layers run, 12x cheaper than 224x224
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Shortcuts, initialisation, stochastic depth
# ---------------------------------------------------------------------------------------------------------
def _blocks(model):
    return [m for m in model.modules() if isinstance(m, ResidualBlock)]


@pytest.mark.parametrize("name", CIFAR_PLAINS)
def test_plain_nets_have_no_shortcuts(name):
    model = create_model(name)
    assert all(not b.use_shortcut and b.downsample is None for b in _blocks(model))
    assert not any(isinstance(m, PadShortcut) for m in model.modules())
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert n_convs + 1 == int(name.removeprefix("plain"))  # 6n+2 weighted layers: convs + fc


def test_option_a_is_parameter_free_padding():
    model = create_model("resnet20")
    pads = [b.downsample for b in _blocks(model) if b.downsample is not None]
    assert len(pads) == 2 and all(isinstance(p, PadShortcut) for p in pads)
    x = torch.randn(2, 16, 32, 32)
    y = PadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 16, 16)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert (y[:, 16:] == 0).all()


def test_option_b_has_projection_convs():
    model = create_model("resnet20", shortcut="B")
    projections = [b.downsample for b in _blocks(model) if b.downsample is not None]
    assert len(projections) == 2  # only where shapes change: entering layer2 and layer3
    for proj in projections:
        assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1) and proj[0].stride == (2, 2)
        assert isinstance(proj[1], nn.BatchNorm2d)
    all_proj = create_model("resnet20", shortcut="C")
    assert all(isinstance(b.downsample, nn.Sequential) for b in _blocks(all_proj))
    # ImageNet default is option B, with a projection in the first block of every stage
    r50 = create_model("resnet50")
    assert sum(b.downsample is not None for b in _blocks(r50)) == 4


@pytest.mark.parametrize("name, block_type, last_bn", [("resnet20", BasicBlock, "bn2"),
                                                       ("resnet18", BasicBlock, "bn2"),
                                                       ("resnet50", Bottleneck, "bn3")])
def test_zero_init_residual(name, block_type, last_bn):
    model = create_model(name, zero_init_residual=True)
    for b in _blocks(model):
        assert isinstance(b, block_type)
        assert (getattr(b, last_bn).weight == 0).all()
        assert (b.bn1.weight == 1).all()
    default = create_model(name)
    assert all((getattr(b, last_bn).weight == 1).all() for b in _blocks(default))
    with pytest.raises(ValueError, match="shortcuts"):
        create_model("plain20", zero_init_residual=True)


def test_he_init():
    conv = create_model("resnet56").layer2[0].conv2
    fan_out = conv.out_channels * 9
    assert abs(conv.weight.std().item() - (2.0 / fan_out) ** 0.5) < 0.05 * (2.0 / fan_out) ** 0.5


def test_drop_path():
    assert drop_path_rates(0.5, [2, 2]) == [[0.125, 0.25], [0.375, 0.5]]
    model = create_model("resnet20", drop_path_rate=0.9)
    rates = [b.drop_path.p for b in _blocks(model)]
    assert rates[-1] == pytest.approx(0.9) and rates[0] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(rates, rates[1:]))
    assert all(b.drop_path.p == 0 for b in _blocks(create_model("resnet20")))
    x = torch.randn(64, 4)
    assert DropPath(0.0)(x) is x
    drop = DropPath(0.5)
    assert drop.eval()(x) is x
    y = drop.train()(x)
    kept = (y != 0).all(dim=1)
    torch.testing.assert_close(y[kept], 2 * x[kept])
    assert (y[~kept] == 0).all() and 0 < kept.sum() < 64


# ---------------------------------------------------------------------------------------------------------
# Complexity
# ---------------------------------------------------------------------------------------------------------
def test_macs_reference_values():
    assert count_macs(torchvision.models.resnet50(weights=None), (3, 224, 224)) == 4_089_184_256
    assert count_macs(create_model("resnet50"), (3, 224, 224)) == 4_089_184_256
    assert round(count_macs(create_model("resnet18"), (3, 224, 224)) / 1e9, 2) == 1.81
    assert count_macs(create_model("resnet20"), (3, 32, 32)) == 40_551_040


def test_macs_counts_groups_and_linear():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False), nn.Flatten(), nn.Linear(16 * 25, 10))
    assert count_macs(model, (8, 5, 5)) == 25 * 16 * 2 * 9 + 16 * 25 * 10


def test_model_summary():
    s = model_summary("resnet20")
    assert s == {"name": "resnet20", "params": 269_722, "macs": 40_551_040,
                 "paper": model_entry("resnet20").paper, "input_size": (3, 32, 32)}
