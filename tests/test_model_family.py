"""The model families beyond He et al. 2016: pre-activation and wide ResNets, ResNeXt, MobileNetV2,
Inception-ResNet-v2, SimpleNet; reference parameter counts, torchvision equality, stochastic depth,
residual scaling, and structure diagrams. Native-size forward passes over every model are in test_models.py;
here large models run on small inputs (shapes only), while parameter counts stay exact."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn
import torchvision

from reslab.models import ClassifierNet, count_params, create_model, list_models, model_entry
from reslab.models.blocks import InvertedResidual, PreActBasicBlock, PreActBottleneck, ResidualBlock, StagedNet
from reslab.models.diagram import describe, draw_diagram
from reslab.models.inception_resnet import InceptionResidual

PREACT = ["preact_resnet20", "preact_resnet32", "preact_resnet44", "preact_resnet56", "preact_resnet110",
          "preact_resnet164", "preact_resnet1001", "preact_resnet18", "preact_resnet50"]
WIDE = ["wrn16_4", "wrn28_10", "wrn40_4", "wide_resnet50_2"]
NEW_MODELS = PREACT + WIDE + ["resnext29_8x64d", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v2_cifar",
                              "inception_resnet_v2", "inception_resnet_cifar", "simplenet", "resnet9"]
# Small inputs for the shape/gradient checks: 64x64 for ImageNet nets, 75x75 (the smallest valid size) for
# Inception-ResNet-v2's unpadded stem, 16x16 for the heaviest CIFAR nets.
SMALL_INPUT = {"inception_resnet_v2": 75, "wrn28_10": 16, "resnext29_8x64d": 16, "preact_resnet1001": 16}


def _small_input(name: str, batch: int = 2) -> torch.Tensor:
    c, h, _ = model_entry(name).input_size
    size = SMALL_INPUT.get(name, 64 if h > 32 else 32)
    return torch.randn(batch, c, size, size)


def _blocks(model: nn.Module) -> list[ResidualBlock]:
    return [m for m in model.modules() if isinstance(m, ResidualBlock)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_all_registered():
    assert set(NEW_MODELS) <= set(list_models())
    assert list_models("preact_resnet*") == sorted(PREACT, key=lambda n: int(n.removeprefix("preact_resnet")))
    assert list_models("wrn*") == ["wrn16_4", "wrn28_10", "wrn40_4"]


# ---------------------------------------------------------------------------------------------------------
# Forward / backward on small inputs
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW_MODELS)
def test_forward_backward_small_input(name):
    model = create_model(name, num_classes=5)
    assert isinstance(model, ClassifierNet)
    y = model(_small_input(name))
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    y.logsumexp(dim=1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["preact_resnet20", "wrn16_4", "mobilenet_v2_cifar", "inception_resnet_cifar",
                                  "simplenet", "preact_resnet18"])
def test_in_chans(name):
    model = create_model(name, in_chans=1, num_classes=4)
    assert model(_small_input(name)[:, :1]).shape == (2, 4)


# ---------------------------------------------------------------------------------------------------------
# Parameter counts: papers and torchvision
# ---------------------------------------------------------------------------------------------------------
# Exact counts at the default class count (10 for CIFAR, 1000 for ImageNet), as measured; the assertion on
# the paper's rounded figure is the reference, the exact one guards against silent changes.
EXACT_PARAMS = {
    "preact_resnet20": 272_282, "preact_resnet110": 1_730_522, "preact_resnet164": 1_703_258,
    "preact_resnet1001": 10_327_706, "preact_resnet18": 11_687_720, "preact_resnet50": 25_549_352,
    "wrn16_4": 2_748_890, "wrn28_10": 36_479_194, "wrn40_4": 8_949_210, "wide_resnet50_2": 68_883_240,
    "resnext29_8x64d": 34_426_698, "resnext50_32x4d": 25_028_904, "mobilenet_v2": 3_504_872,
    "mobilenet_v2_cifar": 2_236_682, "inception_resnet_v2": 55_843_464, "inception_resnet_cifar": 1_463_482,
    "simplenet": 5_493_834, "resnet9": 6_573_130,
}
PAPER_PARAMS_M = {  # millions, as printed in the papers
    "preact_resnet164": 1.7,  # He et al. 2016b, Table 3
    "wrn16_4": 2.7, "wrn28_10": 36.5, "wrn40_4": 8.9,  # Zagoruyko & Komodakis 2016, Table 4
    "resnext29_8x64d": 34.4,  # Xie et al. 2017, Table 7
    "inception_resnet_v2": 55.8,  # TF-slim / timm implementation of Szegedy et al. 2016
}


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_exact_params(name):
    params = count_params(create_model(name))
    assert params == EXACT_PARAMS[name]
    if name in PAPER_PARAMS_M:
        assert round(params / 1e6, 1) == PAPER_PARAMS_M[name]


def _weights_only(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_params_counted_without_bn_match_papers():
    # He et al. 2016b's 10.2M for ResNet-1001 and Hasanpour et al.'s 5.48M for SimpleNet count conv/fc
    # weights only; with BN affine parameters the totals are 10.33M and 5.49M.
    assert round(_weights_only(create_model("preact_resnet1001")) / 1e6, 1) == 10.2
    assert round(_weights_only(create_model("preact_resnet164")) / 1e6, 1) == 1.7
    simplenet = create_model("simplenet")
    assert sum(m.weight.numel() for m in simplenet.modules() if isinstance(m, nn.Conv2d)) == 5_482_176
    assert sum(isinstance(m, nn.Conv2d) for m in simplenet.modules()) == 13


def _randomise_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize("name, params", [("wide_resnet50_2", 68_883_240), ("resnext50_32x4d", 25_028_904),
                                          ("mobilenet_v2", 3_504_872)])
def test_torchvision_keys_and_outputs(name, params):
    theirs = _randomise_bn(getattr(torchvision.models, name)(weights=None))
    ours = create_model(name)
    assert count_params(ours) == count_params(theirs) == params
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_mobilenet_v2_width_mult_matches_torchvision():
    for width in (0.5, 1.4):
        ours = create_model("mobilenet_v2", width_mult=width)
        assert count_params(ours) == count_params(torchvision.models.mobilenet_v2(width_mult=width))


# ---------------------------------------------------------------------------------------------------------
# Architecture details
# ---------------------------------------------------------------------------------------------------------
def test_preact_structure():
    model = create_model("preact_resnet20")
    assert isinstance(model, StagedNet)
    blocks = _blocks(model)
    assert len(blocks) == 9 and all(isinstance(b, PreActBasicBlock) for b in blocks)
    # option B projections where shapes change, without BN (their input is already normalised)
    projections = [b.downsample for b in blocks if b.downsample is not None]
    assert len(projections) == 2 and all(len(p) == 1 and isinstance(p[0], nn.Conv2d) for p in projections)
    # the final BN-ReLU before pooling
    assert isinstance(model.final_norm[0], nn.BatchNorm2d) and isinstance(model.final_norm[1], nn.ReLU)
    # no ReLU after the sum: block outputs can be negative
    with torch.no_grad():
        out = model.layer1(model.stem(torch.randn(2, 3, 32, 32)))
    assert (out < 0).any()
    bottlenecks = create_model("preact_resnet164")
    assert all(isinstance(b, PreActBottleneck) for b in _blocks(bottlenecks)) and len(_blocks(bottlenecks)) == 54


def test_preact_zero_init_residual_makes_blocks_identity():
    model = create_model("preact_resnet20", zero_init_residual=True, shortcut="A").eval()
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.layer1(x), x)


def test_wide_resnet_widths_and_dropout():
    model = create_model("wrn16_4", dropout=0.3)
    assert [s.channels for s in model.stage_info] == [64, 128, 256]
    assert [len(getattr(model, s.name)) for s in model.stage_info] == [2, 2, 2]
    drops = [b.dropout for b in _blocks(model)]
    assert all(isinstance(d, nn.Dropout) and d.p == 0.3 for d in drops)
    assert all(isinstance(b.dropout, nn.Identity) for b in _blocks(create_model("wrn16_4")))
    with pytest.raises(ValueError, match="6n\\+4"):
        from reslab.models.wide_resnet import wide_resnet_cifar
        wide_resnet_cifar(30, 2)


def test_resnet9_layout_and_width():
    """Page 2018: 64 -> 128 (+residual) -> 256 -> 512 (+residual), max-pool halving the map in each layer."""
    model = create_model("resnet9")
    assert [(s.channels, s.reduction) for s in model.stage_info] == [(128, 2), (256, 4), (512, 8)]
    assert [len(_blocks(getattr(model, s.name))) for s in model.stage_info] == [1, 0, 1]
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 512, 4, 4)
    half = create_model("resnet9", width=0.5)
    assert [s.channels for s in half.stage_info] == [64, 128, 256] and half.num_features == 256
    assert count_params(half) < count_params(model) / 3.9  # conv weights scale with width^2
    with pytest.raises(ValueError, match="width"):
        create_model("resnet9", width=0)


def test_resnet9_pages_head():
    """head_pool="max" + logit_scale: global max-pool, then the fc's logits times the scale (Page 2018)."""
    torch.manual_seed(0)
    model = create_model("resnet9", width=0.25, head_pool="max", logit_scale=0.125).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        expected = model.fc(features.amax(dim=(2, 3))) * 0.125
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model(x, pre_logits=True), features.amax(dim=(2, 3)))
    for bad in ({"head_pool": "mean"}, {"logit_scale": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            create_model("resnet9", **bad)


def test_resnext29_cardinality():
    model = create_model("resnext29_8x64d")
    assert [s.channels for s in model.stage_info] == [256, 512, 1024]
    grouped = [b.conv2 for b in _blocks(model)]
    assert all(c.groups == 8 for c in grouped)
    assert [grouped[i].out_channels for i in (0, 3, 6)] == [512, 1024, 2048]  # 8 groups x 64/128/256


def test_mobilenet_v2_interface():
    model = create_model("mobilenet_v2", num_classes=7)
    assert model.fc is model.classifier[1] and model.num_classes == 7
    assert [s.reduction for s in model.stage_info] == [2, 4, 8, 16, 16, 32, 32, 32]
    assert model.stage_info[-1].channels == model.num_features == 1280
    model.reset_classifier(3)
    assert "classifier.1.weight" in model.state_dict() and not any(k.startswith("fc.") for k in model.state_dict())
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17 and sum(b.use_shortcut for b in blocks) == 10
    # linear bottleneck: the block's last layer is a BN with no activation after it
    assert all(isinstance(b.conv[-1], nn.BatchNorm2d) for b in blocks)
    cifar = create_model("mobilenet_v2_cifar")
    assert cifar.stage_info[-1].reduction == 8
    assert cifar.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 1280, 4, 4)


def test_inception_resnet_v2_layout():
    model = create_model("inception_resnet_v2")
    blocks = [b for b in _blocks(model) if isinstance(b, InceptionResidual)]
    assert len(blocks) == 40  # 10 A + 20 B + 10 C
    assert [s.channels for s in model.stage_info] == [320, 1088, 1536]
    # 'valid' convolutions: the canonical 8x8 final map comes from 299 (checked on the stem alone: 299 -> 35)
    with torch.no_grad():
        assert model.stem(torch.zeros(1, 3, 299, 299)).shape == (1, 320, 35, 35)


def test_residual_scale_argument():
    default = create_model("inception_resnet_cifar")
    scales = [b.residual_scale for b in _blocks(default)]
    assert scales == [0.17] * 3 + [0.10] * 6 + [0.20] * 3
    model = create_model("inception_resnet_cifar", residual_scale=0.3)
    assert all(b.residual_scale == 0.3 for b in _blocks(model))
    per_stage = create_model("inception_resnet_cifar", residual_scale=(0.1, 0.2, 0.3))
    assert sorted({b.residual_scale for b in _blocks(per_stage)}) == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="residual_scale"):
        create_model("inception_resnet_cifar", residual_scale=(0.1, 0.2))
    # the sum is ReLU(x + scale * branch(x))
    block = _blocks(model)[0].eval()
    x = torch.randn(2, block.up.out_channels, 8, 8)
    with torch.no_grad():
        expected = torch.relu(x + 0.3 * block.up(block.branches(x)))
        torch.testing.assert_close(block(x), expected)


# ---------------------------------------------------------------------------------------------------------
# Stochastic depth
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["preact_resnet20", "wrn16_4", "resnext29_8x64d", "mobilenet_v2_cifar",
                                  "inception_resnet_cifar"])
def test_drop_path_train_only(name):  # (ResNet, hence wide_resnet50_2 and resnext50_32x4d: test_models.py)
    kwargs = {"depths": (1, 2, 1)} if name == "inception_resnet_cifar" else {}
    dropped = create_model(name, drop_path_rate=0.5, **kwargs)
    rates = [b.drop_path.p for b in _blocks(dropped) if b.use_shortcut]
    # linear decay up to 0.5 on the last block (MobileNetV2's last block has no shortcut, so 16/17 of it)
    assert 0.45 < max(rates) <= 0.5 and rates == sorted(rates) and rates[0] < 0.2
    reference = create_model(name, **kwargs)
    reference.load_state_dict(dropped.state_dict())
    size = 16 if model_entry(name).input_size[1] == 32 else 32  # shapes do not matter here, only speed
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x), reference.eval()(x), rtol=0, atol=0)
        torch.manual_seed(1)
        a = dropped.train()(x)
        torch.manual_seed(2)
        b = dropped.train()(x)
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------------------
# Diagrams
# ---------------------------------------------------------------------------------------------------------
def _svg_sums(path) -> int:
    root = ET.parse(path).getroot()  # valid XML
    assert root.tag.endswith("svg")
    return sum(1 for el in root.iter() if el.get("id", "").startswith("residual-sum"))


def test_diagram_resnet_svg(tmp_path):
    spec = draw_diagram("resnet20", tmp_path / "resnet20.svg")
    assert [s.title for s in spec.sections] == ["stem", "layer1", "layer2", "layer3", "head"]
    assert spec.residual_sums == 9
    assert [s.out_shape for s in spec.sections[1:4]] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert [u.shortcut for u in spec.sections[2].units] == ["pad/2", "identity", "identity"]
    assert _svg_sums(tmp_path / "resnet20.svg") == 9


def test_diagram_plain_net_has_no_sums(tmp_path):
    spec = draw_diagram("plain20", tmp_path / "plain20.svg")
    assert spec.residual_sums == 0
    assert _svg_sums(tmp_path / "plain20.svg") == 0
    assert describe(create_model("simplenet"), (3, 32, 32)).residual_sums == 0


def test_diagram_mobilenet_png(tmp_path):
    out = tmp_path / "mbv2.png"
    spec = draw_diagram("mobilenet_v2", out, input_size=(3, 64, 64))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert spec.residual_sums == 10  # the stride-1, same-width blocks of Table 2
    titles = [s.title for s in spec.sections]
    assert titles[0] == "stem" and titles[-1] == "head" and len(titles) == 10
    assert spec.sections[-1].units[-1].out_shape == (1000,)


def test_diagram_collapses_deep_stages(tmp_path):
    spec = draw_diagram("preact_resnet164", tmp_path / "p164.svg")
    assert spec.residual_sums == 54
    assert _svg_sums(tmp_path / "p164.svg") == 3 * 5  # 3 + 2 drawn per stage around an ellipsis box
    spec = describe(create_model("inception_resnet_cifar"), (3, 32, 32))
    assert {u.residual_scale for u in spec.sections[1].units} == {0.17}


def test_describe_any_module():
    from reslab.models.blocks import BasicBlock

    class Net(nn.Module):  # no stage_info, blocks in a ModuleList (never called itself), functional pooling
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([BasicBlock(8, 8) for _ in range(2)])
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.fc(x.mean((2, 3)))

    spec = describe(Net(), (8, 6, 6))
    assert [s.title for s in spec.sections] == ["network"] and spec.residual_sums == 2
    assert [u.lines[0] for u in spec.sections[0].units] == ["BasicBlock", "BasicBlock", "global avg pool", "fc 8→3"]


def test_diagram_cli(tmp_path, capsys):
    from reslab.cli import main

    out = tmp_path / "wrn.svg"
    assert main(["diagram", "wrn16_4", "--out", str(out), "--input-size", "3,16,16"]) == 0
    assert "6 residual sums" in capsys.readouterr().out and out.exists()
    assert main(["diagram", "wrn16_4", "--out", str(tmp_path / "x.jpg")]) == 2
    assert ".svg" in capsys.readouterr().err
