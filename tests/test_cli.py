"""The `reslab` command as a user runs it: train, eval, predict, models, recipes, and one-line errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from reslab.cli import main


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--epochs", "3", "--out", str(run), "--no-progress"])
    assert code == 0
    return run


def test_train_writes_run(digits_run, capsys):
    summary = json.loads((digits_run / "summary.json").read_text())
    assert summary["model"] == "resnet20" and summary["data"] == "digits"
    assert summary["final"]["test_top1"] > 0.5


def test_eval_writes_json(digits_run, capsys):
    assert main(["eval", str(digits_run)]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out
    result = json.loads((digits_run / "eval-test.json").read_text())
    assert result["count"] == 359 and 0.5 < result["top1"] <= 1
    assert set(result["per_class_accuracy"]) == {str(d) for d in range(10)}
    # The same weights give the same accuracy the training loop reported.
    summary = json.loads((digits_run / "summary.json").read_text())
    assert result["top1"] == pytest.approx(summary["final"]["test_top1"], abs=1e-6)


def test_predict_images(digits_run, tmp_path, capsys):
    from reslab.data import load_data

    test = load_data("digits").test
    files = []
    for i in range(4):
        path = tmp_path / f"digit{i}.png"
        # A user's image: larger than 8x8 and RGB; predict applies the stored preprocessing.
        Image.fromarray(test.images[i, :, :, 0]).resize((32, 32), Image.NEAREST).convert("RGB").save(path)
        files.append(str(path))
    assert main(["predict", str(digits_run), *files, "--topk", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 4 and all(len(r["top"]) == 3 for r in results)
    for r in results:
        probs = [t["probability"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    correct = sum(r["top"][0]["class"] == str(test.labels[i]) for i, r in enumerate(results))
    assert correct >= 2


def test_eval_and_predict_retain_memory_unless_told_not_to(digits_run, tmp_path, monkeypatch, capsys):
    """Inference batches fault in fresh pages like training steps; eval and predict keep freed memory too."""
    import importlib

    evaluate_module = importlib.import_module("reslab.evaluate.evaluate")  # the package re-exports a function
    calls = []
    monkeypatch.setattr(evaluate_module, "retain_freed_memory", lambda: calls.append(1) or True)
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    assert main(["eval", str(digits_run), "--out", str(tmp_path / "e.json")]) == 0
    assert main(["predict", str(digits_run), str(image)]) == 0
    assert calls == [1, 1]
    assert main(["eval", str(digits_run), "--out", str(tmp_path / "e.json"), "--no-retain-memory"]) == 0
    assert main(["predict", str(digits_run), str(image), "--no-retain-memory"]) == 0
    assert calls == [1, 1]


def test_models_table(capsys):
    assert main(["models", "resnet*"]) == 0
    out = capsys.readouterr().out
    assert "resnet20" in out and "269,722" in out and "25,557,032" in out
    assert main(["models", "plain5*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["plain56"]


def test_recipes_listed(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "he2016-cifar" in lines and "quick" in lines
    # Each recipe is listed with the first sentence of its description ("et al. 2016" does not end it).
    assert "Deep Residual Learning for Image Recognition" in lines["he2016-cifar"]
    assert lines["quick"].rstrip().endswith("in about a minute on a 2-core CPU.")


def test_one_recipe_shown_whole(capsys, tmp_path):
    assert main(["recipes", "fast-gpu"]) == 0
    out = capsys.readouterr().out
    assert "UNMEASURED on a GPU" in out and "  batch_size: 1024" in out
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("description: My own   schedule.\nepochs: 3\n")
    assert main(["recipes", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "My own schedule." in out and "  epochs: 3" in out
    assert main(["recipes", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--lr", "-0.1"], "--lr"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--model", "resnet21"], "unknown model"),
    (["train", "--recipe", "nope"], "unknown recipe"),
    (["eval", "/nonexistent/run"], "does not exist"),
])
def test_errors_are_one_line_with_exit_code_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err


def test_console_script_entry_point(tmp_path):
    """`python -m reslab` works the same as the installed `reslab` command."""
    out = subprocess.run([sys.executable, "-m", "reslab", "models", "resnet5*"], capture_output=True, text=True)
    assert out.returncode == 0 and "resnet56" in out.stdout


def test_eval_on_other_imagefolder_data(digits_run, tmp_path):
    """eval --data takes another dataset with the model's classes, decoded by the model's stored rules."""
    from reslab.data import load_data

    test = load_data("digits").test
    for i in range(40):
        d = tmp_path / "folder" / "test" / str(test.labels[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i, :, :, 0]).save(d / f"{i}.png")
        t = tmp_path / "folder" / "train" / str(test.labels[i])
        t.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(t / f"{i}.png")
    assert main(["eval", str(digits_run), "--data", str(tmp_path / "folder"), "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["count"] == 40 and result["top1"] > 0.5
