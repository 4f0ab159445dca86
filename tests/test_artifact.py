"""Exported and quantized model folders run by `reslab eval`, `predict` and `serve` (reslab.deploy.artifact):
the deployed file itself answers, with the figures `reslab export` / `reslab quantize` reported for it."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from reslab.cli import main
from reslab.deploy.artifact import artifact_card, load_artifact
from reslab.deploy.export import export_model
from reslab.deploy.quantize import quantize
from reslab.evaluate import evaluate, predict

from conftest import train_quick_digits

ONE_IMAGE = 1 / 359  # the digits test split: one image of 359


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifact")
    run = train_quick_digits(root / "run", val_fraction=0.1)  # a held-out split, for calibrate and --split val
    export_model(run, "onnx", root / "onnx")  # a fixed batch of 1 (no --dynamic-batch)
    export_model(run, "torchscript", root / "torchscript")
    reports = {rt: quantize(run, calibration_images=128, out=root / f"int8-{rt}", bench=False, runtime=rt)
               for rt in ("onnxruntime", "pytorch")}
    return {"run": run, "root": root, "reports": reports,
            **{name: root / name for name in ("onnx", "torchscript", "int8-onnxruntime", "int8-pytorch")}}


@pytest.fixture(scope="module")
def images(folders):
    from reslab.data import load_data

    test = load_data("digits").test
    files = []
    for i in range(5):
        path = folders["root"] / f"digit{i}.png"
        Image.fromarray(test.images[i, :, :, 0]).resize((32, 32), Image.NEAREST).save(path)
        files.append(str(path))
    return files


def test_a_run_directory_is_not_an_artifact_and_a_deployed_folder_is(folders):
    assert artifact_card(folders["run"]) is None and artifact_card(folders["root"]) is None
    assert artifact_card(folders["onnx"])["format"] == "onnx"
    assert artifact_card(folders["int8-pytorch"])["format"] == "torchscript-int8"
    # Each card names the checkpoint it was made from, as an absolute path.
    for name in ("onnx", "int8-onnxruntime"):
        source = artifact_card(folders[name])["source_checkpoint"]
        assert source.startswith("/") and source.endswith("checkpoints/best")


def test_eval_of_exported_files_gives_the_float_accuracy(folders, tmp_path):
    reference = evaluate(folders["run"], out=tmp_path / "run.json", amp="off")
    for name in ("onnx", "torchscript"):
        r = evaluate(folders[name], out=tmp_path / f"{name}.json")
        assert r["deployed"]["format"] == name and r["count"] == 359
        assert abs(r["top1"] - reference["top1"]) <= ONE_IMAGE + 1e-9
        assert r["loss"] == pytest.approx(reference["loss"], abs=1e-3)
    assert evaluate(folders["onnx"], out=tmp_path / "o.json")["deployed"]["runtime"] == "onnxruntime"
    # --split val is the source run's held-out split (its config is found through source_checkpoint)
    val = evaluate(folders["onnx"], split="val", out=tmp_path / "val.json")
    assert val["count"] == evaluate(folders["run"], split="val", out=tmp_path / "rv.json", amp="off")["count"] > 0


@pytest.mark.parametrize("runtime", ["onnxruntime", "pytorch"])
def test_eval_of_an_int8_folder_reproduces_the_quantize_report(folders, runtime):
    report = folders["reports"][runtime]
    r = evaluate(folders[f"int8-{runtime}"])
    assert r["written_to"] == str(folders[f"int8-{runtime}"] / "eval-test.json")
    assert r["deployed"]["format"] == ("onnx-int8" if runtime == "onnxruntime" else "torchscript-int8")
    assert abs(r["top1"] - report["accuracy"]["top1_int8"]) <= ONE_IMAGE + 1e-9


def test_predict_on_deployed_folders_matches_the_run(folders, images):
    expected = predict(folders["run"], images, topk=3, amp="off")
    for name in ("onnx", "torchscript", "int8-onnxruntime", "int8-pytorch"):
        got = predict(folders[name], images, topk=3)
        assert [r["file"] for r in got] == images
        tolerance = 1e-4 if name in ("onnx", "torchscript") else 0.1  # int8 moves probabilities a little
        for g, e in zip(got, expected):
            assert g["top"][0]["class"] == e["top"][0]["class"]
            assert g["top"][0]["probability"] == pytest.approx(e["top"][0]["probability"], abs=tolerance)


def test_predict_cli_on_a_quantized_folder(folders, images, capsys):
    assert main(["predict", str(folders["int8-pytorch"]), *images[:2], "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == images[:2] and all(len(r["top"]) == 5 for r in results)


def test_a_fixed_batch_onnx_file_runs_any_batch(folders):
    model, card = load_artifact(folders["onnx"])
    assert card["dynamic_batch"] is False and model.fixed_batch
    x = torch.randn(3, *card["input"]["shape"][1:])
    batched = model(x)
    assert batched.shape == (3, 10)
    assert torch.allclose(batched[1:2], model(x[1:2]), atol=1e-6)


def test_broken_deployed_folders_get_clear_errors(folders, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folders["onnx"], broken)
    (broken / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.onnx is missing: .*model\.json names it"):
        load_artifact(broken)
    card = json.loads((folders["onnx"] / "model.json").read_text())
    (broken / "model.json").write_text(json.dumps({**card, "format": "tflite"}))
    with pytest.raises(ValueError, match="format 'tflite' is not one this reslab runs"):
        load_artifact(broken)
    (broken / "model.json").write_text(json.dumps({**card, "file": "../onnx/model.onnx"}))
    with pytest.raises(ValueError, match="must be a file name in that folder"):
        load_artifact(broken)
    with pytest.raises(ValueError, match="not an exported or quantized model folder"):
        load_artifact(folders["run"])


def test_analyze_robustness_and_calibrate_take_an_int8_folder(folders, images, tmp_path):
    """The compressed model's own confusion matrix, corruption errors (against its float run as the baseline)
    and temperature; results go to the folder, the held-out split and config come from the source run."""
    from reslab.evaluate.analyze import analyze
    from reslab.evaluate.calibration import calibrate, stored_temperature
    from reslab.evaluate.robustness import robustness

    folder = tmp_path / "int8"
    shutil.copytree(folders["int8-pytorch"], folder)
    top1 = folders["reports"]["pytorch"]["accuracy"]["top1_int8"]
    analysis = analyze(folder, calibration=False)
    assert analysis["checkpoint"] == str(folder / "model.int8.pt")
    assert abs(analysis["accuracy"] - top1) <= ONE_IMAGE + 1e-9
    assert (folder / "analysis" / "confusion.png").is_file()

    r = robustness(folder, baseline=folders["run"], limit=100, corruptions=["gaussian_noise"], severities=[1, 5])
    assert r["written_to"] == str(folder / "analysis" / "robustness.json")
    assert r["baseline"]["run"] == str(folders["run"]) and r["relative_mce"] is not None
    assert 0 <= r["clean_error"] <= r["errors"]["gaussian_noise"][1] <= 1  # severity 5 hurts at least as much

    assert stored_temperature(folder) == 1.0
    cal = calibrate(folder)
    assert cal["fitted_on"]["source"] == "run_val_split"  # the source run's held-out split, found via its config
    assert (folder / "calibration.json").is_file()
    assert stored_temperature(folder) == pytest.approx(cal["temperature"]) != 1.0
    # predict applies the folder's own temperature: top-1 probability moves, the class does not
    (before,) = predict(folders["int8-pytorch"], images[:1])
    (after,) = predict(folder, images[:1])
    assert after["top"][0]["class"] == before["top"][0]["class"]
    assert after["top"][0]["probability"] != pytest.approx(before["top"][0]["probability"], abs=1e-4)
    # and the HTML report gathers the folder's own analyses
    from reslab.evaluate.report import build_report

    page = build_report(folder).read_text()
    assert "Robustness to common corruptions" in page and "Calibration" in page
    assert f"Accuracy {100 * analysis['accuracy']:.2f}%" in page  # the int8 file's, not the run's


def test_commands_that_need_float_weights_name_the_run_to_give(folders, images, capsys):
    assert main(["explain", str(folders["int8-pytorch"]), images[0]]) == 2
    err = capsys.readouterr().err
    assert "exported or quantized model file" in err and "source_checkpoint" in err


# ---------------------------------------------------------------------------------------------------------
# serve


def _png(folders) -> bytes:
    import io

    from reslab.data import load_data

    buffer = io.BytesIO()
    Image.fromarray(load_data("digits").test.images[3, :, :, 0]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_serve_answers_with_the_int8_file_and_explains_its_float_weights(folders, images):
    from fastapi.testclient import TestClient

    from reslab.deploy.serve import create_app

    folder = folders["int8-pytorch"]
    upload = {"files": {"file": ("d.png", _png(folders), "image/png")}}
    with TestClient(create_app(folder)) as client:
        card = client.get("/model").json()
        assert card["format"] == "torchscript-int8" and card["quantization"]["runtime"] == "pytorch"
        assert card["device"] == "cpu" and card["amp"] == "off"
        assert card["saliency_of"].startswith("the float weights of ") and card["saliency_layer"] == "layer3"
        served = client.post("/predict?topk=3", **upload).json()
        saliency = client.post("/saliency", **upload).json()
    # The same int8 file, run by `reslab predict`, gives the same answer.
    path = folders["root"] / "served.png"
    path.write_bytes(_png(folders))
    (expected,) = predict(folder, [path], topk=3)
    assert [t["class"] for t in served["top"]] == [t["class"] for t in expected["top"]]
    assert served["top"][0]["probability"] == pytest.approx(expected["top"][0]["probability"], abs=1e-5)
    assert saliency["explains"] == card["saliency_of"] and saliency["overlay_png"]


def test_serve_refuses_saliency_without_float_weights_but_still_predicts(folders, tmp_path):
    from fastapi.testclient import TestClient

    from reslab.deploy.serve import create_app

    alone = tmp_path / "alone"
    shutil.copytree(folders["int8-onnxruntime"], alone)
    card = json.loads((alone / "model.json").read_text())
    card.pop("source_checkpoint")
    (alone / "model.json").write_text(json.dumps(card))
    upload = {"files": {"file": ("d.png", _png(folders), "image/png")}}
    with TestClient(create_app(alone)) as client:
        assert client.get("/model").json()["saliency_of"] is None
        assert client.post("/predict", **upload).status_code == 200
        refused = client.post("/saliency", **upload)
    assert refused.status_code == 409
    assert "Grad-CAM needs float weights" in refused.json()["detail"]


def test_export_cli_prints_commands_that_run_what_it_wrote(folders, tmp_path, capsys):
    out = tmp_path / "ts"
    assert main(["export", str(folders["run"]), "--format", "torchscript", "--out", str(out)]) == 0
    hint = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run it: ")]
    eval_command = hint[0][len("run it: "):].split(" | ")[0].split()
    assert eval_command == ["reslab", "eval", str(out)]
    assert main(eval_command[1:]) == 0 and (out / "eval-test.json").is_file()


def test_the_run_report_lists_its_deployed_copies(folders, tmp_path):
    from reslab.evaluate.report import build_report

    run = tmp_path / "run"
    shutil.copytree(folders["run"], run)
    shutil.copytree(folders["int8-pytorch"], run / "quantized")
    assert "<h2>Deployment" not in build_report(folders["run"], out=tmp_path / "before.html").read_text()
    top1 = evaluate(run / "quantized")["top1"]
    page = build_report(run).read_text()
    section = page[page.index("<h2>Deployment"):]
    accuracy = folders["reports"]["pytorch"]["accuracy"]
    assert "torchscript-int8" in section and "model.int8.pt" in section
    assert f"int8 {100 * accuracy['top1_int8']:.2f}% vs fp32 {100 * accuracy['top1_fp32']:.2f}%" in section
    assert f"{100 * top1:.2f}%" in section
