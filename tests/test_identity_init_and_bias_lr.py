"""airbench's initialisation and BN-bias tricks (Jordan 2024): Dirac-initialised convs (``identity_init``),
faster-learning BN/whitening biases (``--norm-bias-lr-mult``) and frozen BN scales (``--freeze-norm-weight``)."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from reslab.cli import main
from reslab.models import create_model
from reslab.models.whitening import PatchWhitening
from reslab.train.config import ConfigError, TrainConfig
from reslab.train.engine import build_optimizer, freeze_norm_weights, set_lr

FAST_NET = {"stem": "whiten", "widths": [8, 32, 48, 64], "pool_first": True}  # whitening: 24 channels


def test_identity_init_makes_every_3x3_conv_pass_its_input_channels_through():
    torch.manual_seed(0)
    model = create_model("resnet9", **FAST_NET, identity_init=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 7
    for conv in convs:
        x = torch.randn(2, conv.in_channels, 6, 6)
        with torch.no_grad():
            y = conv(x)
        n = min(conv.in_channels, conv.out_channels)
        torch.testing.assert_close(y[:, :n], x[:, :n])
        if conv.out_channels > n:  # the widening convs' extra filters keep their random init
            assert y[:, n:].abs().sum() > 0
    plain = create_model("resnet9", **FAST_NET)
    x = torch.randn(2, 24, 6, 6)
    with torch.no_grad():
        assert not torch.allclose(plain.layer1[0](x)[:, :24], x)


def test_norm_bias_lr_mult_speeds_up_only_norm_and_whitening_biases():
    model = create_model("resnet9", **FAST_NET)
    opt = build_optimizer(model, TrainConfig(lr=0.2, norm_bias_lr_mult=64, no_decay_bn_bias=True))
    set_lr(opt, 0.1)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    biases = [m.bias for m in model.modules() if isinstance(m, (nn.BatchNorm2d, PatchWhitening))]
    assert len(biases) == 8 and all(lr_of[id(b)] == pytest.approx(6.4) for b in biases)
    others = [p for p in model.parameters() if all(p is not b for b in biases)]
    assert others and all(lr_of[id(p)] == pytest.approx(0.1) for p in others if p.requires_grad)
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


def test_freeze_norm_weights_leaves_only_the_biases_trainable():
    model = create_model("resnet20")
    assert freeze_norm_weights(model) == 19
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.weight.requires_grad and m.bias.requires_grad for m in bns)
    opt = build_optimizer(model, TrainConfig())
    assert not {id(m.weight) for m in bns} & {id(p) for g in opt.param_groups for p in g["params"]}
    assert freeze_norm_weights(nn.Sequential(nn.Linear(3, 2))) == 0


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_norm_bias_lr_mult_is_validated(value):
    with pytest.raises(ConfigError, match="--norm-bias-lr-mult"):
        TrainConfig(norm_bias_lr_mult=value).validate()


def test_the_three_options_train_from_the_cli(tmp_path):
    out = tmp_path / "run"
    main(["train", "--data", "digits", "--model", "resnet9", "--model-kwargs", json.dumps({**FAST_NET,
          "identity_init": True}), "--freeze-norm-weight", "--norm-bias-lr-mult", "16", "--optimizer", "muon",
          "--muon-lr", "0.1", "--lr", "0.1", "--epochs", "2", "--batch-size", "64", "--schedule", "onecycle",
          "--warmup-iters", "5", "--no-progress", "--threads", "1", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["test_top1"] > 0.8  # digits: 10 classes, chance is 10 %
    weights = load_file(out / "checkpoints" / "last" / "model.safetensors")
    bn_scales = [k for k in weights if k.endswith(".weight") and weights[k].ndim == 1]
    assert len(bn_scales) == 7 and all((weights[k] == 1).all() for k in bn_scales)
    bn_biases = [k[:-len("weight")] + "bias" for k in bn_scales]
    assert all(weights[k].abs().sum() > 0 for k in bn_biases)  # they learned (they start at 0)


def test_whiten_bias_epochs_freezes_the_stem_biases_after_n_epochs(tmp_path):
    """--whiten-bias-epochs 1 over 3 epochs: the whitening biases end as they were after epoch 1 (which is the
    same in a 1-epoch run: constant schedule), while the rest of the net, and the biases without the option,
    keep learning; 0 never trains them. A model without a whitening stem is refused, naming the option."""
    from reslab.train import train
    from reslab.train.engine import TrainingError

    base = dict(model="resnet9", model_kwargs=FAST_NET, data="digits", batch_size=64, schedule="constant",
                lr=0.05, progress=False, amp="off", threads=1, image_size=16)
    train(TrainConfig(**base, epochs=1), out=str(tmp_path / "one"))
    train(TrainConfig(**base, epochs=3, whiten_bias_epochs=1), out=str(tmp_path / "frozen"))
    train(TrainConfig(**base, epochs=3), out=str(tmp_path / "trained"))
    one, frozen, trained = (load_file(tmp_path / name / "checkpoints" / "last" / "model.safetensors")
                            for name in ("one", "frozen", "trained"))
    assert one["stem.0.bias"].abs().sum() > 0  # they learned in epoch 1 (they start at 0)
    assert torch.equal(frozen["stem.0.bias"], one["stem.0.bias"])
    assert not torch.equal(trained["stem.0.bias"], one["stem.0.bias"])
    assert not torch.equal(frozen["fc.weight"], one["fc.weight"])
    assert json.loads((tmp_path / "frozen" / "summary.json").read_text())["final"]["test_top1"] > 0.5  # chance: 0.1
    # From the CLI, 0 freezes them from the start: they stay at their initial zeros.
    main(["train", "--data", "digits", "--model", "resnet9", "--model-kwargs", json.dumps(FAST_NET),
          "--image-size", "16", "--epochs", "1", "--whiten-bias-epochs", "0", "--no-progress", "--threads", "1",
          "--out", str(tmp_path / "cli")])
    cli = load_file(tmp_path / "cli" / "checkpoints" / "last" / "model.safetensors")
    assert (cli["stem.0.bias"] == 0).all() and not torch.equal(cli["fc.weight"], trained["fc.weight"])
    with pytest.raises(TrainingError, match="--whiten-bias-epochs"):
        train(TrainConfig(model="resnet20", data="digits", epochs=1, progress=False, whiten_bias_epochs=1),
              out=str(tmp_path / "plain"))
