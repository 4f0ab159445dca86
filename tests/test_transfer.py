"""Transfer: features, linear probe and kNN, fine-tuning, and the Matryoshka evaluation, on tiny generated data."""
import json

import numpy as np
import pytest
import torch

from reslab.cli import main
from reslab.train import TrainConfig, train
from reslab.train.checkpoint import load_model
from reslab.transfer.features import load_features
from reslab.transfer.probe import knn_predict
from reslab.transfer.retrieval import map_at_k

FAST = dict(model="resnet20", data="digits", image_size=16, batch_size=64, progress=False, flip=False,
            crop_padding=2, amp="off", lr=0.1, schedule="cosine")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    train(TrainConfig(**FAST, epochs=2, out=str(out)))
    return out


@pytest.fixture(scope="module")
def glyph_sets(tmp_path_factory):
    from reslab.transfer.synth import synth_glyphs

    root = tmp_path_factory.mktemp("glyphs")
    synth_glyphs("ABCD", root / "source", n_per_class=20, size=16, seed=0)
    synth_glyphs("EFG", root / "target", n_per_class=20, size=16, seed=1)
    return root / "source", root / "target"


# ---------------------------------------------------------------------------------------------- features


def test_features_npy_and_safetensors(digits_run, tmp_path, capsys):
    assert main(["features", str(digits_run), "--out", str(tmp_path / "f.npy"), "--split", "test"]) == 0
    x, y, meta = load_features(tmp_path / "f.npy")
    assert x.shape == (len(y), 64) and x.dtype == np.float32
    assert meta["layer"] == "pre_logits" and len(meta["files"]) == len(y) and meta["classes"][0] == "0"
    assert main(["features", str(digits_run), "--out", str(tmp_path / "f.safetensors"), "--layer", "layer2"]) == 0
    x2, y2, meta2 = load_features(tmp_path / "f.safetensors")
    assert x2.shape[1] == 32 and meta2["layer"] == "layer2" and meta2["split"] == "train"
    # The stored features are the model's own pre-logits: the head applied to them gives the model's logits.
    model, card = load_model(digits_run)
    logits = model.fc(torch.as_tensor(x[:5]))
    from reslab.evaluate.evaluate import model_loader
    from reslab.transfer.features import load_data_as_model

    batch = next(iter(model_loader(card, load_data_as_model(card, None).test, device="cpu", batch_size=5)))[0]
    torch.testing.assert_close(logits, model(batch), atol=1e-4, rtol=1e-4)
    assert main(["features", str(digits_run), "--out", str(tmp_path / "f.npy"), "--layer", "nope"]) == 2
    assert "layer1, layer2, layer3, pre_logits" in capsys.readouterr().err


def test_features_of_folder_keep_file_names(digits_run, glyph_sets, tmp_path):
    # A 1-channel digits model reads an RGB folder converted to its own channels and size.
    assert main(["features", str(digits_run), "--data", str(glyph_sets[1]), "--out", str(tmp_path / "g.npy")]) == 0
    x, y, meta = load_features(tmp_path / "g.npy")
    assert meta["classes"] == ["00_e", "01_f", "02_g"] and meta["files"][0].endswith(".png")
    assert x.shape == (48, 64)


# ---------------------------------------------------------------------------------------------- probe, kNN


def test_knn_predict_majority_and_cosine():
    train_x = np.array([[1, 0], [2, 0.1], [0, 1], [0.1, 3]], dtype=np.float32)
    train_y = np.array([0, 0, 1, 1])
    test_x = np.array([[5, 0.2], [0.2, 5]], dtype=np.float32)  # scale does not matter for cosine
    assert knn_predict(train_x, train_y, test_x, k=1).tolist() == [0, 1]
    assert knn_predict(train_x, train_y, test_x, k=3).tolist() == [0, 1]


def test_probe_linear_and_knn(digits_run, tmp_path, capsys):
    assert main(["probe", str(digits_run), "--knn", "1,5", "--out", str(tmp_path / "p.json")]) == 0
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["linear_top1"] > 0.8 and r["knn1_top1"] > 0.7 and r["knn5_top1"] > 0.7
    assert r["environment"]["torch"] == torch.__version__
    assert "linear probe" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- Matryoshka


def test_map_at_k_by_hand():
    db_y = np.array([0, 0, 1, 1, 1])
    query_y = np.array([0, 1])
    neighbours = np.array([[0, 2, 1], [0, 2, 3]])
    # query 0: relevant at ranks 1 and 3 -> (1 + 2/3) / min(3, 2) ; query 1: ranks 2, 3 -> (1/2 + 2/3) / 3
    expected = ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 3) / 2
    assert map_at_k(db_y, query_y, neighbours, k=3) == pytest.approx(expected)


def test_nested_loss_shapes():
    from reslab.models import create_model
    from reslab.train.objectives import Matryoshka, matryoshka_logits

    net = create_model("resnet20", num_classes=7, in_chans=1)
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 7, (4,))
    pooled = net.forward_head(net.forward_features(x), pre_logits=True)
    logits = matryoshka_logits(net, pooled, [8, 16, 64])
    assert [tuple(lg.shape) for lg in logits] == [(4, 7)] * 3
    torch.testing.assert_close(logits[-1], net.fc(pooled))  # the full size is the ordinary head
    loss, full = Matryoshka([8, 16, 64])(net, x, y)
    assert loss.ndim == 0 and full.shape == (4, 7)
    loss.backward()
    assert net.fc.weight.grad[:, 8:16].abs().sum() > 0  # the second nested slice is trained
    with pytest.raises(ValueError, match="exceeds"):
        Matryoshka([128])(net, x, y)


def test_retrieve_against_baselines(tmp_path, capsys):
    mrl = tmp_path / "mrl"
    train(TrainConfig(**FAST, epochs=1, matryoshka=[8, 16, 64], out=str(mrl)))
    narrow = tmp_path / "narrow8"  # independently trained: an 8-dimensional embedding (width 1/8)
    train(TrainConfig(**FAST, epochs=1, model_kwargs={"width": 0.125}, out=str(narrow)))
    assert main(["retrieve", str(mrl), "--dims", "8,16", "--baseline", str(narrow), str(mrl),
                 "--out", str(tmp_path / "ret")]) == 0
    r = json.loads((tmp_path / "ret" / "retrieval.json").read_text())
    kinds = [row["kind"] for row in r["runs"]]
    assert kinds == ["matryoshka", "independent", "truncated"]
    assert [s["dim"] for s in r["runs"][0]["scores"]] == [8, 16]
    assert [s["dim"] for s in r["runs"][1]["scores"]] == [8]
    for s in r["runs"][0]["scores"]:
        assert 0 <= s["map@10"] <= 1 and s["knn1_top1"] > 0.3 and s["linear_top1"] > 0.3
    assert (tmp_path / "ret" / "retrieval.png").stat().st_size > 1000
    assert "mAP@10" in capsys.readouterr().out
    assert main(["retrieve", str(mrl), "--dims", "8,128"]) == 2  # wider than the embedding: one-line error


# ---------------------------------------------------------------------------------------------- fine-tuning


def test_freeze_and_initial_weights_units(digits_run):
    from reslab.models import create_model
    from reslab.transfer.finetune import freeze_modules, load_initial_weights

    model = create_model("resnet20", num_classes=3, in_chans=1)
    report = load_initial_weights(model, digits_run, model_name="resnet20", in_chans=1, classes=["a", "b", "c"])
    assert report["reset"] == ["fc.bias", "fc.weight"]
    source, _ = load_model(digits_run)
    torch.testing.assert_close(model.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    frozen = freeze_modules(model, ["stem", "layer1"])
    assert "conv1.weight" in frozen and any(n.startswith("layer1.") for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("layer2", "fc")))
    model.train()
    model(torch.randn(2, 1, 16, 16))
    assert not model.bn1.training and not model.layer1[0].bn1.training and model.layer2[0].bn1.training
    with pytest.raises(ValueError, match="choose from stem, layer1"):
        freeze_modules(model, ["layer9"])
    with pytest.raises(ValueError, match="holds a resnet20"):
        load_initial_weights(create_model("resnet32", num_classes=3, in_chans=1), digits_run, model_name="resnet32",
                             in_chans=1, classes=["a"])


def test_finetune_to_new_classes(glyph_sets, tmp_path, capsys):
    source, target = glyph_sets
    src = tmp_path / "src"
    train(TrainConfig(**{**FAST, "data": str(source)}, epochs=2, out=str(src)))
    out = tmp_path / "ft"
    assert main(["finetune", str(src), "--data", str(target), "--freeze", "stem,layer1", "--epochs", "2",
                 "--batch-size", "16", "--lr", "0.01", "--head-lr-mult", "10", "--out", str(out),
                 "--no-progress"]) == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.json"):
        assert (out / name).is_file()
    tuned, card = load_model(out)
    start, _ = load_model(src)
    assert card["classes"] == ["00_e", "01_f", "02_g"] and tuned.fc.out_features == 3
    torch.testing.assert_close(tuned.layer1[0].conv1.weight, start.layer1[0].conv1.weight)  # frozen
    torch.testing.assert_close(tuned.layer1[0].bn1.running_mean, start.layer1[0].bn1.running_mean)
    assert not torch.equal(tuned.layer3[0].conv1.weight, start.layer3[0].conv1.weight)  # learned
    assert main(["eval", str(out)]) == 0  # an ordinary run for the other commands


def test_discriminative_learning_rates():
    from reslab.models import create_model
    from reslab.train.engine import build_optimizer, set_lr

    model = create_model("resnet20", num_classes=3, in_chans=1)
    opt = build_optimizer(model, TrainConfig(lr=0.1, backbone_lr_mult=0.1))
    set_lr(opt, 0.1)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model.fc.weight)] == pytest.approx(0.1)
    assert lrs[id(model.conv1.weight)] == pytest.approx(0.01)
    plain = build_optimizer(model, TrainConfig(lr=0.1))
    assert len(plain.param_groups) == 1  # unchanged for ordinary training (and resumable old checkpoints)


def test_finetune_needs_a_start():
    from reslab.transfer.finetune import finetune_config

    with pytest.raises(ValueError, match="--weights FILE.pth"):
        finetune_config(None, "digits")
    with pytest.raises(ValueError, match="--weights needs --model"):
        finetune_config(None, "digits", weights="x.pth")


def test_finetune_from_torchvision_weights(glyph_sets, tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(num_classes=1000)
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    out = tmp_path / "tv"
    assert main(["finetune", "--weights", str(tmp_path / "resnet18.pth"), "--model", "resnet18", "--data",
                 str(glyph_sets[1]), "--freeze", "stem,layer1,layer2,layer3", "--epochs", "1", "--batch-size", "16",
                 "--out", str(out), "--no-progress"]) == 0
    tuned, card = load_model(out)
    assert tuned.fc.out_features == 3
    torch.testing.assert_close(tuned.layer2[0].conv1.weight, tv.layer2[0].conv1.weight)  # loaded, then frozen
