"""The HTML report is self-contained (no external references) and opens in a headless browser."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest


@pytest.fixture(scope="module")
def analysed_run(tmp_path_factory):
    from reslab.evaluate.analyze import analyze
    from reslab.train import train
    from reslab.train.config import TrainConfig

    run = tmp_path_factory.mktemp("report") / "run"
    train(TrainConfig(model="resnet20", data="digits", epochs=1, batch_size=64, lr=0.05,
                      model_kwargs={"width": 0.25}, progress=False, out=str(run), amp="off"))
    r = analyze(run, top_losses=6, device="cpu")  # no val split in the run: the temperature is fitted on a carve-out
    assert r["calibration"]["fitted_on"]["source"] == "carved_from_train"
    return run


def test_report_is_self_contained(analysed_run):
    from reslab.cli import main

    assert main(["report", str(analysed_run)]) == 0
    page = (analysed_run / "report.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page, flags=re.I)
    assert refs, "the report should embed its figures"
    external = [r for r in refs if not r.startswith(("data:", "#"))]
    assert not external, f"external references: {external[:5]}"
    assert not re.search(r"url\((?!['\"]?data:)", page), "CSS must not fetch anything"
    assert "<script" not in page.lower()
    for section in ("Summary", "Training", "Errors", "Calibration"):
        assert f"<h2>{section}" in page
    assert page.count("data:image/png;base64,") >= 5  # curves, confusion, pairs, top losses, reliability


def test_report_opens_in_a_headless_browser(analysed_run, tmp_path):
    from reslab.evaluate.report import build_report

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    page = build_report(analysed_run, out=tmp_path / "report.html")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "reslab report" in dom.stdout and "<h2>Calibration" in dom.stdout
    assert dom.stdout.count("<img") >= 5
