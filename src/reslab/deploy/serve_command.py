"""``reslab serve``: the subcommand builder (wired into reslab.deploy.commands.COMMANDS)."""
from __future__ import annotations

import argparse

# Input limits, here so that building the CLI needs no web framework (fastapi is the optional `serve` extra).
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # 10 MiB: any photo a phone takes, far below memory trouble
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels decoded is ~120 MB of RGB; bigger claims are bombs
DEFAULT_BODY_TIMEOUT_S = 30.0  # a 10 MiB upload at 3 Mbit/s; a stalled body is answered 408 after this


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from reslab.deploy import serve as serve_module
    except ImportError as e:
        raise ValueError(f"reslab serve needs FastAPI and uvicorn ({e}); install them with: "
                         "pip install 'reslab[serve]'") from None

    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    serve_module.serve(args.run, host=args.host, port=args.port, max_batch=args.max_batch,
                       max_wait_ms=args.max_wait_ms, device=args.device, amp=args.amp,
                       max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                       body_timeout_s=args.body_timeout_s, log_level=args.log_level, access_log=not args.no_access_log,
                       retain_memory=args.retain_memory)
    return 0


def build_serve(sub) -> None:
    from reslab.cli import add_retain_memory_flag

    p = sub.add_parser("serve", help="HTTP API and web page for a trained run: /predict, /saliency, /model, /health",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run directory, checkpoint folder, or folder written by export/quantize")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    p.add_argument("--max-batch", type=int, default=32, help="most requests per forward pass (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
                   help="largest accepted image file (MiB)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="largest accepted width x height (decompression-bomb limit)")
    p.add_argument("--body-timeout-s", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="seconds a request body may take to arrive; slower or stalled uploads get 408")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    add_retain_memory_flag(p)
    p.set_defaults(func=cmd_serve)
