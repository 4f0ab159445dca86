"""Analysis metrics against constructed cases with known answers, and the analyze/calibrate/signal/scaling
commands end to end on a tiny digits run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reslab.evaluate.analyze import classification_summary, confusion_matrix, most_confused_pairs, per_class_metrics
from reslab.evaluate.calibration import expected_calibration_error, fit_temperature, reliability_bins


# ---------------------------------------------------------------------------------------------------------
# Confusion matrix and F1


def test_confusion_and_f1_of_known_predictions():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    cm = confusion_matrix(labels, preds, 3)
    np.testing.assert_array_equal(cm, [[3, 1, 0], [0, 2, 1], [1, 0, 2]])
    m = per_class_metrics(cm)
    # class 0: tp 3, predicted 4, support 4 -> P = R = F1 = 0.75
    # class 1: tp 2, predicted 3, support 3 -> P = R = 2/3
    # class 2: tp 2, predicted 3, support 3 -> P = R = 2/3
    np.testing.assert_allclose(m["precision"], [0.75, 2 / 3, 2 / 3])
    np.testing.assert_allclose(m["recall"], [0.75, 2 / 3, 2 / 3])
    np.testing.assert_allclose(m["f1"], [0.75, 2 / 3, 2 / 3])
    np.testing.assert_array_equal(m["support"], [4, 3, 3])


def test_f1_with_unequal_precision_and_recall_and_an_unpredicted_class():
    labels = np.array([0, 0, 1, 1, 2])
    preds = np.array([0, 0, 0, 0, 1])  # class 2 never predicted, class 1 never right
    m = per_class_metrics(confusion_matrix(labels, preds, 3))
    np.testing.assert_allclose(m["precision"], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(m["recall"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(m["f1"], [2 * 0.5 * 1.0 / 1.5, 0.0, 0.0])
    from sklearn.metrics import f1_score

    np.testing.assert_allclose(m["f1"], f1_score(labels, preds, average=None, zero_division=0))


def test_most_confused_pairs_and_summary():
    cm = np.array([[5, 0, 3], [1, 5, 0], [0, 7, 5]])
    assert most_confused_pairs(cm, 2) == [(2, 1, 7), (0, 2, 3)]
    probs = np.eye(3)[[0, 1, 1]]
    s = classification_summary(np.array([0, 1, 2]), probs, ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["most_confused"] == [{"true": "c", "predicted": "b", "count": 1}]


# ---------------------------------------------------------------------------------------------------------
# Calibration


def test_ece_of_a_perfectly_calibrated_predictor_is_near_zero():
    rng = np.random.default_rng(0)
    n = 200_000
    conf = rng.uniform(0.5, 1.0, n)  # two classes: the top-1 confidence is in [0.5, 1]
    correct = rng.random(n) < conf  # right exactly as often as it is confident
    labels = np.where(correct, 0, 1)
    probs = np.stack([conf, 1 - conf], 1)
    assert expected_calibration_error(probs, labels) < 0.005


def test_ece_of_a_known_miscalibrated_predictor():
    # always 90% confident, right 60% of the time: ECE = |0.6 - 0.9| = 0.3 exactly
    n = 1000
    probs = np.tile([0.9, 0.1], (n, 1))
    labels = np.array([0] * 600 + [1] * 400)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.3)
    bins = reliability_bins(probs, labels, 10)
    assert bins["count"].sum() == n and bins["count"][8] == n  # 0.9 falls in the (0.8, 0.9] bin


def test_temperature_scaling_recovers_a_known_temperature():
    gen = torch.Generator().manual_seed(0)
    true_logits = 2.0 * torch.randn(20_000, 10, generator=gen)
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=gen)[:, 0]  # calibrated at T = 1
    for temperature in (0.5, 2.5):
        t = fit_temperature(true_logits * temperature, labels)  # the model's logits are T times too large
        assert t == pytest.approx(temperature, rel=0.05)


# ---------------------------------------------------------------------------------------------------------
# Commands on a tiny run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from reslab.train import train
    from reslab.train.config import TrainConfig

    out = tmp_path_factory.mktemp("analysis") / "run"
    train(TrainConfig(model="resnet20", data="digits", epochs=2, batch_size=64, lr=0.05, val_fraction=0.1,
                      model_kwargs={"width": 0.5}, progress=False, out=str(out), amp="off"))
    return out


def test_analyze_and_calibrate_write_json_figures_and_temperature(tiny_run):
    from reslab.cli import main
    from reslab.evaluate.calibration import stored_temperature

    assert main(["analyze", str(tiny_run), "--top-losses", "6"]) == 0
    folder = tiny_run / "analysis"
    for name in ("analyze.json", "calibration.json", "confusion.png", "confused_pairs.png", "top_losses.png",
                 "reliability.png"):
        assert (folder / name).is_file(), name
    a = json.loads((folder / "analyze.json").read_text())
    cm = np.array(a["confusion_matrix"])
    assert cm.sum() == a["count"] and np.trace(cm) / cm.sum() == pytest.approx(a["accuracy"])
    assert len(a["top_losses"]) == 6 and a["top_losses"][0]["loss"] >= a["top_losses"][-1]["loss"]
    c = json.loads((folder / "calibration.json").read_text())
    assert c["fitted_on"]["source"] == "run_val_split"  # the run was trained with --val-fraction
    assert c["test_after"]["accuracy"] == pytest.approx(c["test_before"]["accuracy"])  # T never changes argmax
    assert c["val_after"]["nll"] <= c["val_before"]["nll"] + 1e-9
    assert stored_temperature(tiny_run) == pytest.approx(c["temperature"])


def test_predict_divides_the_logits_by_the_stored_temperature(tiny_run, tmp_path):
    """`reslab predict` returns softmax(logits / T) with the T that `reslab calibrate` stored (Guo et al. 2017)."""
    import shutil

    from PIL import Image

    from reslab.data import load_data
    from reslab.evaluate import predict
    from reslab.evaluate.analyze import model_logits
    from reslab.evaluate.calibration import CALIBRATION_FILE
    from reslab.train.checkpoint import load_model
    from reslab.train.rundir import write_json

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / CALIBRATION_FILE).unlink(missing_ok=True)
    test = load_data("digits").test
    files = []
    for i in range(6):
        files.append(tmp_path / f"d{i}.png")
        Image.fromarray(test.images[i][..., 0]).save(files[-1])
    model, card = load_model(run, device=torch.device("cpu"))
    with torch.no_grad():
        logits, _ = model_logits(model, card, test.subset(np.arange(6)), device=torch.device("cpu"))

    def probabilities():
        out = predict(run, files, topk=10, device="cpu", amp="off")
        return torch.tensor([[dict((t["class"], t["probability"]) for t in r["top"])[c] for c in card["classes"]]
                             for r in out])

    np.testing.assert_allclose(probabilities(), torch.softmax(logits, 1), atol=1e-5)
    write_json(run / CALIBRATION_FILE, {"temperature": 2.0, "fitted_on": {"source": "test"},
                                        "usage": "divide the logits by temperature before the softmax"})
    tempered = probabilities()
    np.testing.assert_allclose(tempered, torch.softmax(logits / 2, 1), atol=1e-5)
    assert (tempered.max(1).values < torch.softmax(logits, 1).max(1).values).all()  # T > 1 softens every answer


def test_calibrate_needs_a_fraction_to_carve_when_there_is_no_val_split(tiny_run, tmp_path):
    from reslab.evaluate.calibration import _validation_split

    card = {"data": "digits"}
    with pytest.raises(ValueError, match="val-fraction"):
        _validation_split(tiny_run, card, "some-other-data", 0.0, None)  # other data: the run's val split is moot


def test_signal_shows_the_plain_net_gradient_spread(tmp_path):
    from reslab.evaluate.signal import signal

    r = signal("resnet56", depths=[56], batch_size=8, out=tmp_path)
    nets = {n["label"]: n for n in r["nets"]}
    spread = {k: max(n["gradient_rms"]) / min(n["gradient_rms"]) for k, n in nets.items()}
    # 55 stacked conv+BN+ReLU layers multiply the gradient; shortcuts keep it within a small factor.
    assert spread["plain56"] > 10 * spread["resnet56"]
    assert (tmp_path / "signal.png").is_file() and len(nets["resnet56"]["blocks"]) == 28


def test_signal_measures_a_trained_plain_and_residual_pair(tiny_run, tmp_path):
    """`--run` twice: each trained model is measured on its own test images (eval-mode BN) beside the init nets."""
    from reslab.cli import main
    from reslab.train import train
    from reslab.train.config import TrainConfig

    plain_run = tmp_path / "plain"
    train(TrainConfig(model="plain20", data="digits", epochs=1, batch_size=64, lr=0.05, model_kwargs={"width": 0.5},
                      progress=False, out=str(plain_run), amp="off"))
    out = tmp_path / "sig"
    assert main(["signal", "resnet20", "--depths", "20", "--batch-size", "8", "--run", str(plain_run),
                 "--run", str(tiny_run), "--out", str(out)]) == 0
    r = json.loads((out / "signal.json").read_text())
    trained = [n for n in r["nets"] if n["state"] == "trained"]
    assert [n["model"] for n in trained] == ["plain20", "resnet20"]
    for n in trained:  # stem + 9 blocks, finite, and a real backward pass reached every block
        assert len(n["blocks"]) == 10 and all(0 < g < float("inf") for g in n["gradient_rms"])
    assert [n["state"] for n in r["nets"]].count("init") == 2 and (out / "signal.png").is_file()


def test_scaling_trains_nested_fractions(tmp_path):
    from reslab.evaluate.scaling import scaling, subset_sizes

    full, sizes = subset_sizes("digits", [0.25, 0.5, 1.0], seed=0)
    assert sizes[0] < sizes[1] < sizes[2] == full
    r = scaling("resnet20", "digits", fractions="0.5,1.0", epochs=1, out=tmp_path,
                overrides={"batch_size": 64, "model_kwargs": {"width": 0.25}, "amp": "off"})
    assert [p["fraction"] for p in r["points"]] == [0.5, 1.0]
    assert r["points"][0]["train_images"] < r["points"][1]["train_images"]
    assert all(p["test_top1"] is not None for p in r["points"])
    assert (tmp_path / "scaling.png").is_file()
