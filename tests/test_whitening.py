"""The airbench-style speed pieces (Jordan 2024): the patch-whitening stem (fitted on training images by the
loop, checkpointed, not refitted on resume) and multi-crop test-time augmentation, on real computations."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.cli import main
from reslab.models import count_macs, count_params, create_model
from reslab.models.whitening import PatchWhitening, fit_data_dependent_init
from reslab.train import TrainConfig, train
from reslab.train.engine import _translate, tta_logits
from tests.test_train import FAST, weights


def _correlated_images(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 16, 16, generator=g)
    smooth = F.avg_pool2d(F.pad(base, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # neighbouring pixels correlate
    return torch.cat([smooth, 0.5 * smooth + 0.1 * torch.randn(n, 1, 16, 16, generator=g), -smooth], 1)


def test_whitening_filters_whiten_the_patches():
    """Coates & Ng 2011 / airbench: after fitting, the first C*k*k filter responses on the fitting images are
    uncorrelated with unit variance (up to eps), and the second half is the first half negated."""
    images = _correlated_images()
    stem = PatchWhitening(3, kernel_size=2, eps=1e-6)
    assert not stem.fitted
    stem.fit(images)
    assert stem.fitted and stem.out_channels == 24
    response = F.conv2d(images, stem.weight)
    half = response[:, :12].permute(1, 0, 2, 3).reshape(12, -1).double()
    # The third channel is a copy of the first (negated), so the patch covariance has rank 8: the whitened
    # directions are the 8 strongest, the rest are ~0 (eigenvalue 0 + eps would blow noise up, not whiten).
    cov = torch.cov(half)
    assert torch.allclose(cov[:8, :8], torch.eye(8, dtype=torch.float64), atol=1e-3)
    assert torch.equal(stem.weight[12:], -stem.weight[:12])
    assert not stem.weight.requires_grad and stem.bias.requires_grad
    with pytest.raises(ValueError, match="expects"):
        stem.fit(torch.randn(4, 1, 8, 8))


def test_resnet9_whiten_stem():
    model = create_model("resnet9", width=0.375, stem="whiten")
    assert isinstance(model.stem[0], PatchWhitening)
    assert model.layer1[0][0].in_channels == 24  # 2 x 3 x 2 x 2 whitening filters feed layer1
    assert fit_data_dependent_init(model, torch.randn(64, 3, 32, 32)) == 1
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # 31 -> 15 -> 7 -> 3 maps
    # The frozen filters are not trained parameters of the optimiser's kind but do travel in the state_dict.
    assert "stem.0.weight" in model.state_dict()
    assert count_params(model) > 0
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet9", stem="patchify")
    wide_late = create_model("resnet9", stem="whiten", widths=[24, 48, 128, 256])  # per-stage channels
    assert [wide_late.layer1[0][0].out_channels, wide_late.layer2[0][0].out_channels,
            wide_late.layer3[0][0].out_channels, wide_late.fc.in_features] == [48, 128, 256, 256]
    with pytest.raises(ValueError, match="widths"):
        create_model("resnet9", widths=[64, 128, 256])


def test_resnet9_pool_first_computes_the_same_function_in_eval_mode():
    """conv-pool-BN-ReLU equals conv-BN-ReLU-pool once BN is a fixed per-channel increasing map (eval mode,
    positive scales): max-pooling commutes with it. Only the training-time BN statistics differ."""
    torch.manual_seed(0)
    page = create_model("resnet9", width=0.25, stem="whiten")
    fit_data_dependent_init(page, torch.randn(64, 3, 32, 32))
    with torch.no_grad():
        for m in page.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics and positive scales
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    pooled = create_model("resnet9", width=0.25, stem="whiten", pool_first=True)
    renamed = {}
    for key, value in page.state_dict().items():  # conv layerN.0.0 -> N.0, BN N.0.1 -> N.2, block N.2 -> N.4
        parts = key.split(".")
        if parts[0].startswith("layer") and parts[1] == "0":
            parts = [parts[0], "0" if parts[2] == "0" else "2", *parts[3:]]
        elif parts[0].startswith("layer") and parts[1] == "2":
            parts = [parts[0], "4", *parts[2:]]
        renamed[".".join(parts)] = value
    pooled.load_state_dict(renamed)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pooled.eval()(x), page.eval()(x), rtol=1e-4, atol=1e-5)
    assert count_macs(pooled, (3, 32, 32)) == count_macs(page, (3, 32, 32))  # same convolutions


def test_loop_fits_whitening_and_resume_keeps_it(tmp_path):
    """The loop fits the stem before step 0 (so the trained filters are the fitted ones, frozen through training),
    and a resumed run continues with the checkpointed filters bit for bit."""
    cfg = TrainConfig(**{**FAST, "model": "resnet9"}, model_kwargs={"width": 0.25, "stem": "whiten"}, epochs=2,
                      schedule="onecycle", warmup_iters=5, lr=0.05)
    straight = train(cfg, out=str(tmp_path / "straight"))
    assert straight.init_seconds > 0  # the fit is timed: time-to-accuracy counts it as training time
    w = weights(tmp_path / "straight")
    assert bool(w["stem.0.fitted"]) and w["stem.0.weight"].abs().sum() > 0

    def interrupt(step):
        if step == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=str(tmp_path / "resumed"), on_step=interrupt)
    assert train(resume=tmp_path / "resumed").init_seconds == 0  # not refitted
    r = weights(tmp_path / "resumed")
    assert torch.equal(r["stem.0.weight"], w["stem.0.weight"])
    for k in w:
        assert torch.equal(w[k], r[k]), k


def test_translate_moves_pixels_with_reflected_border():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    down_right = _translate(x, 1, 1)
    assert torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(_translate(x, -2, 0)[..., :-2, :], x[..., 2:, :])
    assert torch.equal(_translate(x, 0, 0), x)
    with pytest.raises(ValueError, match="too large"):
        _translate(x, 5, 5)


def test_tta_logits_views_and_weights():
    """No TTA = the model's logits; flip averages with the mirror; shift adds the two translated pairs at 1/4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        plain = model(x)
        assert torch.equal(tta_logits(model, x), plain)
        flipped = (plain + model(x.flip(3))) / 2
        assert torch.allclose(tta_logits(model, x, flip=True), flipped)
        expected = flipped / 2 + ((model(_translate(x, 1, 1)) + model(_translate(x, 1, 1).flip(3))) / 2 +
                                  (model(_translate(x, -1, -1)) + model(_translate(x, -1, -1).flip(3))) / 2) / 4
        assert torch.allclose(tta_logits(model, x, flip=True, shift=1), expected, atol=1e-6)


def test_eval_val_split_is_the_runs_held_out_split_and_tta_matches_training(tmp_path):
    """`reslab eval --split val` re-creates the validation images the run held out (same fraction and seed), and
    its multi-crop TTA reproduces what the loop measured at the end of training."""
    from reslab.evaluate import evaluate

    summary = train(TrainConfig(**FAST, epochs=2, val_fraction=0.2, tta_flip=True, tta_shift=1,
                                out=str(tmp_path / "r")))
    result = evaluate(tmp_path / "r", split="val", tta_flip=True, tta_shift=1, amp="off")
    assert result["count"] == pytest.approx(0.2 * 1437, abs=10)  # digits train split: 1,437 images
    assert result["top1"] == pytest.approx(summary.best["val_top1"], abs=1e-6)
    assert result["tta"] == {"flip": True, "shift": 1}
    assert main(["eval", str(tmp_path / "r"), "--split", "val", "--tta-flip", "--tta-shift", "1", "--amp", "off",
                 "--out", str(tmp_path / "cli.json")]) == 0
    cli = json.loads((tmp_path / "cli.json").read_text())
    assert cli["top1"] == pytest.approx(result["top1"], abs=1e-9) and cli["tta"]["shift"] == 1
