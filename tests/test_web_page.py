"""The serve web page in a real headless browser (Debian's chromium driven by Playwright).

Needs `pip install playwright` and `apt-get install chromium` (never `playwright install`: no downloads);
skipped with the reason when either is missing.
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

CHROMIUM = os.environ.get("RESLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from reslab.train import TrainConfig, train

    out = tmp_path_factory.mktemp("web") / "run"
    train(TrainConfig(model="resnet20", data="digits", epochs=1, batch_size=64, lr=0.05,
                      model_kwargs={"width": 0.25}, progress=False, out=str(out), amp="off"))
    return out


def _serve_in_thread(app):
    """A real uvicorn server for ``app`` on a free port, in a thread of this process; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the serve test server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def server(run):
    from reslab.deploy.serve import create_app

    yield from _serve_in_thread(create_app(run, amp="off", device="cpu"))


@pytest.fixture(scope="module")
def int8_server(run, tmp_path_factory):
    """The run quantized (PyTorch int8) and served from its folder alone, without the float weights."""
    import json

    from reslab.deploy.quantize import quantize
    from reslab.deploy.serve import create_app

    folder = tmp_path_factory.mktemp("web-int8") / "q"
    quantize(run, calibration_images=64, out=folder, bench=False, runtime="pytorch")
    card = json.loads((folder / "model.json").read_text())
    card.pop("source_checkpoint")
    (folder / "model.json").write_text(json.dumps(card))
    yield from _serve_in_thread(create_app(folder))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    page = context.new_page()
    outside = []
    # Everything the page loads must come from the server itself (no CDN, no fonts from elsewhere).
    page.on("request", lambda req: None if req.url.startswith((server, "data:", "blob:")) else outside.append(req.url))
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server + "/")
    yield page
    assert not outside, f"the page requested outside resources: {outside}"
    assert not errors, f"JavaScript errors: {errors}"
    context.close()


def digit_png(index: int = 0, scale: int = 8) -> bytes:
    from PIL import Image

    from reslab.data import load_data

    image = load_data("digits").test.images[index][..., 0]
    buf = io.BytesIO()
    Image.fromarray(np.kron(image, np.ones((scale, scale), np.uint8))).save(buf, format="PNG")
    return buf.getvalue()


def api_top(server: str, data: bytes) -> list[dict]:
    r = httpx.post(server + "/predict?topk=5", files={"file": ("d.png", data, "image/png")}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["top"]


def test_model_card_is_shown(page):
    page.wait_for_selector("#card dd")
    card = page.inner_text("#card")
    assert "resnet20" in card and "test_top1" in card and "0, 1, 2" in card
    assert "resnet20" in page.inner_text("#subtitle")


def test_pick_file_shows_top5_bars_and_saliency(page, server, tmp_path):
    data = digit_png(0)
    path = tmp_path / "digit.png"
    path.write_bytes(data)
    expected = api_top(server, data)

    page.set_input_files("#file", str(path))
    page.wait_for_selector("#bars .bar-row", timeout=30_000)
    rows = page.locator("#bars .bar-row")
    assert rows.count() == 5
    assert rows.nth(0).locator(".label").inner_text() == expected[0]["class"]
    assert [rows.nth(i).get_attribute("data-class") for i in range(5)] == [t["class"] for t in expected]
    assert rows.nth(0).locator(".pct").inner_text() == f"{100 * expected[0]['probability']:.1f}%"
    # The saliency overlay is a decoded image, not a broken one.
    page.wait_for_function("() => { const i = document.getElementById('saliency');"
                           " return !i.hidden && i.complete && i.naturalWidth > 0; }", timeout=30_000)
    assert page.eval_on_selector("#saliency", "i => i.naturalWidth") == 256
    assert page.eval_on_selector("#saliency", "i => i.src.startsWith('data:image/png;base64,')")
    assert "Grad-CAM" in page.inner_text("#saliency-caption")
    assert page.is_hidden("#error")


def test_drop_an_image(page, server):
    data = digit_png(5)
    expected = api_top(server, data)
    page.evaluate("""(bytes) => {
        const file = new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'});
        const dt = new DataTransfer();
        dt.items.add(file);
        document.getElementById('dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true,
                                                                                 cancelable: true}));
    }""", list(data))
    page.wait_for_selector("#bars .bar-row", timeout=30_000)
    assert page.locator("#bars .bar-row .label").first.inner_text() == expected[0]["class"]
    page.wait_for_function("() => document.getElementById('saliency').naturalWidth > 0", timeout=30_000)


def test_a_non_image_shows_the_servers_message(page, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    message = page.inner_text("#error")
    assert message.startswith("415") and "not an accepted image type" in message
    assert page.locator("#bars .bar-row").count() == 0


def test_an_int8_folder_without_float_weights_shows_bars_and_says_why_no_saliency(browser, int8_server, tmp_path):
    data = digit_png(2)
    path = tmp_path / "digit.png"
    path.write_bytes(data)
    expected = api_top(int8_server, data)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(int8_server + "/")
    page.wait_for_selector("#card dd")
    assert "torchscript-int8" in page.inner_text("#card")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#bars .bar-row", timeout=30_000)
    assert page.locator("#bars .bar-row .label").first.inner_text() == expected[0]["class"]
    assert page.inner_text("#saliency-caption").startswith("no saliency")
    assert page.is_hidden("#saliency") and page.is_hidden("#error") and not errors
    page.close()
