"""``reslab serve``: a trained run behind an HTTP API and a small web page.

What is served: a run directory or checkpoint folder (its float model on reslab's inference path), or a folder
written by ``reslab export`` or ``reslab quantize`` (its ONNX / TorchScript / int8 file as it is, on the CPU:
:mod:`reslab.deploy.artifact`). For such a folder, saliency explains the float weights of the checkpoint its
``model.json`` names (``source_checkpoint``), and is refused with a 409 when they are not on this machine.

Endpoints (FastAPI; every error is a 4xx JSON ``{"detail": "<what went wrong and what to send>"}``):

- ``POST /predict?topk=5``: one image (multipart field ``file``, or a raw body with ``Content-Type: image/*``)
  -> top-k classes with softmax probabilities.
- ``POST /saliency?target=<class>``: the same upload -> the prediction plus a Grad-CAM heat map
  (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
  Eq. 1-2) on the model's last stage (``model.stage_info[-1]``), as base64 PNGs (overlay and RGBA heat map).
- ``GET /model``: the model card (architecture, paper, classes, preprocessing, checkpoint metrics, input limits).
- ``GET /health``: liveness, request counters, in-server /predict latency (p50/p99 of the latest 1,000) and
  micro-batching counters (forward passes, images, batch-size histogram).
- ``GET /``: the web page (``deploy/static/``): pick or drop an image, see the top-5 bars and the saliency overlay.

Micro-batching: each ``/predict`` decodes its image (large ones in a worker thread) and puts it on an asyncio queue; one
collector task takes the first waiting request, then keeps collecting until ``max_batch`` requests or
``max_wait_ms`` have passed, runs ONE forward pass for all of them in a dedicated inference thread
(``torch.inference_mode``) and fans the probabilities back out. Under load, requests arriving during a forward
pass are batched into the next one, so throughput grows with concurrency while a lone request waits at most
``max_wait_ms``. The event loop never runs model code nor decodes large images, so ``/health`` stays responsive.

Preprocessing is exactly ``reslab predict``'s: ``reslab.data.sources.decode_image`` (resize the shorter side,
centre-crop to the stored size, convert to the stored channels) then ``reslab.evaluate.evaluate.model_loader``
(normalise, resize to the input size). As there, the logits are divided by the temperature ``reslab calibrate``
stored with the run (``RUN/calibration.json``; temperature scaling, Guo et al. 2017, §4.2) before the softmax.

Input limits (each answered with a 4xx, never a 500 or a hang): request body size (``max_upload_bytes``;
413 before the body is read when ``Content-Length`` says so, or as soon as a streamed body passes it), pixel
count from the image header before any pixel is decoded (``max_pixels``; decompression bombs, 413), content
sniffed from the first bytes (JPEG, PNG, BMP, GIF, WebP, TIFF; anything else 415, whatever the file name says),
undecodable or truncated images (400), missing field / empty upload (400/422) and bad ``topk`` / ``target`` (422).
A body that has not fully arrived ``body_timeout_s`` after the request came in (stalled or trickling uploads)
gets a 408 and the connection is closed, so it cannot hold a request open forever.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
import warnings
from collections import Counter, deque
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.formparsers import MultiPartException

STATIC_DIR = Path(__file__).parent / "static"

from reslab.deploy.serve_command import (  # noqa: E402,F401
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
)
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the file in a multipart body
ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
UPLOAD_FIELDS = ("file", "image")  # multipart field names taken as the image
SALIENCY_DISPLAY_SIDE = 256
LATENCY_WINDOW = 1000  # /health reports in-server /predict latency percentiles over this many latest requests
# Images up to this many pixels are decoded on the event loop (well under a millisecond); larger ones in a
# worker thread, so a big photo never stalls other requests.
INLINE_DECODE_PIXELS = 256 * 256  # the longer side of the returned PNGs


# ---------------------------------------------------------------------------------------------------------
# Input checking
# ---------------------------------------------------------------------------------------------------------
class InputError(Exception):
    """A request the server refuses: ``status`` is the HTTP code, the message says what to send instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def sniff_format(data: bytes) -> str | None:
    """The image format from the file's first bytes (magic numbers), or None: the name or the declared
    content type of an upload is never trusted."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"BM") and len(data) >= 26:
        return "BMP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    return None


def check_upload(data: bytes, *, max_pixels: int) -> tuple[str, int, int]:
    """``(format, width, height)`` of uploaded bytes from their header alone (no pixel is decoded).

    Raises ``InputError``: 400 empty or unreadable header, 415 not an accepted image type, 413 too many pixels.
    """
    if not data:
        raise InputError(400, "the uploaded file is empty")
    fmt = sniff_format(data[:32])
    if fmt is None:
        raise InputError(415, "the upload is not an accepted image type: send JPEG, PNG, BMP, GIF, WebP or TIFF "
                              "(recognised by content, not by file name)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                width, height = im.size
    except Image.DecompressionBombError as e:
        raise InputError(413, f"the image has too many pixels ({e})") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is the upload's fault
        raise InputError(400, f"the {fmt} image cannot be read ({_first_line(e)})") from None
    if width * height > max_pixels:
        raise InputError(413, f"the image is {width}x{height} = {width * height:,} pixels, more than the "
                              f"limit of {max_pixels:,} pixels; downscale it first")
    return fmt, width, height


def decode_upload(data: bytes, *, size: tuple[int, int], channels: int, max_pixels: int,
                  fmt: str | None = None) -> np.ndarray:
    """Check and decode uploaded bytes to uint8 (H, W, C) with the model's stored preprocessing
    (``reslab.data.sources.decode_image``, as ``reslab predict``). Raises ``InputError`` (see ``check_upload``;
    400 for truncated or corrupt pixel data). ``fmt``: the result of an earlier ``check_upload``."""
    from reslab.data.sources import decode_image

    if fmt is None:
        fmt, _, _ = check_upload(data, max_pixels=max_pixels)
    try:
        return decode_image(io.BytesIO(data), size=size, channels=channels, max_pixels=max_pixels)
    except Image.DecompressionBombError as e:
        raise InputError(413, f"the image has too many pixels ({e})") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data in any decoder
        raise InputError(400, f"the {fmt} image cannot be decoded; is it truncated or corrupt? "
                              f"({_first_line(e)})") from None


def parse_topk(raw: str | None, num_classes: int, default: int = 5) -> int:
    """``topk`` query value -> 1..num_classes (larger values are clipped to the class count, like predict)."""
    if raw is None:
        return min(default, num_classes)
    try:
        k = int(raw)
    except ValueError:
        raise InputError(422, f"topk must be a positive integer, got {raw!r}") from None
    if k < 1:
        raise InputError(422, f"topk must be at least 1, got {k}")
    return min(k, num_classes)


def parse_target(raw: str | None, classes: list[str]) -> int | None:
    """``target`` query value (a class name, else a class index) -> class index, or None for the top-1."""
    if raw is None or raw == "":
        return None
    if raw in classes:
        return classes.index(raw)
    try:
        index = int(raw)
    except ValueError:
        index = -1
    if not 0 <= index < len(classes):
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        raise InputError(422, f"target {raw!r} is neither a class name ({shown}) "
                              f"nor a class index 0..{len(classes) - 1}")
    return index


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------------
# The model: batched inference and Grad-CAM
# ---------------------------------------------------------------------------------------------------------
class ModelRunner:
    """A loaded run (or exported / quantized model folder) plus the two computations the server needs; not
    thread-safe (use one inference thread)."""

    def __init__(self, run: str | Path, *, device: str = "auto", amp: str = "auto"):
        from reslab.deploy.artifact import load_for_inference
        from reslab.evaluate.calibration import stored_temperature
        from reslab.evaluate.inference import inference_runner
        from reslab.train.checkpoint import load_model
        from reslab.train.engine import autocast_dtype

        self.run = Path(run)
        loaded = load_for_inference(run, device=device)
        self.checkpoint, self.card = loaded.source, loaded.card
        self.deployed, self.device = loaded.deployed, loaded.device
        self.temperature = stored_temperature(run)  # as `reslab predict`: 1.0 unless `reslab calibrate` fitted one
        prep = self.card["preprocessing"]
        self.classes: list[str] = list(self.card["classes"])
        self.stored_size = tuple(int(v) for v in prep["stored_size"])
        self.channels = int(prep["channels"])
        h, w = (int(v) for v in prep["input_size"])
        if self.deployed:
            # The deployed file answers predictions as it is (on the CPU, in its own precision); Grad-CAM needs
            # gradients, so it explains the float weights the file was made from, when they are on this machine.
            self.amp_dtype = None
            self.logits_of = loaded.model
            source = self.card.get("source_checkpoint")  # on this machine exactly when loaded.run_dir is known
            self.model = load_model(source)[0] if loaded.run_dir is not None else None
            self.saliency_of = f"the float weights of {source}" if self.model is not None else None
        else:
            # Predictions run reslab's inference path (on a CPU: BN folded, NHWC, bf16 if amp allows, frozen);
            # Grad-CAM needs gradients, so it keeps the loaded model.
            self.model, self.amp_dtype = loaded.model, autocast_dtype(self.device, amp)
            example = torch.zeros(1, self.channels, h, w, device=self.device)
            self.logits_of = inference_runner(self.model, example, device=self.device, amp_dtype=self.amp_dtype)
            self.saliency_of = "the served model"
        self.cam_layer = self.model.stage_info[-1].name if self.model is not None else None

    def _batch(self, images: list[np.ndarray]) -> torch.Tensor:
        from reslab.data import ImageArray
        from reslab.evaluate.evaluate import model_loader

        array = ImageArray(np.stack(images), np.zeros(len(images), dtype=np.int64))
        ((x, _),) = list(model_loader(self.card, array, device=self.device, batch_size=len(images)))
        return x

    def probabilities(self, images: list[np.ndarray]) -> torch.Tensor:
        """Softmax probabilities of ``logits / temperature`` (N, num_classes) on the CPU, in one forward pass."""
        with torch.inference_mode():
            logits = self.logits_of(self._batch(images))
            return torch.softmax(logits / self.temperature, dim=1).cpu()

    def check_saliency(self) -> None:
        """Refuse (409) saliency for a deployed file whose float weights are not on this machine."""
        if self.model is None:
            raise InputError(409, f"no saliency for {self.run}: it is a {self.card['format']} file, Grad-CAM needs "
                                  "float weights with gradients, and its model.json names no source checkpoint on "
                                  "this machine; serve the training run for saliency")

    def grad_cam(self, image: np.ndarray, target: int | None = None) -> tuple[np.ndarray, int, torch.Tensor]:
        """Grad-CAM of one decoded image for class ``target`` (default: the top-1), in full precision.

        Selvaraju et al. 2017, Eq. 1: ``alpha_k = mean_ij d y_c / d A_k[i, j]`` over the last stage's feature
        map ``A``; Eq. 2: ``L = ReLU(sum_k alpha_k A_k)``, upsampled (bilinear) to the model input and scaled
        to [0, 1]. Returns ``(cam (H_in, W_in) float32, target index, softmax probabilities (num_classes,))``.
        """
        self.check_saliency()
        stage = self.model.get_submodule(self.cam_layer)
        captured: dict[str, torch.Tensor] = {}
        handle = stage.register_forward_hook(lambda _m, _i, out: captured.__setitem__("A", out))
        try:
            with torch.enable_grad():
                x = self._batch([image])
                logits = self.model(x)
                if target is None:
                    target = int(logits[0].argmax())
                activations = captured["A"]
                (grads,) = torch.autograd.grad(logits[0, target], activations)
        finally:
            handle.remove()
        with torch.no_grad():
            weights = grads.mean(dim=(2, 3), keepdim=True)  # Eq. 1
            cam = F.relu((weights * activations).sum(dim=1, keepdim=True))  # Eq. 2
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
            peak = float(cam.max())
            cam = cam / peak if peak > 0 else torch.zeros_like(cam)
            probs = torch.softmax(logits.detach().float()[0] / self.temperature, dim=0).cpu()
        return cam.float().cpu().numpy(), target, probs


def _heat_colours(cam: np.ndarray) -> np.ndarray:
    """A jet-like colour map (blue -> cyan -> yellow -> red) of values in [0, 1], uint8 RGB."""
    t = np.clip(cam, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # where R, G and B peak
    rgb = np.clip(1.5 - np.abs(4.0 * t - 4.0 * centres), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def saliency_pngs(image: np.ndarray, cam: np.ndarray, side: int = SALIENCY_DISPLAY_SIDE,
                  alpha: float = 0.5) -> tuple[bytes, bytes]:
    """(overlay PNG, RGBA heat-map PNG) at ``side`` pixels on the longer side, for display.

    The decoded image (often tiny, e.g. 8x8 digits) is upscaled without smoothing so its pixels stay visible;
    the heat map is upscaled bilinearly. The RGBA heat map's opacity follows the saliency.
    """
    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).convert("RGB")
    base = base.resize(size, Image.Resampling.NEAREST if scale >= 4 else Image.Resampling.BILINEAR)
    cam_img = Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    cam_big = np.clip(np.asarray(cam_img), 0.0, 1.0)
    heat = _heat_colours(cam_big)
    overlay = (np.asarray(base, dtype=np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha)
    rgba = np.concatenate([heat, (cam_big * 255).round().astype(np.uint8)[..., None]], axis=-1)
    return _png(Image.fromarray(overlay.round().astype(np.uint8), "RGB")), _png(Image.fromarray(rgba, "RGBA"))


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Micro-batching
# ---------------------------------------------------------------------------------------------------------
@dataclass
class BatchStats:
    """Counters of the forward passes the batcher ran (read by /health and the tests)."""

    forward_passes: int = 0
    images: int = 0
    max_batch_seen: int = 0
    batch_sizes: Counter = field(default_factory=Counter)

    def record(self, n: int) -> None:
        self.forward_passes += 1
        self.images += n
        self.max_batch_seen = max(self.max_batch_seen, n)
        self.batch_sizes[n] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"forward_passes": self.forward_passes, "images": self.images,
                "mean_batch_size": self.images / self.forward_passes if self.forward_passes else 0.0,
                "max_batch_seen": self.max_batch_seen,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


class MicroBatcher:
    """Collect concurrent requests into batches: up to ``max_batch`` items or ``max_wait_ms`` after the first.

    ``await submit(item)`` returns ``infer([items...])[i]`` for its own item. ``infer`` runs in ``executor``
    (one thread: the model is used by one batch at a time). The collector task starts on first use in the
    running event loop, so the batcher works under uvicorn and under test clients alike.
    """

    def __init__(self, infer, executor: ThreadPoolExecutor, *, max_batch: int, max_wait_ms: float):
        self.infer, self.executor = infer, executor
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def _ensure_started(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._collect(self._queue))
        return self._queue

    async def submit(self, item):
        queue = self._ensure_started()
        future = asyncio.get_running_loop().create_future()
        await queue.put((item, future))
        return await future

    async def _collect(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:  # requests already waiting join without any delay
                    batch.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # clients that went away
            if not batch:
                continue
            try:
                outputs = await loop.run_in_executor(self.executor, self.infer, [item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the loop goes on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.stats.record(len(batch))
            for (_, fut), out in zip(batch, outputs):
                if not fut.done():
                    fut.set_result(out)

    async def close(self) -> None:
        if self._task is not None and self._loop is asyncio.get_running_loop():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._task = None


# ---------------------------------------------------------------------------------------------------------
# Body size and read-time limits (ASGI middleware)
# ---------------------------------------------------------------------------------------------------------
class _BodyTooLarge(Exception):
    pass


class _BodyTimedOut(Exception):
    pass


class BodyLimits:
    """Refuse request bodies over ``max_bytes`` with 413: at once when ``Content-Length`` says so, otherwise as
    soon as the streamed body passes the limit, so an endless upload is cut off rather than buffered. Refuse
    bodies not complete ``timeout_s`` after the request came in with 408 (uvicorn itself waits forever for the
    rest of a stalled body); waiting for a disconnect after the body is not timed."""

    def __init__(self, app, max_bytes: int, message: str, timeout_s: float, on_refuse=None):
        self.app, self.max_bytes, self.message, self.on_refuse = app, max_bytes, message, on_refuse
        self.timeout_s = timeout_s
        self.timeout_message = (f"the request body did not arrive within {timeout_s:g} s; send the whole image "
                                "in one request, without pausing")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, 413, self.message)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received = 0
        body_done = False
        started = False

        async def limited_receive():
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise _BodyTimedOut from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
                body_done = not message.get("more_body", False)
            else:  # http.disconnect
                body_done = True
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (_BodyTooLarge, _BodyTimedOut) as e:
            if started:
                raise
            if isinstance(e, _BodyTooLarge):
                await self._refuse(send, 413, self.message)
            else:
                await self._refuse(send, 408, self.timeout_message)

    async def _refuse(self, send, status: int, message: str) -> None:
        if self.on_refuse is not None:
            self.on_refuse(status)
        body = json.dumps({"detail": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------
def create_app(run: str | Path, *, max_batch: int = 32, max_wait_ms: float = 5.0, device: str = "auto",
               amp: str = "auto", max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S):
    """A FastAPI app serving the best checkpoint of ``run`` (a run directory or checkpoint folder).

    ``max_batch``/``max_wait_ms``: micro-batching (1 / 0 disables it); ``max_upload_bytes``: largest image file;
    ``max_pixels``: largest width x height accepted (checked from the header before decoding);
    ``body_timeout_s``: time a request body may take to arrive (408 after it);
    ``device``/``amp`` as in ``reslab predict`` (CPU with native bf16: bf16 autocast unless ``amp="off"``).
    """
    if int(max_batch) < 1:
        raise ValueError(f"--max-batch must be at least 1, got {max_batch}")
    if not 0 <= float(max_wait_ms) <= 10_000:
        raise ValueError(f"--max-wait-ms must be between 0 and 10000, got {max_wait_ms}")
    if int(max_upload_bytes) < 1 or int(max_pixels) < 1:
        raise ValueError("the upload and pixel limits must be positive")
    if not float(body_timeout_s) > 0:
        raise ValueError(f"--body-timeout-s must be positive, got {body_timeout_s}")

    runner = ModelRunner(run, device=device, amp=amp)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reslab-infer")
    batcher = MicroBatcher(runner.probabilities, executor, max_batch=int(max_batch), max_wait_ms=float(max_wait_ms))
    started_at = time.time()
    counters = Counter()
    counters_lock = threading.Lock()
    recent_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)  # in-server time of the latest /predict requests
    limits = {"max_upload_bytes": int(max_upload_bytes), "max_pixels": int(max_pixels),
              "accepted_formats": list(ACCEPTED_FORMATS), "upload_fields": list(UPLOAD_FIELDS)}

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await batcher.close()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="reslab serve", description=f"{runner.card['model']} trained on {runner.card.get('data')}",
                  lifespan=lifespan)
    app.state.runner, app.state.batcher = runner, batcher

    def count_rejection(status: int) -> None:
        with counters_lock:
            counters[f"rejected_{status}"] += 1

    @app.exception_handler(InputError)
    async def _input_error(_request, exc: InputError):
        count_rejection(exc.status)
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    async def read_upload(request: Request) -> bytes:
        """The image bytes of a multipart (field ``file``) or raw-image request."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=16)
            except (MultiPartException, HTTPException) as e:
                raise InputError(400, f"malformed multipart body ({getattr(e, 'detail', None) or e}); send the "
                                      "image as multipart/form-data field 'file'") from None
            try:
                for name in UPLOAD_FIELDS:
                    part = form.get(name)
                    if part is not None and not isinstance(part, str):
                        data = await part.read()
                        break
                    if isinstance(part, str):
                        raise InputError(422, f"form field {name!r} holds text, not a file; upload the image "
                                              f"as a file (curl -F '{name}=@image.jpg')")
                else:
                    got = sorted(form.keys())
                    raise InputError(422 if got else 400,
                                     f"no image in the upload: send it as multipart form field 'file' "
                                     f"(received fields: {got})" if got else
                                     "the multipart body is empty: send the image as form field 'file'")
            finally:
                await form.close()
        elif content_type.startswith("image/") or content_type in ("application/octet-stream", ""):
            data = await request.body()
            if not data:
                raise InputError(400, "empty request body: send an image as multipart/form-data field 'file' "
                                      "(curl -F 'file=@image.jpg') or as a raw body with Content-Type image/*")
        else:
            raise InputError(415, f"Content-Type {content_type!r} is not accepted: send multipart/form-data with "
                                  "the image in field 'file', or the raw image bytes with Content-Type image/*")
        if len(data) > limits["max_upload_bytes"]:
            raise InputError(413, f"the image file is {len(data):,} bytes, more than the limit of "
                                  f"{limits['max_upload_bytes']:,} bytes")
        return data

    async def decode(request: Request) -> np.ndarray:
        data = await read_upload(request)
        fmt, width, height = check_upload(data, max_pixels=limits["max_pixels"])  # header only: microseconds
        kwargs = dict(size=runner.stored_size, channels=runner.channels, max_pixels=limits["max_pixels"], fmt=fmt)
        if width * height <= INLINE_DECODE_PIXELS:  # cheaper than a hop to a thread and back
            return decode_upload(data, **kwargs)
        return await asyncio.to_thread(decode_upload, data, **kwargs)

    def top(probs: torch.Tensor, k: int) -> list[dict[str, Any]]:
        values, index = probs.topk(k)
        return [{"class": runner.classes[i], "index": i, "probability": float(v)}
                for v, i in zip(values.tolist(), index.tolist())]

    @app.post("/predict")
    async def predict(request: Request):
        """Top-k classes of one image (multipart field ``file``; ``?topk=5``)."""
        t0 = time.perf_counter()
        k = parse_topk(request.query_params.get("topk"), len(runner.classes))
        image = await decode(request)
        probs = await batcher.submit(image)
        with counters_lock:
            counters["predict"] += 1
        recent_ms.append((time.perf_counter() - t0) * 1e3)
        return {"model": runner.card["model"], "top": top(probs, k)}

    @app.post("/saliency")
    async def saliency(request: Request):
        """Grad-CAM heat map of one image for ``?target=`` (class name or index; default the top-1)."""
        k = parse_topk(request.query_params.get("topk"), len(runner.classes))
        target = parse_target(request.query_params.get("target"), runner.classes)
        runner.check_saliency()
        image = await decode(request)
        loop = asyncio.get_running_loop()
        cam, target, probs = await loop.run_in_executor(executor, runner.grad_cam, image, target)
        overlay, heatmap = await asyncio.to_thread(saliency_pngs, image, cam)
        with counters_lock:
            counters["saliency"] += 1
        return {"model": runner.card["model"], "method": "gradcam", "layer": runner.cam_layer,
                "explains": runner.saliency_of,
                "target": {"class": runner.classes[target], "index": target, "probability": float(probs[target])},
                "top": top(probs, k), "overlay_png": base64.b64encode(overlay).decode(),
                "heatmap_png": base64.b64encode(heatmap).decode()}

    @app.get("/model")
    async def model_card():
        """The model card: what is served, how inputs are prepared, how well it did, what inputs are accepted."""
        card = runner.card
        try:
            from reslab.models import model_entry

            paper = model_entry(card["model"]).paper
        except Exception:  # noqa: BLE001 - the card is still useful without the paper reference
            paper = None
        return {"name": card["model"], "paper": paper, "model_kwargs": card.get("model_kwargs", {}),
                "data": card.get("data"), "classes": runner.classes, "num_classes": len(runner.classes),
                "preprocessing": card["preprocessing"], "metrics": card.get("metrics", {}),
                "params": card.get("params"), "macs": card.get("macs"),
                "checkpoint": {"name": runner.checkpoint.name, "step": card.get("step"), "epoch": card.get("epoch")},
                "format": card.get("format", "checkpoint"), "quantization": card.get("quantization"),
                "saliency_layer": runner.cam_layer, "saliency_of": runner.saliency_of,
                "temperature": runner.temperature, "device": str(runner.device),
                "amp": str(runner.amp_dtype).replace("torch.", "") if runner.amp_dtype else "off",
                "limits": limits, "batching": {"max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1e3}}

    @app.get("/health")
    async def health():
        """Liveness and counters; ``batching`` shows how many images each forward pass carried."""
        with counters_lock:
            requests = dict(counters)
        window = np.asarray(recent_ms, dtype=np.float64)
        latency = ({"window": len(window), **{f"p{q}": round(float(np.percentile(window, q)), 3) for q in (50, 99)}}
                   if len(window) else {"window": 0})
        return {"status": "ok", "model": runner.card["model"], "device": str(runner.device),
                "uptime_s": round(time.time() - started_at, 3), "requests": requests,
                "predict_latency_ms": latency,
                "batching": {"max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1e3,
                             **batcher.stats.as_dict()}}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    overhead = int(max_upload_bytes) + MULTIPART_OVERHEAD_BYTES
    app.add_middleware(BodyLimits, max_bytes=overhead,
                       message=f"the request body is larger than the upload limit of {int(max_upload_bytes):,} "
                               "bytes; send a smaller image", timeout_s=float(body_timeout_s),
                       on_refuse=count_rejection)
    return app


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, *, max_batch: int = 32,
          max_wait_ms: float = 5.0, device: str = "auto", amp: str = "auto",
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
          body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, log_level: str = "info", access_log: bool = True,
          retain_memory: bool = True) -> None:
    """Serve ``run`` with uvicorn until interrupted (see ``create_app`` for the options). ``retain_memory``:
    :func:`reslab.train.engine.retain_freed_memory` for the server process (``create_app`` alone leaves the
    embedding process's allocator as it is)."""
    import uvicorn

    from reslab.train.engine import retain_freed_memory

    if retain_memory:
        retain_freed_memory()
    app = create_app(run, max_batch=max_batch, max_wait_ms=max_wait_ms, device=device, amp=amp,
                     max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, body_timeout_s=body_timeout_s)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {app.state.runner.card['model']} from {app.state.runner.checkpoint} at http://{shown}:{port}/ "
          f"(max batch {max_batch}, max wait {max_wait_ms:g} ms)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)


__all__ = ["create_app", "serve", "ModelRunner", "MicroBatcher", "BatchStats", "decode_upload", "check_upload",
           "sniff_format", "saliency_pngs", "InputError", "ACCEPTED_FORMATS", "DEFAULT_MAX_UPLOAD_BYTES",
           "DEFAULT_MAX_PIXELS", "DEFAULT_BODY_TIMEOUT_S"]
