"""reslab serve: every endpoint, every refused input (4xx with a clear message), micro-batching, Grad-CAM."""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import struct
import warnings
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

with warnings.catch_warnings():  # starlette's TestClient warns that it wants the `httpx2` package one day
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from reslab.deploy.serve import (  # noqa: E402
    MicroBatcher,
    create_app,
    decode_upload,
    saliency_pngs,
    sniff_format,
)


# ---------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from reslab.train import TrainConfig, train

    out = tmp_path_factory.mktemp("serve") / "run"
    train(TrainConfig(model="resnet20", data="digits", epochs=1, batch_size=64, lr=0.05,
                      model_kwargs={"width": 0.25}, progress=False, out=str(out), amp="off"))
    return out


@pytest.fixture(scope="module")
def digits():
    from reslab.data import load_data

    return load_data("digits").test


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    im = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    if fmt in ("JPEG", "WEBP"):
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def png(digits):
    return encode(digits.images[0])


@pytest.fixture(scope="module")
def client(run):
    with TestClient(create_app(run, amp="off", device="cpu")) as c:
        yield c


def upload(data: bytes, name: str = "digit.png", mime: str = "image/png") -> dict:
    return {"files": {"file": (name, data, mime)}}


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width`` x ``height``, with almost no pixel data (a bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------------------
# endpoints


def test_predict_matches_reslab_predict(client, run, digits, tmp_path):
    from reslab.evaluate import predict

    files = []
    for i in range(4):
        f = tmp_path / f"d{i}.png"
        f.write_bytes(encode(digits.images[i]))
        files.append(f)
    expected = predict(run, files, topk=3, device="cpu", amp="off")
    for f, want in zip(files, expected):
        r = client.post("/predict?topk=3", **upload(f.read_bytes()))
        assert r.status_code == 200, r.text
        got = r.json()["top"]
        assert [t["class"] for t in got] == [t["class"] for t in want["top"]]
        np.testing.assert_allclose([t["probability"] for t in got], [t["probability"] for t in want["top"]],
                                   atol=1e-5)


def test_stored_temperature_is_applied_like_reslab_predict(run, png, tmp_path):
    """A calibrated run (RUN/calibration.json, T = 2) is served with softmax(logits / T), as `reslab predict` does."""
    import shutil

    from reslab.evaluate import predict
    from reslab.evaluate.calibration import CALIBRATION_FILE
    from reslab.train.rundir import write_json

    calibrated = tmp_path / "run"
    shutil.copytree(run, calibrated)
    write_json(calibrated / CALIBRATION_FILE, {"temperature": 2.0, "fitted_on": {"source": "test"},
                                               "usage": "divide the logits by temperature before the softmax"})
    (tmp_path / "d.png").write_bytes(png)
    want = predict(calibrated, [tmp_path / "d.png"], topk=10, device="cpu", amp="off")[0]["top"]
    plain = predict(run, [tmp_path / "d.png"], topk=10, device="cpu", amp="off")[0]["top"]
    assert want[0]["probability"] < plain[0]["probability"]  # the temperature did change the answer
    with TestClient(create_app(calibrated, amp="off", device="cpu")) as c:
        assert c.get("/model").json()["temperature"] == 2.0
        got = c.post("/predict?topk=10", **upload(png)).json()["top"]
        cam = c.post("/saliency", **upload(png)).json()
    assert [t["class"] for t in got] == [t["class"] for t in want]
    np.testing.assert_allclose([t["probability"] for t in got], [t["probability"] for t in want], atol=1e-5)
    assert cam["target"]["probability"] == pytest.approx(want[0]["probability"], abs=1e-5)


def test_predict_topk_default_clip_and_raw_body(client, png):
    r = client.post("/predict", **upload(png))
    assert r.status_code == 200 and len(r.json()["top"]) == 5
    probs = [t["probability"] for t in r.json()["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    everything = client.post("/predict?topk=1000", **upload(png)).json()["top"]
    assert len(everything) == 10 and sum(t["probability"] for t in everything) == pytest.approx(1, abs=1e-5)
    raw = client.post("/predict", content=png, headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["top"] == r.json()["top"]
    # The field name "image" is accepted too.
    assert client.post("/predict", files={"image": ("x.png", png, "image/png")}).status_code == 200


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"])
def test_accepted_formats_by_content(client, digits, fmt):
    data = encode(np.repeat(digits.images[1], 3, axis=-1), fmt)
    assert sniff_format(data) == fmt
    # The file name and declared type lie: the content decides.
    r = client.post("/predict", **upload(data, name="picture.txt", mime="text/plain"))
    assert r.status_code == 200, r.text


def test_model_card(client, run):
    card = client.get("/model").json()
    assert card["name"] == "resnet20" and card["classes"] == [str(i) for i in range(10)]
    assert card["preprocessing"]["stored_size"] == [8, 8] and card["preprocessing"]["channels"] == 1
    assert "test_top1" in card["metrics"] and card["paper"].startswith("He et al.")
    assert card["checkpoint"]["name"] == "best" and card["saliency_layer"] == "layer3"
    assert card["limits"]["max_upload_bytes"] == 10 * 1024 * 1024 and "WEBP" in card["limits"]["accepted_formats"]


def test_health_counts(client, png):
    before = client.get("/health").json()
    client.post("/predict", **upload(png))
    after = client.get("/health").json()
    assert after["status"] == "ok" and after["model"] == "resnet20"
    assert after["batching"]["images"] == before["batching"]["images"] + 1
    assert after["batching"]["forward_passes"] == before["batching"]["forward_passes"] + 1
    assert after["requests"]["predict"] == before["requests"].get("predict", 0) + 1
    assert after["predict_latency_ms"]["window"] >= 1 and after["predict_latency_ms"]["p99"] > 0


def test_web_page_and_static_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="/static/app.js"' in page.text and "http" not in page.text.replace("http-equiv", "")
    for name in ("app.js", "style.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and "https://" not in r.text  # nothing from a CDN


def test_saliency(client, png):
    r = client.post("/saliency", **upload(png))
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["method"] == "gradcam" and j["layer"] == "layer3"
    top1 = client.post("/predict", **upload(png)).json()["top"][0]
    assert j["target"]["class"] == top1["class"]
    assert j["target"]["probability"] == pytest.approx(top1["probability"], abs=1e-5)
    overlay = Image.open(io.BytesIO(base64.b64decode(j["overlay_png"])))
    heat = Image.open(io.BytesIO(base64.b64decode(j["heatmap_png"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size == (256, 256)
    assert heat.mode == "RGBA" and heat.size == (256, 256)
    # An explicit target by name and by index.
    by_name = client.post("/saliency?target=7", **upload(png)).json()
    assert by_name["target"]["class"] == "7" and by_name["target"]["index"] == 7


def test_grad_cam_is_normalised_and_localised(client, digits):
    runner = client.app.state.runner
    cam, target, probs = runner.grad_cam(digits.images[0])
    assert cam.shape == tuple(runner.card["preprocessing"]["input_size"]) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    assert target == int(probs.argmax()) and probs.sum().item() == pytest.approx(1, abs=1e-5)
    overlay, heat = saliency_pngs(digits.images[0], cam, side=64)
    assert Image.open(io.BytesIO(overlay)).size == (64, 64)
    # The hook is removed afterwards: plain inference does not keep capturing activations.
    stage = runner.model.get_submodule(runner.cam_layer)
    assert not stage._forward_hooks


# ---------------------------------------------------------------------------------------------------------
# refused inputs: a 4xx JSON with a message, never a 500


def _truncated(png: bytes) -> bytes:
    return png[: len(png) // 2]


BAD_INPUTS = [
    # (description, request kwargs, status, substring of the message)
    ("empty body", dict(content=b""), 400, "empty request body"),
    ("empty multipart", dict(content=b"", headers={"content-type": "multipart/form-data; boundary=x"}), 400,
     "multipart body is empty"),
    ("wrong field name", dict(files={"upload": ("x.png", b"PNGDATA", "image/png")}), 422,
     "received fields: ['upload']"),
    ("text field instead of a file", dict(files={"other": ("a", b"b")}, data={"file": "not a file"}), 422,
     "holds text, not a file"),
    ("empty file", dict(files={"file": ("x.png", b"", "image/png")}), 400, "uploaded file is empty"),
    ("not an image", dict(files={"file": ("x.png", b"hello, world" * 10, "image/png")}), 415,
     "not an accepted image type"),
    ("svg is not accepted", dict(files={"file": ("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                                 "image/svg+xml")}), 415, "not an accepted image type"),
    ("json body", dict(content=b"{}", headers={"content-type": "application/json"}), 415,
     "Content-Type 'application/json' is not accepted"),
    ("malformed multipart", dict(content=b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n",
                                 headers={"content-type": "multipart/form-data"}), 400, "multipart"),
    ("bomb header", dict(files={"file": ("bomb.png", png_header(100_000, 100_000), "image/png")}), 413,
     "too many pixels"),
    ("over the pixel limit", dict(files={"file": ("big.png", png_header(8000, 6000), "image/png")}), 413,
     "48,000,000 pixels"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("endpoint", ["/predict", "/saliency"])
def test_bad_inputs_get_clear_4xx(client, case, endpoint):
    _, kwargs, status, message = case
    r = client.post(endpoint, **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_truncated_and_corrupt_images(client, digits):
    big = encode(np.repeat(np.kron(digits.images[2][..., 0], np.ones((16, 16), np.uint8))[..., None], 3, -1), "JPEG")
    for data, fmt in ((_truncated(encode(digits.images[2])), "PNG"), (big[:200], "JPEG"),
                      (b"GIF89a" + b"\x00" * 40, "GIF")):
        r = client.post("/predict", **upload(data))
        assert r.status_code == 400, r.text
        assert f"the {fmt} image cannot be" in r.json()["detail"]


@pytest.mark.parametrize("query,message", [("topk=0", "at least 1"), ("topk=-3", "at least 1"),
                                           ("topk=abc", "positive integer"), ("topk=1.5", "positive integer")])
def test_bad_topk(client, png, query, message):
    r = client.post(f"/predict?{query}", **upload(png))
    assert r.status_code == 422 and message in r.json()["detail"]


def test_bad_saliency_target(client, png):
    for target in ("10", "-1", "cat"):
        r = client.post(f"/saliency?target={target}", **upload(png))
        assert r.status_code == 422 and "neither a class name" in r.json()["detail"]


def test_upload_and_pixel_limits(run, digits):
    png = encode(digits.images[0])
    with TestClient(create_app(run, amp="off", device="cpu", max_upload_bytes=2000, max_pixels=50)) as c:
        too_big = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100_000
        # Content-Length over the limit: refused before the body is read.
        r = c.post("/predict", content=too_big, headers={"content-type": "image/png"})
        assert r.status_code == 413 and "larger than the upload limit of 2,000 bytes" in r.json()["detail"]
        # A streamed (chunked) body with no Content-Length: cut off once it passes the limit.
        r = c.post("/predict", content=iter([too_big[i:i + 4096] for i in range(0, len(too_big), 4096)]),
                   headers={"content-type": "image/png"})
        assert r.status_code == 413
        # A multipart body within the slack for part headers but a file over the limit.
        r = c.post("/predict", **upload(b"\x89PNG\r\n\x1a\n" + b"\x00" * 3000))
        assert r.status_code == 413 and "3,008 bytes, more than the limit of 2,000" in r.json()["detail"]
        # 8x8 = 64 pixels > 50.
        r = c.post("/predict", **upload(png))
        assert r.status_code == 413 and "more than the limit of 50 pixels" in r.json()["detail"]
        assert c.get("/health").json()["requests"]["rejected_413"] == 4


def test_create_app_validates_options(run):
    with pytest.raises(ValueError, match="max-batch"):
        create_app(run, max_batch=0)
    with pytest.raises(ValueError, match="max-wait-ms"):
        create_app(run, max_wait_ms=-1)
    with pytest.raises(ValueError, match="body-timeout-s"):
        create_app(run, body_timeout_s=0)


def test_stalled_body_gets_408_and_the_server_goes_on(run, png):
    """Over real HTTP (uvicorn on 127.0.0.1): a client that sends half its body and stalls is answered 408 once
    ``body_timeout_s`` has passed, and the server keeps answering others."""
    import socket
    import threading
    import time

    import uvicorn

    app = create_app(run, amp="off", device="cpu", body_timeout_s=0.5)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(png) + png[: len(png) // 2])
            t0 = time.monotonic()
            reply = b""
            while chunk := sock.recv(65536):  # the server closes the connection after its answer
                reply += chunk
            waited = time.monotonic() - t0
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), reply
        assert "did not arrive within 0.5 s" in json.loads(body)["detail"]
        assert 0.4 < waited < 10
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            assert c.post("/predict", **upload(png)).status_code == 200
            assert c.get("/health").json()["requests"]["rejected_408"] == 1
    finally:
        server.should_exit = True
        thread.join(10)


def test_decode_upload_applies_stored_preprocessing(digits, tmp_path):
    """Uploads are decoded exactly like `reslab predict` decodes files (resize, centre-crop, channels)."""
    from reslab.data.sources import decode_image

    big = np.kron(digits.images[3][..., 0], np.ones((4, 6), np.uint8))  # 32x48 grey
    rgb = np.repeat(big[..., None], 3, axis=-1)
    (tmp_path / "x.png").write_bytes(encode(rgb))
    out = decode_upload(encode(rgb), size=(8, 8), channels=1, max_pixels=10_000)
    assert out.shape == (8, 8, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, decode_image(tmp_path / "x.png", size=(8, 8), channels=1))


# ---------------------------------------------------------------------------------------------------------
# micro-batching


def test_concurrent_requests_are_batched_and_match_unbatched(run, digits):
    n = 24
    images = [encode(digits.images[i]) for i in range(n)]

    async def fire(app, concurrent: bool):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            async def one(data):
                r = await c.post("/predict?topk=10", files={"file": ("d.png", data, "image/png")})
                assert r.status_code == 200, r.text
                return {t["class"]: t["probability"] for t in r.json()["top"]}

            if concurrent:
                results = await asyncio.gather(*(one(d) for d in images))
            else:
                results = [await one(d) for d in images]
            health = (await c.get("/health")).json()["batching"]
        await app.state.batcher.close()
        return results, health

    batched_app = create_app(run, amp="off", device="cpu", max_batch=8, max_wait_ms=200)
    batched, stats = asyncio.run(fire(batched_app, concurrent=True))
    single_app = create_app(run, amp="off", device="cpu", max_batch=1, max_wait_ms=0)
    single, single_stats = asyncio.run(fire(single_app, concurrent=False))

    assert stats["images"] == n and stats["forward_passes"] < n and stats["max_batch_seen"] > 1
    assert stats["max_batch_seen"] <= 8 and sum(int(k) * v for k, v in stats["batch_sizes"].items()) == n
    assert single_stats["forward_passes"] == n and single_stats["max_batch_seen"] == 1
    for a, b in zip(batched, single):  # each request got its own image's answer, as if alone
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], atol=1e-5)


def test_micro_batcher_limits_order_and_errors():
    from concurrent.futures import ThreadPoolExecutor

    calls = []

    def infer(items):
        calls.append(list(items))
        if "boom" in items:
            raise RuntimeError("model exploded")
        return [x * 10 for x in items]

    async def scenario():
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = MicroBatcher(infer, pool, max_batch=4, max_wait_ms=100)
            out = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
            assert out == [i * 10 for i in range(10)]
            assert all(len(c) <= 4 for c in calls) and len(calls) < 10
            failing = await asyncio.gather(batcher.submit("boom"), batcher.submit(3), return_exceptions=True)
            assert all(isinstance(e, RuntimeError) for e in failing)  # everybody in that batch hears of it
            assert await batcher.submit(5) == 50  # and the collector goes on
            # A lone request waits at most max_wait_ms, not forever.
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            assert await batcher.submit(1) == 10
            assert loop.time() - t0 < 5
            assert batcher.stats.images == 12
            await batcher.close()

    asyncio.run(scenario())


def test_health_stays_responsive_during_inference(run, digits):
    """The event loop never runs model code: /health answers while a slow batch is in the inference thread."""
    import threading
    import time

    app = create_app(run, amp="off", device="cpu", max_batch=4, max_wait_ms=0)
    runner = app.state.runner
    release = threading.Event()
    original = runner.probabilities

    def slow(images):
        release.wait(10)
        return original(images)

    app.state.batcher.infer = slow

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            pending = asyncio.create_task(c.post("/predict", files={"file": ("d.png", encode(digits.images[0]),
                                                                             "image/png")}))
            await asyncio.sleep(0.3)
            t0 = time.perf_counter()
            health = await c.get("/health")
            elapsed = time.perf_counter() - t0
            release.set()
            r = await pending
        await app.state.batcher.close()
        return health, elapsed, r

    health, elapsed, r = asyncio.run(scenario())
    assert health.status_code == 200 and elapsed < 2 and r.status_code == 200


def test_load_test_benchmark_smoke(run, tmp_path):
    """benchmarks/load_test.py, as documented but tiny: it starts a server on 127.0.0.1, sends 20 requests from 4
    clients and reports no errors, every image counted by the server and the served top-1 of those 20 images."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    out = tmp_path / "load.json"
    assert load_test.main([str(run), "--requests", "20", "--concurrency", "4", "--device", "cpu",
                           "--out", str(out)]) == 0
    r = json.loads(out.read_text())["runs"][0]
    assert r["transport"] == "HTTP (uvicorn)" and (r["requests"], r["concurrency"], r["errors"]) == (20, 4, 0)
    assert 1 <= r["forward_passes"] <= 20 and r["mean_batch_size"] == round(20 / r["forward_passes"], 2)
    assert r["latency_ms"]["p50"] <= r["latency_ms"]["p99"] <= r["latency_ms"]["max"]
    images, labels = load_test.test_images(str(run), limit=20)  # the 20 images sent (after 20 for warm-up)
    runner = create_app(run, device="cpu").state.runner
    expected = np.mean([runner.classes[int(p.argmax())] == label
                        for p, label in zip(runner.probabilities([decode_upload(
                            d, size=runner.stored_size, channels=runner.channels, max_pixels=10**6)
                            for d in images]), labels)])
    assert abs(r["served_top1"] - expected) <= 0.05  # at most one near-tie decided otherwise in another batch


# ---------------------------------------------------------------------------------------------------------
# CLI


def test_serve_command_flags(monkeypatch, run):
    from reslab.deploy import serve as serve_module
    from reslab.deploy.serve_command import build_serve

    parser = argparse.ArgumentParser()
    build_serve(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", str(run)])
    assert (args.port, args.host, args.max_batch, args.max_wait_ms) == (8000, "127.0.0.1", 32, 5.0)
    seen = {}
    monkeypatch.setattr(serve_module, "serve", lambda run, host, port, **kw: seen.update(run=run, port=port, **kw))
    args = parser.parse_args(["serve", str(run), "--port", "9001", "--max-batch", "4", "--max-wait-ms", "2",
                              "--max-upload-mb", "1", "--max-pixels", "1000", "--body-timeout-s", "7"])
    assert args.func(args) == 0
    assert seen["port"] == 9001 and seen["max_batch"] == 4 and seen["max_wait_ms"] == 2.0
    assert seen["max_upload_bytes"] == 1024 * 1024 and seen["max_pixels"] == 1000
    assert seen["body_timeout_s"] == 7.0 and parser.parse_args(["serve", str(run)]).body_timeout_s == 30.0
    assert seen["retain_memory"] is True
    args = parser.parse_args(["serve", str(run), "--no-retain-memory"])
    assert args.func(args) == 0 and seen["retain_memory"] is False


def test_serve_retains_memory_in_the_server_process_only(monkeypatch, run):
    """``serve`` (the process) keeps freed memory like training; ``create_app`` (embedded) leaves it alone."""
    import uvicorn

    from reslab.deploy import serve as serve_module
    from reslab.train import engine

    calls, served = [], []
    monkeypatch.setattr(engine, "retain_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))
    create_app(run)
    assert calls == []
    serve_module.serve(run, port=0)
    serve_module.serve(run, port=0, retain_memory=False)
    assert calls == [1] and len(served) == 2
