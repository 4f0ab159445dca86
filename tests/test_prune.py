"""Structured pruning: MAC budget met, dense smaller model, importance prefers channels that matter,
ONNX export with parity, and pruned runs that `reslab eval` reads."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from reslab.deploy.export import export_model
from reslab.deploy.prune import (channel_importance, inner_channels_of, prune, prune_model, prunable_units,
                                 select_channels)
from reslab.models import count_macs, count_params, create_model

from conftest import train_quick_digits


def _calibrated(name: str, side: int, **kwargs) -> tuple[nn.Module, list[torch.Tensor]]:
    """A random-init model whose BN statistics are estimated on random data (so eval mode is meaningful)."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    batches = [torch.randn(16, 3, side, side) for _ in range(2)]
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval(), batches


@pytest.mark.parametrize("name,side,target", [("resnet20", 32, 0.5), ("resnet20", 32, 0.3),
                                              ("plain20", 32, 0.7), ("resnet50", 64, 0.5)])
def test_prune_meets_budget_dense_and_smaller(name, side, target):
    model, batches = _calibrated(name, side)
    pruned, info = prune_model(model, batches, target, input_size=(3, side, side))
    macs = count_macs(pruned, (3, side, side))
    original = count_macs(model, (3, side, side))
    assert macs <= target * original * 1.0001
    assert macs >= (target - 0.03) * original  # close to the budget, not far below it
    assert count_params(pruned) < count_params(model)
    assert type(pruned) is type(model)
    # Dense and consistent: plain Conv2d modules whose widths chain, residual widths unchanged.
    assert all(not hasattr(m, "weight_mask") for m in pruned.modules())
    assert [s.channels for s in pruned.stage_info] == [s.channels for s in model.stage_info]
    assert inner_channels_of(pruned) == info["model_kwargs"]["inner_channels"]
    with torch.no_grad():
        out = pruned(torch.randn(2, 3, side, side))
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()


def test_scores_prefer_a_channel_that_matters_over_a_zeroed_one():
    model, batches = _calibrated("resnet20", 32)
    block, dead = model.layer2[1], 5
    with torch.no_grad():  # silence channel 5 of layer2.1.conv1: its output is exactly zero
        block.conv1.weight[dead].zero_()
        block.bn1.weight[dead] = 0.0
        block.bn1.bias[dead] = 0.0
    scores = channel_importance(model, batches)["layer2.1.conv1"]
    assert scores[dead] == 0 and (scores[torch.arange(len(scores)) != dead] > 0).all()
    # Under a budget that removes only a few channels, the zeroed one goes first.
    keep = select_channels(model, channel_importance(model, batches), 0.995, (3, 32, 32))
    assert dead not in keep["layer2.1.conv1"]
    assert sum(u.width - len(keep[u.name]) for u in prunable_units(model)) <= 3


@pytest.mark.parametrize("name,side,round_to", [("resnet20", 32, 8), ("resnet50", 64, 16)])
def test_round_to_keeps_multiples_of_the_simd_width(name, side, round_to):
    model, batches = _calibrated(name, side)
    pruned, info = prune_model(model, batches, 0.5, input_size=(3, side, side), round_to=round_to)
    assert count_macs(pruned, (3, side, side)) <= 0.5 * count_macs(model, (3, side, side)) * 1.0001
    widths = {u.name: u.width for u in prunable_units(model)}
    kept = info["kept_channels"]
    assert any(kept[n] < widths[n] for n in kept)  # something was pruned
    for n, k in kept.items():  # a multiple of round_to, or the unit untouched
        assert k == widths[n] or k % round_to == 0, (n, k, widths[n])
    assert info["round_to"] == round_to and inner_channels_of(pruned) == info["model_kwargs"]["inner_channels"]


def test_round_to_removes_the_least_important_channels_as_one_chunk():
    """Eight silenced channels of one unit, scattered: under a budget that removes about eight channels in
    all, round_to=8 removes exactly them (the least important chunk), and a 16-wide unit keeps 8 or 16."""
    model, batches = _calibrated("resnet20", 32)
    block, dead = model.layer1[1], [0, 3, 4, 7, 9, 10, 13, 15]
    with torch.no_grad():
        block.conv1.weight[dead] = 0.0
        block.bn1.weight[dead] = 0.0
        block.bn1.bias[dead] = 0.0
    keep = select_channels(model, channel_importance(model, batches), 0.99, (3, 32, 32), round_to=8)
    assert keep["layer1.1.conv1"] == [c for c in range(16) if c not in dead]
    assert all(len(v) in (u.width, u.width - 8) for u in prunable_units(model) for v in [keep[u.name]])
    with pytest.raises(ValueError, match="--round-to"):
        select_channels(model, channel_importance(model, batches), 0.5, (3, 32, 32), round_to=0)


def test_score_equals_the_measured_feature_change():
    """The closed form matches brute force: zero one channel, measure the consumer BN output's change."""
    model, batches = _calibrated("resnet20", 32)
    block = model.layer3[0]
    scores = channel_importance(model, batches[:1])["layer3.0.conv1"]
    captured = {}
    block.bn2.register_forward_hook(lambda m, i, o: captured.__setitem__("y", o.detach().clone()))
    with torch.no_grad():
        model(batches[0])
        reference = captured["y"]
        for c in (0, 7, 31):
            handle = block.conv2.register_forward_pre_hook(
                lambda m, inp, c=c: (inp[0].index_fill(1, torch.tensor([c]), 0.0),))
            model(batches[0])
            handle.remove()
            change = reference - captured["y"]
            centred = change - change.mean(dim=(0, 2, 3), keepdim=True)
            expected = centred.pow(2).sum() / (change.shape[0] * change.shape[2] * change.shape[3])
            assert torch.isclose(scores[c].float(), expected, rtol=1e-3), (c, scores[c], expected)


def test_unreachable_budget_and_bad_kwargs_raise():
    model, batches = _calibrated("resnet20", 32)
    with pytest.raises(ValueError, match="cannot go below"):
        prune_model(model, batches, 0.05, input_size=(3, 32, 32), min_keep=0.5)
    with pytest.raises(ValueError, match="inner_channels"):
        create_model("resnet20", inner_channels=[[8]] * 4)
    with pytest.raises(ValueError):
        prune_model(create_model("preact_resnet20"), batches, 0.5, input_size=(3, 32, 32))


def test_pruned_model_exports_to_onnx_with_parity(tmp_path):
    model, batches = _calibrated("resnet50", 64, num_classes=10)
    pruned, _ = prune_model(model, batches, 0.5, input_size=(3, 64, 64))
    pruned.model_name = "resnet50"
    card = export_model(pruned, "onnx", tmp_path, dynamic_batch=True, input_size=(3, 64, 64))
    assert card["parity"]["max_abs_diff"] < 1e-4


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return train_quick_digits(tmp_path_factory.mktemp("prune") / "run")


def test_prune_run_finetune_and_eval(digits_run, tmp_path, capsys):
    from reslab.cli import main

    r = prune(digits_run, 0.5, finetune_epochs=1, out=tmp_path / "p", measure_speed=False, export_onnx=True,
              calibration_images=128)
    err = capsys.readouterr().err
    assert "fine-tune macs-0.50" in err and "fine-tune unpruned (control)" in err  # progress bars
    point = r["points"][0]
    # the control: the unpruned net fine-tuned the same way, the fair reference for the fine-tuned point
    assert r["baseline"]["top1_finetuned"] >= r["baseline"]["top1"] - 0.05
    assert abs(point["macs_fraction"] - 0.5) < 0.03 and "top1_finetuned" in point
    # Half the multiply-adds of a ~97 % model: one-shot keeps most of it, the fine-tune epoch recovers more.
    assert point["top1_oneshot"] >= 0.8 and point["top1_finetuned"] >= r["baseline"]["top1"] - 0.05, r
    assert point["onnx"]["max_abs_diff"] < 1e-4
    folder = tmp_path / "p" / "macs-0.50"
    manifest = json.loads((folder / "checkpoints" / "best" / "manifest.json").read_text())
    assert manifest["model_kwargs"]["inner_channels"] and manifest["prune"]["target_macs"] == 0.5
    # `reslab eval` on the pruned run gives prune's (fp32) figure
    assert main(["eval", str(folder), "--amp", "off", "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert abs(result["top1"] - point["top1"]) < 1e-6


def test_prune_cli_curve(digits_run, tmp_path, capsys):
    from reslab.cli import main

    code = main(["prune", str(digits_run), "--target-macs", "0.7,0.4", "--calibration-images", "64",
                 "--out", str(tmp_path / "c")])
    assert code == 0
    printed = capsys.readouterr().out
    curve = json.loads((tmp_path / "c" / "prune-curve.json").read_text())
    base, points = curve["baseline"], curve["points"]
    assert [p["target_macs"] for p in points] == [0.7, 0.4]
    for p in points:  # each budget met closely, by a smaller net, with its own run folder
        assert p["macs_before"] == base["macs"] and p["params_before"] == base["params"]
        assert p["target_macs"] - 0.03 <= p["macs_fraction"] <= p["target_macs"] * 1.0001
        assert p["macs_after"] == pytest.approx(p["macs_fraction"] * base["macs"])
        for path in ("eager", "deployed"):  # both paths timed for every model, side by side
            assert p[f"{path}_speedup"] == pytest.approx(p[f"{path}_images_per_s"] / base[f"{path}_images_per_s"])
        assert (tmp_path / "c" / f"macs-{p['target_macs']:.2f}" / "prune.json").is_file()
        assert f"target {p['target_macs']:.2f}: {p['macs_after'] / 1e6:.2f} M MACs" in printed
        assert f"{p['eager_speedup']:.2f}x eager, {p['deployed_speedup']:.2f}x deployed" in printed
    assert base["params"] > points[0]["params_after"] > points[1]["params_after"]  # smaller budget, fewer params
    assert (tmp_path / "c" / "prune-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["prune", str(digits_run), "--target-macs", "1.5"]) == 2
    # an unreachable budget among several fails before any pruning or fine-tuning, naming the option
    assert main(["prune", str(digits_run), "--target-macs", "0.7,0.01", "--finetune-epochs", "1",
                 "--out", str(tmp_path / "u")]) == 2
    assert "--target-macs 0.01" in capsys.readouterr().err and not (tmp_path / "u" / "macs-0.70").exists()
