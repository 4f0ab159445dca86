"""Model soups (Wortsman et al. 2022): the arithmetic, the compatibility checks, and the command end to end."""
import json

import pytest
import torch
from safetensors.torch import load_file

from reslab.cli import main
from reslab.models import create_model
from reslab.train import TrainConfig, train
from reslab.train.checkpoint import load_model
from reslab.transfer.soup import SoupError, average_states, check_compatible

FAST = dict(model="resnet20", data="digits", image_size=16, batch_size=64, progress=False, flip=False,
            crop_padding=2, amp="off", schedule="cosine", val_fraction=0.2, epochs=1)


def _state(seed, **kw):
    torch.manual_seed(seed)
    return create_model("resnet20", num_classes=10, in_chans=1, **kw).state_dict()


def test_uniform_soup_of_identical_models_is_the_model():
    s = _state(0)
    soup = average_states([s, s, s])
    for k in s:
        assert torch.equal(soup[k], s[k]), k


def test_soup_of_two_models_is_their_parameter_mean():
    a, b = _state(0), _state(1)
    a["bn1.running_mean"] += 1.0  # BN statistics are averaged too
    a["bn1.num_batches_tracked"] += 7  # integer buffers come from the first ingredient
    soup = average_states([a, b])
    for k in a:
        if a[k].dtype.is_floating_point:
            torch.testing.assert_close(soup[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-7)
        else:
            assert torch.equal(soup[k], a[k])
    assert soup["fc.weight"].dtype == torch.float32


def _ingredient(run, *, model="resnet20", classes=tuple("0123456789"), state=None, init_from="src", **config):
    return {"run": run, "manifest": {"model": model, "model_kwargs": {}, "in_chans": 1, "classes": list(classes)},
            "state": state if state is not None else _state(0), "config": {"init_from": init_from, **config}}


def test_incompatible_runs_fail_clearly():
    base = _ingredient("a")
    with pytest.raises(SoupError, match="different architecture .*resnet20 vs resnet32"):
        check_compatible([base, _ingredient("b", model="resnet32")])
    with pytest.raises(SoupError, match="different class list"):
        check_compatible([base, _ingredient("b", classes="abcdefghij")])
    with pytest.raises(SoupError, match="different shapes"):
        check_compatible([base, _ingredient("b", state=create_model("resnet20", num_classes=10, in_chans=1,
                                                                     width=2).state_dict())])
    warnings = check_compatible([base, _ingredient("b", init_from="elsewhere", seed=3)])
    assert any("different weights" in w for w in warnings) and any("held-out" in w for w in warnings)
    assert check_compatible([base, _ingredient("b")]) == []


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    for name, lr in (("a", 0.1), ("b", 0.05)):
        train(TrainConfig(**FAST, lr=lr, out=str(root / name)))
    return root / "a", root / "b"


def test_soup_command_end_to_end(two_runs, tmp_path, capsys):
    a, b = two_runs
    out = tmp_path / "greedy"
    assert main(["soup", str(a), str(b), "--greedy", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "uniform soup (2)" in text and "greedy soup" in text and "best ingredient" in text
    r = json.loads((out / "soup.json").read_text())
    best = max(r["ingredients"], key=lambda i: i["val_top1"])
    assert r["greedy"]["runs"][0] == best["run"]  # greedy starts from the best held-out ingredient
    assert r["greedy"]["val_top1"] >= best["val_top1"]  # and never lets held-out accuracy drop
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.json"):
        assert (out / name).is_file(), name
    assert main(["eval", str(out)]) == 0  # an ordinary run for eval/predict/export

    # The uniform soup of a run with itself is that run: same weights, same accuracy.
    assert main(["soup", str(a), str(a), "--out", str(tmp_path / "self")]) == 0
    r = json.loads((tmp_path / "self" / "soup.json").read_text())
    assert r["uniform"]["test_top1"] == r["ingredients"][0]["test_top1"]
    own = load_file(str(a / "checkpoints" / "best" / "model.safetensors"))
    soup = load_file(str(tmp_path / "self" / "checkpoints" / "best" / "model.safetensors"))
    assert all(torch.equal(own[k], soup[k]) for k in own)
    model, card = load_model(tmp_path / "self")
    assert card["soup"]["kind"] == "uniform"


def test_greedy_soup_rejects_a_ruined_ingredient(two_runs, tmp_path):
    """Recipe 1 leaves out an ingredient that lowers held-out accuracy: here a copy of run a whose weights (not
    its BN statistics) were drowned in noise, 3x each tensor's spread; the uniform soup, which takes it, is worse."""
    import shutil

    from reslab.train.checkpoint import load_checkpoint, save_checkpoint
    from reslab.transfer.soup import soup

    ruined = tmp_path / "ruined"
    shutil.copytree(two_runs[0], ruined)
    gen = torch.Generator().manual_seed(0)
    for name in ("best", "last"):
        folder = ruined / "checkpoints" / name
        ckpt = load_checkpoint(folder, load_train_state=False)
        state = {k: v + 3 * v.std() * torch.randn(v.shape, generator=gen)
                 if v.dtype.is_floating_point and v.numel() > 1 and "running" not in k else v
                 for k, v in ckpt.model_state.items()}
        manifest = {k: v for k, v in ckpt.manifest.items() if k not in ("files", "format_version")}
        shutil.rmtree(folder)
        save_checkpoint(folder, model_state=state, manifest=manifest)
    r = soup([*two_runs, ruined], greedy=True, out=tmp_path / "soup")
    accuracy = {i["run"]: i["val_top1"] for i in r["ingredients"]}
    assert accuracy[str(ruined)] < 0.15  # near chance (10 %): really ruined
    assert accuracy[str(ruined)] < min(accuracy[str(run)] for run in two_runs)
    assert str(ruined) not in r["greedy"]["runs"]
    assert r["greedy"]["val_top1"] >= r["best_ingredient"]["val_top1"] > r["uniform"]["val_top1"]
    assert json.loads((tmp_path / "soup" / "soup.json").read_text())["greedy"]["runs"] == r["greedy"]["runs"]


def test_soup_needs_held_out_data_and_two_runs(two_runs, tmp_path, capsys):
    import shutil

    import yaml

    plain = tmp_path / "noval"  # a copy of a run whose config says it held nothing out
    shutil.copytree(two_runs[0], plain)
    cfg = yaml.safe_load((plain / "config.yaml").read_text())
    (plain / "config.yaml").write_text(yaml.safe_dump({**cfg, "val_fraction": 0.0}))
    assert main(["soup", str(plain), str(plain)]) == 2
    assert "no validation split" in capsys.readouterr().err
    assert main(["soup", str(two_runs[0])]) == 2
