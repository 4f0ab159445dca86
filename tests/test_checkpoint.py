"""Checkpoints: atomic writes with checksums, detection of truncated/corrupt files with a fallback to the
previous good checkpoint, and loading that never executes pickled code (safetensors, weights_only=True)."""
from __future__ import annotations

import io
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from reslab.models import create_model
from reslab.train import checkpoint as ckpt_mod
from reslab.train.checkpoint import (CheckpointError, find_checkpoint, has_checkpoint, load_checkpoint, load_model,
                                     load_torchvision_weights, save_checkpoint)


def _card(model="resnet20", num_classes=10, in_chans=1):
    return {"model": model, "model_kwargs": {}, "num_classes": num_classes, "in_chans": in_chans,
            "classes": [str(i) for i in range(num_classes)],
            "preprocessing": {"channels": in_chans, "stored_size": [8, 8], "input_size": [8, 8],
                              "mean": [0.5] * in_chans, "std": [0.25] * in_chans}}


def _save(path, step, model=None, **extra):
    model = model or create_model("resnet20", num_classes=10, in_chans=1)
    return save_checkpoint(path, model_state=model.state_dict(), manifest={**_card(), "step": step},
                           train_state={"step": step, "rng_cpu": torch.get_rng_state()}, **extra)


class Evil:
    """Unpickling this would create a file: proof that code ran."""

    marker = None

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _evil_bytes(marker: Path) -> bytes:
    Evil.marker = str(marker)
    buf = io.BytesIO()
    torch.save({"step": 1, "payload": Evil()}, buf)
    return buf.getvalue()


def test_round_trip_and_checksums(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    path = _save(tmp_path / "ckpt" / "last", 7, model=model, ema_state=model.state_dict())
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "ema.safetensors", "state.pt"}
    assert all(len(d) == 64 for d in manifest["files"].values())  # SHA-256
    c = load_checkpoint(path)
    assert c.manifest["step"] == 7 and c.train_state["step"] == 7
    assert all(torch.equal(c.model_state[k], v) for k, v in model.state_dict().items())
    assert c.ema_state is not None
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["last"]  # no temporary folder left


def test_previous_checkpoint_is_kept_and_the_swap_leaves_no_gap(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path / "last", step)
    assert load_checkpoint(tmp_path / "last").manifest["step"] == 3
    assert load_checkpoint(tmp_path / "last.prev").manifest["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "last.prev"]
    # The instant between two renames (where atomic exchange is unavailable): only .prev exists.
    (tmp_path / "last").rename(tmp_path / "elsewhere")
    assert has_checkpoint(tmp_path / "last")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing current folder is expected there: no warning
        assert load_checkpoint(tmp_path / "last").manifest["step"] == 2
    assert not has_checkpoint(tmp_path / "nothing")


def test_crash_while_saving_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path / "last", 1)
    real = ckpt_mod._write_file

    def dies_on_state(folder, name, data):
        if name == "state.pt":
            raise OSError(28, "No space left on device")
        return real(folder, name, data)

    monkeypatch.setattr(ckpt_mod, "_write_file", dies_on_state)
    with pytest.raises(OSError, match="No space"):
        _save(tmp_path / "last", 2)
    assert load_checkpoint(tmp_path / "last").manifest["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_stale_temporary_folders_are_removed(tmp_path):
    (tmp_path / ".last.tmp-killed").mkdir()
    (tmp_path / ".last.tmp-killed" / "model.safetensors").write_bytes(b"half")
    _save(tmp_path / "last", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_checkpoint_falls_back_to_previous(tmp_path, damage):
    _save(tmp_path / "last", 1)
    _save(tmp_path / "last", 2)
    weights = tmp_path / "last" / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        weights.unlink()
    else:
        (tmp_path / "last" / "manifest.json").write_text('{"format_version": 1, "files": {')
    with pytest.warns(UserWarning, match="falling back to the previous checkpoint"):
        c = load_checkpoint(tmp_path / "last")
    assert c.manifest["step"] == 1
    with pytest.raises(CheckpointError, match="corrupt|missing|truncated"):
        load_checkpoint(tmp_path / "last", fallback=False)


def test_no_good_checkpoint_is_a_clear_error(tmp_path):
    _save(tmp_path / "last", 1)
    _save(tmp_path / "last", 2)
    for name in ("last", "last.prev"):
        f = tmp_path / name / "state.pt"
        f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"state.pt is corrupt or truncated.*previous checkpoint is unusable"):
        load_checkpoint(tmp_path / "last")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


def test_pickled_code_in_state_is_never_executed(tmp_path):
    path = _save(tmp_path / "last", 1)
    marker = tmp_path / "pwned"
    data = _evil_bytes(marker)
    (path / "state.pt").write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["state.pt"] = ckpt_mod._sha256(data)  # a forger can fix the checksum too
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(path, fallback=False)
    assert not marker.exists()
    # Loading only the weights (load_model, predict, export) never touches state.pt.
    model, card = load_model(path)
    assert card["num_classes"] == 10 and not model.training


def test_manifest_naming_other_files_is_refused(tmp_path):
    path = _save(tmp_path / "last", 1)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unexpected file"):
        load_checkpoint(path, fallback=False)


def test_load_model_rejects_other_architecture_and_class_count(tmp_path):
    path = _save(tmp_path / "ckpt" / "last", 1)
    manifest_path = path / "manifest.json"
    original = manifest_path.read_text()
    for change, fragment in (({"num_classes": 7}, "do not fit resnet20 with 7 classes"),
                             ({"model": "resnet32"}, "do not fit resnet32"),
                             ({"model": "no-such-net"}, "does not describe a model")):
        manifest_path.write_text(json.dumps({**json.loads(original), **change}))
        with pytest.raises(CheckpointError, match=fragment):
            load_model(path)


def test_non_checkpoints_are_named(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="is a file, not a reslab run"):
        find_checkpoint(text)
    fake = tmp_path / "fake" / "model.safetensors"
    fake.parent.mkdir()
    fake.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_model(fake)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model(tmp_path / "empty_run")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "listy" ).mkdir()
    (tmp_path / "listy" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a reslab checkpoint manifest"):
        load_checkpoint(tmp_path / "listy")


# ------------------------------------------------------------------------------------------------------------
# torchvision weights


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_torchvision_resnet18_weights_load_for_fine_tuning(torchvision_weights):
    path, state = torchvision_weights
    model = create_model("resnet18", num_classes=10)
    report = load_torchvision_weights(path, model)
    assert report["skipped"] == ["fc.bias", "fc.weight"]  # new head for 10 classes
    own = model.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in report["loaded"])
    assert len(report["loaded"]) == len(state) - 2
    same = create_model("resnet18", num_classes=1000)
    assert load_torchvision_weights(path, same)["skipped"] == []
    assert torch.equal(same.fc.weight, state["fc.weight"])


def test_torchvision_wrapped_and_prefixed_state_dicts(torchvision_weights, tmp_path):
    _, state = torchvision_weights
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    model = create_model("resnet18", num_classes=1000)
    load_torchvision_weights(wrapped, model)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_torchvision_weights_of_another_architecture_are_refused(torchvision_weights):
    path, _ = torchvision_weights
    with pytest.raises(CheckpointError, match=r"do not fit ResNet \(missing: layer1.0.bn3.bias"):
        load_torchvision_weights(path, create_model("resnet50", num_classes=10))
    with pytest.raises(CheckpointError, match="wrong shape: conv1.weight"):
        load_torchvision_weights(path, create_model("resnet18", num_classes=10, in_chans=1))


def test_torchvision_file_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(_evil_bytes(marker))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_torchvision_weights(path, create_model("resnet18", num_classes=10))
    assert not marker.exists()
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip nor a pickle")
    with pytest.raises(CheckpointError, match="cannot|not a PyTorch weights file"):
        load_torchvision_weights(junk, create_model("resnet18", num_classes=10))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_torchvision_weights(tmp_path / "missing.pth", create_model("resnet18", num_classes=10))
    tensors_only = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], tensors_only)
    with pytest.raises(CheckpointError, match="does not hold a state_dict"):
        load_torchvision_weights(tensors_only, create_model("resnet18", num_classes=10))


def test_pickle_module_is_not_needed_for_weights():
    # Guard against regressions: the loaders go through torch.load(weights_only=True) or safetensors only.
    import inspect

    src = inspect.getsource(ckpt_mod)
    assert "pickle.load" not in src and "weights_only=False" not in src
    assert pickle  # imported for the exception type only
