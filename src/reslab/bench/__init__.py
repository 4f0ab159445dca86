"""Speed benchmarks: ``reslab bench train|infer|data|time-to-accuracy``.

Every benchmark measures reslab and its reference side by side in one process, interleaved, and reports the
median of several repetitions, because the machines these run on are often shared: absolute figures move
with the load, ratios measured together much less. Every result is stamped with
``reslab.train.rundir.environment_info()``, the command, and the load average before and after.

Shared helpers live here: timing (:func:`median_rate`), the JSON result (:func:`write_result`), table
printing (:func:`format_table`) and the matmul peaks (:func:`matmul_peak`, :func:`int8_matmul_peak`).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["RESULTS_DIR", "median_rate", "time_calls", "time_interleaved", "matmul_peak", "int8_matmul_peak",
           "loadavg", "write_result", "format_table", "set_threads"]

RESULTS_DIR = Path("benchmarks") / "results"


def loadavg() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none): how busy the machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (None: leave PyTorch's choice) and return the number in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def time_calls(fn: Callable[[], Any], *, repeats: int = 5, min_seconds: float = 0.2, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn``, one figure per repetition (each repetition loops ``fn`` for at least
    ``min_seconds``, so that timer resolution never matters)."""
    for _ in range(warmup):
        fn()
    per_call = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        per_call.append(elapsed / calls)
    return per_call


def time_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int = 5, min_seconds: float = 0.2,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, timed side by side: every repetition runs each function in turn
    (:func:`time_calls` with one repetition), so a change of load on a shared machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].extend(time_calls(fn, repeats=1, min_seconds=min_seconds, warmup=0))
    return samples


def median_rate(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeats: int = 5) -> float:
    """Achieved FLOP/s of a large square matmul in ``dtype``: the practical compute peak of this machine
    (median of ``repeats``), the denominator of "fraction of peak"."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    with torch.no_grad():
        seconds = time_calls(lambda: torch.mm(a, b), repeats=repeats, min_seconds=0.3)
    return 2 * n ** 3 / median_rate(seconds)


def int8_matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Achieved int8 OP/s (2 per multiply-add) of a quantized n x n linear layer on n rows (uint8 activations x
    int8 weights, the product behind PyTorch's and ONNX Runtime's int8 convolutions), for each quantized engine
    of this PyTorch (``onednn``, ``x86``): the int8 counterpart of :func:`matmul_peak`. The engine in use before
    is restored."""
    import torch.ao.nn.quantized as nnq

    peaks, before = {}, torch.backends.quantized.engine
    gen = torch.Generator().manual_seed(0)
    try:
        for engine in ("onednn", "x86"):
            if engine not in torch.backends.quantized.supported_engines:
                continue
            torch.backends.quantized.engine = engine
            layer = nnq.Linear(n, n)
            weight = torch.quantize_per_tensor(torch.randn(n, n, generator=gen) * 0.05, 0.01, 0, torch.qint8)
            layer.set_weight_bias(weight, None)
            x = torch.quantize_per_tensor(torch.rand(n, n, generator=gen), 0.01, 0, torch.quint8)
            with torch.no_grad():
                seconds = time_calls(lambda: layer(x), repeats=repeats, min_seconds=0.3)
            peaks[engine] = 2 * n ** 3 / median_rate(seconds)
    finally:
        torch.backends.quantized.engine = before
    return peaks


def command_line() -> str:
    return " ".join(["reslab", *sys.argv[1:]]) if Path(sys.argv[0]).name == "reslab" else " ".join(sys.argv)


def write_result(name: str, result: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write ``result`` (stamped with the environment, command and date) to ``out`` or
    ``benchmarks/results/<name>.json`` and return the path."""
    from reslab.train.rundir import environment_info, write_json

    result = {"benchmark": name, "command": command_line(), "environment": environment_info("cpu"), **result}
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return path


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table of ``rows`` with ``columns`` given as (key, header) pairs."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return "" if v is None else str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
