"""The 15 corruptions (deterministic, shape/range preserving, monotone in severity), the CE/mCE arithmetic,
and the robustness command end to end."""
from __future__ import annotations

import numpy as np
import pytest

from reslab.evaluate.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from reslab.evaluate.robustness import corruption_errors


def _natural_images(n: int, size: int, channels: int = 3) -> np.ndarray:
    """Smooth gradients, a few shapes and mild texture: enough structure for blurs to change something."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        base = 0.3 + 0.4 * (rng.uniform() * yy + rng.uniform() * xx) / 2
        img = np.repeat(base[..., None], channels, 2) * rng.uniform(0.6, 1.2, channels)
        for _ in range(3):
            cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.08, 0.25)]
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
            img[mask] = rng.uniform(0, 1, channels)
        img += rng.normal(0, 0.02, img.shape)
        images.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.stack(images)


def test_the_suite_has_the_15_corruptions_of_the_paper():
    assert list(CORRUPTIONS) == ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                                 "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                                 "elastic_transform", "pixelate", "jpeg_compression"]


# Corruptions that add energy (noise, flakes, frost) may leave [0, 1] and rely on the final clip, as in the
# paper's code; every other one mixes, resamples or rescales pixel values and must stay in range by itself.
ADDITIVE = {"gaussian_noise", "shot_noise", "snow", "frost"}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_is_deterministic_in_range_and_monotone(name):
    images = _natural_images(3, 32)
    distances = []
    for s in SEVERITIES:
        out = corrupt(images, name, s, seed=7)
        assert out.shape == images.shape
        np.testing.assert_array_equal(out, corrupt(images, name, s, seed=7))
        distances.append(float(np.abs(out.astype(float) - images).mean()))
        for i, image in enumerate(images):  # the float result, before corrupt() clips and casts it
            raw = np.asarray(CORRUPTIONS[name](image.astype(np.float32) / 255, s, np.random.default_rng(i)))
            assert raw.shape == image.shape and np.isfinite(raw).all()
            outside = float(((raw < -1e-6) | (raw > 1 + 1e-6)).mean())
            assert outside < (0.05 if name in ADDITIVE else 1e-9), (s, outside)  # the clip rarely decides the image
    assert 0 < distances[0] < 255 / 8, distances  # severity 1 is mild: it changes pixels by under 1/8 of the range
    assert all(b >= a for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] > distances[0]
    if name not in ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"):
        assert not np.array_equal(corrupt(images, name, 3, seed=7), corrupt(images, name, 3, seed=8))


@pytest.mark.parametrize("shape", [(8, 8, 1), (20, 12, 3), (64, 64, 3)])
def test_corruptions_work_on_other_sizes_and_grey_images(shape):
    image = _natural_images(1, max(shape[:2]), shape[2])[0][: shape[0], : shape[1]]
    for name in CORRUPTIONS:
        out = corrupt(image, name, 5, seed=0)
        assert out.shape == image.shape and out.dtype == np.uint8, name


def test_unknown_corruption_and_severity_are_clear_errors():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(image, "rain", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(image, "fog", 6)


def test_ce_and_mce_against_hand_computed_values():
    errors = {"a": [0.2, 0.4], "b": [0.5, 0.5]}
    base = {"a": [0.4, 0.8], "b": [0.5, 1.5]}
    r = corruption_errors(errors, 0.1, base, 0.2)
    assert r["ce"] == pytest.approx({"a": 50.0, "b": 50.0})
    assert r["mce"] == pytest.approx(50.0)
    # relative: a: (0.1 + 0.3) / (0.2 + 0.6) = 50%; b: (0.4 + 0.4) / (0.3 + 1.3) = 50%
    assert r["relative_ce"] == pytest.approx({"a": 50.0, "b": 50.0})
    assert r["mean_error"] == pytest.approx(0.4)
    assert "mce" not in corruption_errors(errors, 0.1)


def test_robustness_command_with_a_baseline(tmp_path):
    from reslab.cli import main
    from reslab.train import train
    from reslab.train.config import TrainConfig

    run, baseline = tmp_path / "run", tmp_path / "baseline"
    train(TrainConfig(model="resnet20", data="digits", epochs=1, batch_size=64, lr=0.05,
                      model_kwargs={"width": 0.25}, progress=False, out=str(run), amp="off"))
    # a weaker baseline (another architecture, a tenth of the data): its errors are not the run's
    train(TrainConfig(model="plain20", data="digits", epochs=1, batch_size=64, lr=0.05, train_fraction=0.1,
                      model_kwargs={"width": 0.25}, progress=False, out=str(baseline), amp="off"))
    assert main(["robustness", str(run), "--baseline", str(baseline), "--limit", "40",
                 "--corruptions", "gaussian_noise,fog", "--severities", "1,5", "--device", "cpu"]) == 0
    import json

    r = json.loads((run / "analysis" / "robustness.json").read_text())
    assert r["images"] == 40 and set(r["errors"]) == {"gaussian_noise", "fog"}
    base = r["baseline"]["errors"]
    assert r["errors"] != base
    ce = {c: 100 * sum(r["errors"][c]) / sum(base[c]) for c in r["errors"]}  # Hendrycks & Dietterich 2019, §3
    assert r["ce"] == pytest.approx(ce) and r["mce"] == pytest.approx(np.mean(list(ce.values())))
    assert r["mce"] != pytest.approx(100.0)
    assert (run / "analysis" / "robustness.png").is_file()
    assert (run / "analysis" / "corruption_examples.png").is_file()
