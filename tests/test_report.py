"""The HTML report is self-contained (no external references), shows scaling results, and opens in a headless
browser with every figure decoded."""
from __future__ import annotations

import base64
import json
import re
import shutil

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


@pytest.fixture(scope="module")
def scaling_dir(tmp_path_factory):
    from reslab.evaluate.scaling import scaling

    out = tmp_path_factory.mktemp("scaling")
    scaling("resnet20", "digits", fractions="0.2,0.4", epochs=1, out=out,
            overrides={"batch_size": 64, "model_kwargs": {"width": 0.25}, "amp": "off"})
    return out


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


def test_report_includes_scaling_results(analysed_run, scaling_dir, tmp_path, capsys):
    from reslab.cli import main
    from reslab.evaluate.report import build_report

    target = tmp_path / "report.html"
    assert main(["report", str(analysed_run), "--scaling", str(scaling_dir), "--out", str(target)]) == 0
    page = target.read_text()
    assert "<h2>Data scaling (resnet20 on digits)</h2>" in page
    result = json.loads((scaling_dir / "scaling.json").read_text())
    for p in result["points"]:  # one table row per fraction: fraction, images, test top-1
        assert f"<td>{p['fraction']:.4g}</td><td>{p['train_images']}</td><td>{100 * p['test_top1']:.2f}%</td>" in page
    assert base64.b64encode((scaling_dir / "scaling.png").read_bytes()).decode() in page
    # `reslab scaling --out RUN/analysis` is picked up without the flag
    run = tmp_path / "run"
    shutil.copytree(analysed_run, run)
    for name in ("scaling.json", "scaling.png"):
        shutil.copy(scaling_dir / name, run / "analysis" / name)
    page = build_report(run).read_text()
    assert page.count("<h2>Data scaling") == 1 and "<h2>Other figures" not in page
    # a folder without results is a clear error
    assert main(["report", str(analysed_run), "--scaling", str(tmp_path / "run"), "--out", str(target)]) == 2
    assert "no readable scaling.json" in capsys.readouterr().err


def test_report_opens_in_a_headless_browser(analysed_run, scaling_dir, tmp_path):
    """Real Chromium (driven by Playwright) renders the page and decodes every embedded figure."""
    from reslab.evaluate.report import build_report

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    report = build_report(analysed_run, out=tmp_path / "report.html", scaling=[scaling_dir])
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = b.new_page()
            page.goto(report.as_uri())
            title = page.title()
            headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
            # decode() resolves once the image is decoded and rejects for a broken one
            images = page.evaluate("""() => Promise.all(Array.from(document.images, img => img.decode().then(
                () => [img.alt, img.naturalWidth, img.naturalHeight], () => [img.alt, 0, 0])))""")
        finally:
            b.close()
    assert title.startswith("reslab report")
    assert {"Summary", "Training", "Calibration"} <= set(headings)
    assert any(h.startswith("Data scaling") for h in headings)
    assert len(images) >= 6  # curves, confusion, pairs, top losses, reliability, scaling
    assert not [alt for alt, width, height in images if not (width > 0 and height > 0)], images
