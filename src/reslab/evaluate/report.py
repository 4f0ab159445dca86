"""``reslab report``: one self-contained HTML page about a run, readable offline.

Everything is inside the file: figures are embedded as base64 ``data:`` URIs, styles are inline, and there
are no scripts, fonts or links to fetch. Sections: the summary (model, data, accuracy, parameters, MACs,
throughput, hardware), the training curves (``curves.png``, drawn from metrics.jsonl if missing) and the
per-epoch metrics table, then every analysis found in ``RUN/analysis/`` (analyze, calibration, robustness,
explain, signal, scaling), the data-scaling results of any ``reslab scaling`` output folder given with
``scaling``, the deployed copies (``reslab export`` / ``reslab quantize`` output in ``RUN/export`` and
``RUN/quantized``, or the reported folder itself), and any other PNG in ``RUN/analysis/``.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from pathlib import Path
from typing import Any

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: .4em 0; }
.note { color: #666; font-size: .9em; } code { background: #f4f4f4; padding: 0 .2em; }
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{f'<tr>{head}</tr>' if any(header) else ''}{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}%"


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _summary_section(run: Path) -> str:
    summary = _load(run / "summary.json") or {}
    card = _load(run / "model.json") or {}
    final, best = summary.get("final", {}), summary.get("best", {})
    env = summary.get("environment", {})
    rows = [["model", summary.get("model", card.get("model"))], ["data", summary.get("data", card.get("data"))],
            ["status", summary.get("status")],
            ["epochs / steps", f"{summary.get('epochs_done')} / {summary.get('steps')}"],
            ["final test top-1", _pct(final.get("test_top1"))], ["final test top-5", _pct(final.get("test_top5"))],
            ["best val top-1", _pct(best.get("val_top1"))],
            ["parameters", f"{summary.get('params', card.get('params', 0)):,}"],
            ["MACs per image", f"{summary.get('macs', card.get('macs', 0)):,}"],
            ["train images/s", _fmt(summary.get("train_images_per_s"))],
            ["wall time (s)", _fmt(summary.get("wall_seconds"))], ["seed", summary.get("seed")],
            ["hardware", env.get("gpu") or env.get("cpu") or ""],
            ["versions", ", ".join(f"{k} {v}" for k, v in env.items() if k in ("torch", "python", "reslab"))]]
    return "<h2>Summary</h2>" + _table(["", ""], [r for r in rows if r[1] not in (None, "")])


def _curves_section(run: Path) -> str:
    from reslab.train.rundir import read_jsonl

    out = "<h2>Training</h2>"
    curves = run / "curves.png"
    if not curves.is_file() and (run / "metrics.jsonl").is_file():
        try:
            from reslab.evaluate.curves import plot_curves

            plot_curves(run)
        except Exception:  # a missing figure must not cost the report
            pass
    if curves.is_file():
        out += _img(curves, "training curves")
    records = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    if records:
        keys = [k for k in ("epoch", "step", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "test_loss",
                            "test_top1", "images_per_s") if any(k in r for r in records)]
        out += _table(keys, [[r.get(k) for k in keys] for r in records])
    return out


def _analyze_section(a: dict, folder: Path) -> str:
    out = f"<h2>Errors ({html.escape(str(a.get('split')))} split of {html.escape(str(a.get('data')))})</h2>"
    out += (f"<p>Accuracy {_pct(a.get('accuracy'))} on {a.get('count')} images; macro F1 "
            f"{a.get('macro', {}).get('f1', 0):.4f}, weighted F1 {a.get('weighted', {}).get('f1', 0):.4f}.</p>")
    rows = [[c, m["precision"], m["recall"], m["f1"], m["support"]] for c, m in a.get("per_class", {}).items()]
    out += _table(["class", "precision", "recall", "F1", "support"], rows)
    out += _table(["true", "predicted", "count"],
                  [[p["true"], p["predicted"], p["count"]] for p in a.get("most_confused", [])])
    for name, alt in (("confusion.png", "confusion matrix"), ("confused_pairs.png", "most confused pairs"),
                      ("top_losses.png", "highest-loss images")):
        if (folder / name).is_file():
            out += _img(folder / name, alt)
    return out


def _calibration_section(c: dict, folder: Path) -> str:
    out = "<h2>Calibration</h2>"
    fitted = c.get("fitted_on", {})
    out += (f"<p>Temperature <b>T = {c.get('temperature', 1):.4f}</b>, fitted on "
            f"{html.escape(str(fitted.get('source')))} "
            f"({html.escape(str(fitted.get('note', '')))}).</p>")
    rows = [[split, c[f"{split}_before"]["ece"], c[f"{split}_after"]["ece"], c[f"{split}_before"]["nll"],
             c[f"{split}_after"]["nll"]] for split in ("val", "test") if f"{split}_before" in c]
    out += _table(["split", "ECE before", "ECE after", "NLL before", "NLL after"], rows)
    if (folder / "reliability.png").is_file():
        out += _img(folder / "reliability.png", "reliability diagrams")
    return out


def _robustness_section(r: dict, folder: Path) -> str:
    out = "<h2>Robustness to common corruptions</h2>"
    out += (f"<p>{r.get('images')} {html.escape(str(r.get('split')))} images, "
            f"clean error {_pct(r.get('clean_error'))}, "
            f"mean error over corruptions and severities {_pct(r.get('mean_corruption_error_unnormalised'))}")
    if r.get("mce") is not None:
        out += f"; mCE {r['mce']:.1f}, relative mCE {_fmt(r.get('relative_mce'))} (baseline = 100)"
    out += f".</p><p class='note'>{html.escape(str(r.get('metric_note', '')))}</p>"
    sev = r.get("severities", [])
    rows = [[c] + [100 * a for a in accs] + ([r["ce"][c]] if r.get("ce") else [])
            for c, accs in r.get("accuracy", {}).items()]
    out += _table(["corruption"] + [f"acc s{s} (%)" for s in sev] + (["CE"] if r.get("ce") else []), rows)
    for name, alt in (("robustness.png", "accuracy heat map"), ("corruption_examples.png", "corruption examples")):
        if (folder / name).is_file():
            out += _img(folder / name, alt)
    return out


def _explain_section(e: dict, folder: Path) -> str:
    out = f"<h2>Explanations ({html.escape(e.get('method', ''))})</h2>"
    out += _table(["image", "explained class", "p", "predicted", "p"],
                  [[Path(i["file"]).name, i["target"], i["p_target"], i["predicted"], i["p_predicted"]]
                   for i in e.get("images", [])])
    png = folder / f"explain-{e.get('method')}.png"
    return out + (_img(png, f"{e.get('method')} maps") if png.is_file() else "")


def _signal_section(s: dict, folder: Path) -> str:
    out = "<h2>Signal propagation</h2><p class='note'>" + html.escape(str(s.get("input", ""))) + "</p>"
    rows = [[n["label"], n["state"], n["activation_rms"][0], n["activation_rms"][-1], n["gradient_rms"][0],
             n["gradient_rms"][-1]] for n in s.get("nets", [])]
    out += _table(["net", "state", "activation RMS (stem)", "activation RMS (last block)", "gradient RMS (stem)",
                   "gradient RMS (last block)"], rows)
    return out + (_img(folder / "signal.png", "signal propagation") if (folder / "signal.png").is_file() else "")


def _scaling_section(s: dict, folder: Path) -> str:
    length = f"{s['iterations']} iterations" if s.get("iterations") else f"{s.get('epochs')} epochs"
    out = (f"<h2>Data scaling ({html.escape(str(s.get('model')))} on {html.escape(str(s.get('data')))})</h2>"
           f"<p>Test accuracy against training-set size: nested stratified subsets of the "
           f"{s.get('full_train_images')} training images, {length} per fraction, seed {s.get('seed')}.</p>")
    rows = [[p.get("fraction"), p.get("train_images"), _pct(p.get("test_top1")), p.get("test_loss"), p.get("steps"),
             p.get("wall_seconds")] for p in s.get("points", [])]
    out += _table(["fraction", "train images", "test top-1", "test loss", "steps", "wall time (s)"], rows)
    png = folder / "scaling.png"
    return out + (_img(png, "test accuracy against data size") if png.is_file() else "")


def _deployment_section(run: Path) -> str:
    """The run's exported and quantized copies in their default places (or ``run`` itself when it is one):
    format, file size, the parity or int8 accuracy recorded when they were made, the int8 speed-up, and the top-1
    of ``reslab eval`` on the copy when it was run."""
    from reslab.deploy.artifact import artifact_card

    rows = []
    for folder in (run, run / "export", run / "quantized"):
        card = artifact_card(folder)
        if card is None:
            continue
        report = _load(folder / "quantize.json") or {}
        accuracy, file = report.get("accuracy", {}), folder / str(card["file"])
        recorded = (f"int8 {_pct(accuracy['top1_int8'])} vs fp32 {_pct(accuracy['top1_fp32'])}"
                    if "top1_int8" in accuracy else
                    f"max |logit diff| {card['parity']['max_abs_diff']:.1e}" if card.get("parity") else "")
        speedup = (report.get("speedup_vs_fp32_eager") or {}).get(f"int8_{report.get('runtime')}")  # the chosen
        evaluated = (_load(folder / "eval-test.json") or {}).get("top1")
        rows.append([folder.name if folder != run else ".", card["format"], file.name,
                     f"{file.stat().st_size / 2**20:.2f} MiB" if file.is_file() else "missing", recorded,
                     f"{speedup:.2f}x" if isinstance(speedup, (int, float)) else "", _pct(evaluated)])
    if not rows:
        return ""
    return ("<h2>Deployment</h2><p class='note'>Exported and quantized copies (<code>reslab export</code>, "
            "<code>reslab quantize</code>); <code>reslab eval FOLDER</code> fills the last column.</p>"
            + _table(["folder", "format", "file", "size", "recorded when made", "int8 / fp32 eager", "eval top-1"],
                     rows))


def _scaling_results(where: str | Path) -> tuple[dict, Path]:
    """(scaling.json, its folder) of a ``reslab scaling`` output folder, or of the JSON file itself."""
    path = Path(where)
    path = path / "scaling.json" if path.is_dir() else path
    data = _load(path)
    if data is None or "points" not in data:
        raise ValueError(f"--scaling {where}: no readable scaling.json there; give the --out folder of a "
                         "`reslab scaling` run")
    return data, path.parent


def build_report(run: str | Path, out: str | Path | None = None, title: str | None = None,
                 scaling: list[str | Path] | None = None) -> Path:
    """Write ``RUN/report.html`` (or ``out``) and return its path; ``scaling`` adds data-scaling results."""
    from reslab.evaluate.analyze import run_dir_of
    from reslab.train.rundir import atomic_write_text

    run_dir = run_dir_of(run)
    folder = run_dir / "analysis"
    parts = [_summary_section(run_dir), _curves_section(run_dir)]
    used: set[str] = set()
    sections = [("analyze.json", _analyze_section, ["confusion.png", "confused_pairs.png", "top_losses.png"]),
                ("calibration.json", _calibration_section, ["reliability.png"]),
                ("robustness.json", _robustness_section, ["robustness.png", "corruption_examples.png"]),
                ("signal.json", _signal_section, ["signal.png"]),
                ("scaling.json", _scaling_section, ["scaling.png"])]
    for name, render, pngs in sections:
        data = _load(folder / name)
        if data is not None:
            parts.append(render(data, folder))
            used.update(pngs)
    for path in sorted(folder.glob("explain-*.json")):
        data = _load(path)
        if data is not None:
            parts.append(_explain_section(data, folder))
            used.add(f"explain-{data.get('method')}.png")
    for where in scaling or []:
        parts.append(_scaling_section(*_scaling_results(where)))
    parts.append(_deployment_section(run_dir))
    others = [p for p in sorted(folder.glob("*.png")) if p.name not in used] if folder.is_dir() else []
    if others:
        parts.append("<h2>Other figures</h2>" + "".join(_img(p, p.stem) for p in others))
    if not folder.is_dir() and not scaling:
        parts.append("<p class='note'>No analyses yet: run <code>reslab analyze</code>, "
                     "<code>reslab robustness</code>, "
                     "<code>reslab explain</code> or <code>reslab signal --run</code> on this run.</p>")
    heading = html.escape(title or f"reslab report: {run_dir.name}")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{heading}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{heading}</h1>"
            f"<p class='note'>Run directory <code>{html.escape(str(run_dir))}</code>; generated {stamp}.</p>"
            + "".join(parts) + "</body></html>\n")
    target = Path(out) if out else run_dir / "report.html"
    atomic_write_text(target, page)
    return target
