"""Bounded load test of `reslab serve`: N requests from C concurrent clients against a local server.

    OMP_NUM_THREADS=2 python benchmarks/load_test.py /tmp/serve-run --requests 2000 --concurrency 32 \
        --compare-unbatched

Starts the server in a subprocess (or targets --url), uploads the run's own test images (PNG at the stored size,
cycled) with httpx.AsyncClient, and writes benchmarks/results/serve_load.json: errors, p50/p90/p99 latency,
throughput, the server's batch-size counters and the accuracy of the served answers, stamped with
reslab.train.rundir.environment_info(). Client and server share the machine, so on a small CPU the client's own
work is part of the measured cost: compare figures taken in one invocation (--compare-unbatched) rather than
across machines or days.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, port: int, max_batch: int, max_wait_ms: float, device: str) -> subprocess.Popen:
    code = ("from reslab.deploy.serve import serve; "
            f"serve({run!r}, host='127.0.0.1', port={port}, max_batch={max_batch}, max_wait_ms={max_wait_ms}, "
            f"device={device!r}, log_level='warning', access_log=False)")
    return subprocess.Popen([sys.executable, "-c", code])


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not become healthy within {timeout:.0f} s")


def test_images(run: str, limit: int = 512) -> tuple[list[bytes], list[str]]:
    """The run's test split as PNG files (what a client would upload) with their true class names."""
    from PIL import Image

    from reslab.deploy.artifact import artifact_card
    from reslab.evaluate.evaluate import load_data_for_model
    from reslab.train.checkpoint import find_checkpoint, load_checkpoint

    # a run directory, or an exported / quantized folder (`reslab serve` takes both)
    card = artifact_card(run) or load_checkpoint(find_checkpoint(run), load_train_state=False).manifest
    test = load_data_for_model(card, None).test
    files, labels = [], []
    for image, label in zip(test.images[:limit], test.labels[:limit]):
        buf = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
        files.append(buf.getvalue())
        labels.append(card["classes"][int(label)])
    return files, labels


async def load(url: str, images: list[bytes], labels: list[str], requests: int, concurrency: int,
               app=None) -> dict:
    """Run the load; ``app``: call that ASGI app in this process (no sockets, no HTTP parsing) instead of ``url``."""
    latencies, errors, correct = [], [], 0
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    transport = httpx.ASGITransport(app=app) if app is not None else None
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60, transport=transport) as client:
        for i in range(min(20, requests)):  # warm-up: first forward passes, connection set-up
            await client.post("/predict", files={"file": ("w.png", images[i % len(images)], "image/png")})
        before = (await client.get("/health")).json()["batching"]

        async def worker():
            nonlocal next_index, correct
            while next_index < requests:
                i = next_index
                next_index += 1
                data, label = images[i % len(images)], labels[i % len(images)]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/predict?topk=1", files={"file": (f"{i}.png", data, "image/png")})
                    ok = r.status_code == 200
                    if ok:
                        correct += r.json()["top"][0]["class"] == label
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    ok = False
                    errors.append(f"{type(e).__name__}: {e}")
                if ok:
                    latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        health = (await client.get("/health")).json()
        after = health["batching"]
    passes = after["forward_passes"] - before["forward_passes"]
    images_done = after["images"] - before["images"]
    lat = np.asarray(latencies) * 1000
    return {
        "requests": requests, "concurrency": concurrency, "errors": len(errors), "error_examples": errors[:5],
        "wall_s": round(wall, 3), "throughput_rps": round(len(latencies) / wall, 1),
        "latency_ms": {q: round(float(np.percentile(lat, p)), 2) if len(lat) else None
                       for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}
        | {"mean": round(float(lat.mean()), 2) if len(lat) else None},
        "forward_passes": passes, "mean_batch_size": round(images_done / passes, 2) if passes else None,
        "max_batch_seen": after["max_batch_seen"],
        "served_top1": round(correct / max(len(latencies), 1), 4),
        # From request received to answer ready inside the server (latest 1,000): the rest of the client-side
        # latency is HTTP, the client itself and waiting for a CPU.
        "server_latency_ms": health.get("predict_latency_ms"),
    }


def measure(args, max_batch: int, images, labels) -> dict:
    if args.in_process:
        from reslab.deploy.serve import create_app

        app = create_app(args.run, max_batch=max_batch, max_wait_ms=args.max_wait_ms, device=args.device)
        result = asyncio.run(load("http://in-process", images, labels, args.requests, args.concurrency, app=app))
        result.update({"max_batch": max_batch, "max_wait_ms": args.max_wait_ms, "transport": "in-process ASGI"})
        return result
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args.run, port, max_batch, args.max_wait_ms, args.device)
    try:
        wait_ready(url, proc)
        result = asyncio.run(load(url, images, labels, args.requests, args.concurrency))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    result.update({"max_batch": max_batch, "max_wait_ms": args.max_wait_ms, "transport": "HTTP (uvicorn)"})
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="run directory, or exported / quantized folder, served (also the source of the test "
                               "images)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--url", default=None, help="an already running server (default: start one)")
    p.add_argument("--compare-unbatched", action="store_true",
                   help="also measure a server with --max-batch 1 (same requests, same invocation)")
    p.add_argument("--in-process", action="store_true",
                   help="call the app in this process through httpx.ASGITransport: measures batching and the app "
                        "without sockets and HTTP parsing")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/serve_load.json, "
                                               "serve_load_inprocess.json with --in-process)")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 1024:
        p.error("--requests must be 1..100000 and --concurrency 1..1024 (a bounded test)")

    from reslab.train.rundir import environment_info, write_json

    images, labels = test_images(args.run)
    runs = [measure(args, args.max_batch, images, labels)]
    if args.out is None:
        args.out = str(RESULTS / ("serve_load_inprocess.json" if args.in_process else "serve_load.json"))
    if args.compare_unbatched and (args.url is None or args.in_process):
        runs.append(measure(args, 1, images, labels))
    for r in runs:
        lat = r["latency_ms"]
        print(f"max_batch {r['max_batch']:>3}: {r['requests']} requests x{r['concurrency']} concurrent, "
              f"{r['errors']} errors, {r['throughput_rps']} req/s, p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
              f"mean batch {r['mean_batch_size']}, served top-1 {100 * r['served_top1']:.2f}%, "
              f"in-server p50/p99 {r['server_latency_ms'].get('p50')}/{r['server_latency_ms'].get('p99')} ms")
    result = {"benchmark": "serve_load", "run": str(args.run), "images": len(images),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "note": "client and server on the same machine; shared CPU, so figures are noisy",
              "runs": runs, "environment": environment_info()}
    write_json(args.out, result)
    print(f"-> {args.out}")
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
