"""Muon (reslab.train.muon): the Newton-Schulz orthogonalisation, the optimizer's two kinds of group, and its
wiring into TrainConfig / build_optimizer / the training loop."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.train.config import ConfigError, TrainConfig
from reslab.train.engine import build_optimizer, set_lr
from reslab.train.muon import Muon, orthogonalize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 144), (64, 64), (200, 30)])
def test_orthogonalize_flattens_the_spectrum(shape, dtype):
    torch.manual_seed(0)
    # an ill-conditioned matrix: singular values spread over three orders of magnitude
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    m = u[:, :k] @ torch.diag(torch.logspace(-3, 0, k)) @ v[:, :k].T
    s_in = torch.linalg.svdvals(m)
    out = orthogonalize(m, dtype=dtype)
    assert out.dtype == m.dtype  # computed in dtype, returned in the input's
    s_out = torch.linalg.svdvals(out)
    assert s_in.max() / s_in.min() > 500
    # Jordan's coefficients trade exactness for speed: the top singular values land in about [0.7, 1.2]
    assert 0.6 < s_out.max() < 1.25
    top = s_out[: k // 2]
    assert top.min() > 0.5
    # and the singular vectors are kept: the update points the same way as the momentum
    cos = F.cosine_similarity(out.flatten(), (u[:, :k] @ v[:, :k].T).flatten(), dim=0)
    assert cos > 0.9


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_muon_step_is_an_orthogonal_move_of_a_normalised_filter_bank():
    net = small_net()
    conv = net[0]
    lr = 0.05
    opt = Muon([{"params": [conv.weight], "muon": True, "lr": lr, "momentum": 0.6},
                {"params": [*net[1].parameters(), *net[5].parameters()]}], lr=0.1, momentum=0.9)
    x = torch.randn(64, 3, 8, 8)
    y = (x.mean((2, 3)) @ torch.randn(3, 4)).argmax(1)  # learnable: a linear function of the channel means
    losses = []
    for _ in range(30):
        before = conv.weight.detach() * 8 ** 0.5 / conv.weight.norm()  # the renormalisation the step applies first
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        move = torch.linalg.svdvals((conv.weight.detach() - before).reshape(8, -1))
        # every singular direction of the move has length about lr (Newton-Schulz lands in [0.7, 1.2])
        assert 0.5 * lr < move.min() and move.max() < 1.3 * lr
    assert losses[-1] < 0.6 * losses[0]


def test_sgd_groups_match_torch_sgd_exactly():
    net, reference = small_net(), small_net()
    opt = Muon(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)  # no Muon group at all
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    for _ in range(5):
        for model, optim in ((net, opt), (reference, ref_opt)):
            optim.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optim.step()
    for a, b in zip(net.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_muon_rejects_vectors_in_a_muon_group():
    with pytest.raises(ValueError, match="muon=False"):
        Muon([{"params": [nn.Parameter(torch.zeros(4))], "muon": True}])


def test_build_optimizer_puts_conv_filters_under_muon():
    from reslab.models import create_model

    model = create_model("resnet20")
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=0.2, muon_lr=0.05, no_decay_bn_bias=True))
    assert isinstance(opt, Muon)
    muon_groups = [g for g in opt.param_groups if g["muon"]]
    assert len(muon_groups) == 1
    filters = {id(p) for n, p in model.named_parameters() if p.ndim == 4}
    assert {id(p) for p in muon_groups[0]["params"]} == filters
    assert muon_groups[0]["momentum"] == 0.6 and muon_groups[0]["weight_decay"] == 0.0
    others = [p for g in opt.param_groups if not g["muon"] for p in g["params"]]
    assert model.fc.weight in [p for p in others] and len(others) + len(filters) == len(list(model.parameters()))
    set_lr(opt, 0.1)  # the schedule halves both
    assert muon_groups[0]["lr"] == pytest.approx(0.025)
    assert {g["lr"] for g in opt.param_groups if not g["muon"]} == {0.1}


@pytest.mark.parametrize("option,value", [("muon_lr", 0.0), ("muon_lr", float("nan")), ("muon_momentum", 1.0)])
def test_muon_options_are_validated(option, value):
    with pytest.raises(ConfigError, match=f"--{option.replace('_', '-')}"):
        TrainConfig(optimizer="muon", **{option: value}).validate()


def test_muon_trains_from_the_cli(tmp_path):
    from reslab.cli import main

    out = tmp_path / "run"
    main(["train", "--data", "digits", "--model", "resnet9", "--model-kwargs", '{"width": 0.25}',
          "--optimizer", "muon", "--muon-lr", "0.1", "--lr", "0.1", "--epochs", "2", "--batch-size", "64",
          "--schedule", "onecycle", "--warmup-iters", "5", "--no-progress", "--threads", "1", "--out", str(out)])
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["test_top1"] > 0.8  # digits: 10 classes, chance is 10 %
