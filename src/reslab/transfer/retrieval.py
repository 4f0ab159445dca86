"""Matryoshka evaluation: how good are the first ``m`` features of an embedding, for each nested size ``m``?

Matryoshka Representation Learning (Kusupati et al. 2022) trains one embedding whose prefixes are useful on their
own (``reslab train --matryoshka 8,16,32,64``; objectives.Matryoshka, MRL-E). Their evaluation, reproduced here
at small scale, reads the truncated embedding three ways (§4.1 linear classification, §4.3 retrieval):
- retrieval mAP@10: test images query the train images by cosine similarity; a retrieved image is relevant when
  it has the query's class; AP@10 = (1 / min(10, R)) * sum_{i<=10} precision@i * rel_i, R = relevant images;
- top-1 kNN accuracy: the class of the single nearest training image (cosine);
- linear-probe accuracy: logistic regression on the standardised truncated features (probe.linear_probe).
The same numbers for baseline runs: a run whose embedding is narrower than the largest ``m`` is an independently trained
low-dimensional model (reported at its own width only); a wider one is truncated like the MRL run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from reslab.transfer.probe import cosine_neighbours, linear_probe


def map_at_k(db_y: np.ndarray, query_y: np.ndarray, neighbours: np.ndarray, k: int = 10) -> float:
    """Mean over queries of AP@k, the class being the relevance label (see the module docstring)."""
    rel = (np.asarray(db_y)[neighbours[:, :k]] == np.asarray(query_y)[:, None]).astype(np.float64)  # (Q, k)
    precision = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    n_relevant = np.bincount(np.asarray(db_y), minlength=int(max(db_y.max(), query_y.max())) + 1)[query_y]
    denom = np.minimum(rel.shape[1], np.maximum(n_relevant, 1))
    return float(((precision * rel).sum(1) / denom).mean())


def truncated_scores(train_x, train_y, test_x, test_y, dim: int, *, k: int = 10, probe: bool = True) -> dict:
    """mAP@k, 1-NN accuracy and linear-probe accuracy of the first ``dim`` features."""
    a, b = train_x[:, :dim], test_x[:, :dim]
    nn_idx, _ = cosine_neighbours(a, b, k)
    out = {"dim": int(dim), f"map@{k}": map_at_k(train_y, test_y, nn_idx, k),
           "knn1_top1": float((np.asarray(train_y)[nn_idx[:, 0]] == test_y).mean())}
    if probe:
        out["linear_top1"] = linear_probe(a, train_y, b, test_y)
    return out


def _run_label(run: str | Path) -> str:
    from reslab.train.checkpoint import checkpoint_run_dir

    return checkpoint_run_dir(Path(run).resolve()).name


def retrieve(run: str | Path, data: str | None, *, dims: Sequence[int], baselines: Sequence[str | Path] = (),
             out: str | Path | None = None, device: str = "auto", k: int = 10, probe: bool = True) -> dict[str, Any]:
    """``reslab retrieve``: per-dimension retrieval and probe scores of ``run`` and ``baselines`` on ``data``;
    writes ``retrieval.json`` and ``retrieval.png`` into ``out`` (default RUN/retrieval)."""
    from reslab.train.checkpoint import checkpoint_run_dir, find_checkpoint, load_model
    from reslab.train.engine import select_device
    from reslab.train.rundir import environment_info, write_json
    from reslab.transfer.features import load_data_as_model, split_features

    dims = sorted(int(d) for d in dims)
    if not dims or dims[0] < 1:
        raise ValueError(f"--dims {dims}: give positive sizes, e.g. 8,16,32,64")
    dev = select_device(device)
    rows = []
    for role, r in [("matryoshka", run)] + [("baseline", b) for b in baselines]:
        model, card = load_model(r, device=dev)
        splits = load_data_as_model(card, data)
        train_x, train_y = split_features(model, card, splits.train, device=dev)
        test_x, test_y = split_features(model, card, splits.test, device=dev)
        width = train_x.shape[1]
        if role == "matryoshka" and dims[-1] > width:
            raise ValueError(f"--dims {dims}: {run} has a {width}-dimensional embedding")
        if role == "matryoshka" or width >= dims[-1]:
            at = [d for d in dims if d <= width]  # the MRL run, or a wide baseline read truncated
        else:
            at = [width]  # an independently trained low-dimensional model: its own width only
        kind = role if role == "matryoshka" else ("truncated" if len(at) > 1 or width >= dims[-1] else "independent")
        scores = [truncated_scores(train_x, train_y, test_x, test_y, d, k=k, probe=probe) for d in at]
        rows.append({"role": role, "kind": kind, "run": str(r), "label": _run_label(r), "model": card["model"],
                     "train_matryoshka": _matryoshka_of(r), "embedding_dim": int(width), "scores": scores,
                     "train_count": int(len(train_y)), "test_count": int(len(test_y))})
    result = {"data": data or _data_of(run), "dims": dims, "k": k, "runs": rows, "environment": environment_info(str(dev))}
    ckpt = find_checkpoint(run)
    run_dir = checkpoint_run_dir(ckpt)
    out = Path(out) if out else run_dir / "retrieval"
    out.mkdir(parents=True, exist_ok=True)
    result["figures"] = [str(plot_retrieval(result, out / "retrieval.png"))]
    write_json(out / "retrieval.json", result)
    result["written_to"] = str(out / "retrieval.json")
    return result


def _data_of(run) -> str:
    from reslab.train.checkpoint import find_checkpoint, load_checkpoint

    return load_checkpoint(find_checkpoint(run), load_train_state=False).manifest.get("data", "?")


def _matryoshka_of(run) -> list[int]:
    import yaml

    p = Path(run)
    for cand in (p / "config.yaml", p.parent.parent / "config.yaml"):
        if cand.is_file():
            return list((yaml.safe_load(cand.read_text()) or {}).get("matryoshka") or [])
    return []


def plot_retrieval(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [f"map@{result['k']}", "knn1_top1"] + (["linear_top1"] if "linear_top1" in
                                                      result["runs"][0]["scores"][0] else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    independent = [r for r in result["runs"] if r["kind"] == "independent"]
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        for r in result["runs"]:
            if r in independent:
                continue
            xs = [s["dim"] for s in r["scores"]]
            ys = [100 * s[metric] for s in r["scores"]]
            style = "-o" if r["role"] == "matryoshka" else "--s"
            ax.plot(xs, ys, style, label=f"{r['label']} ({'MRL' if r['train_matryoshka'] else 'truncated'})")
        if independent:
            xs = [r["scores"][0]["dim"] for r in independent]
            ys = [100 * r["scores"][0][metric] for r in independent]
            ax.plot(sorted(xs), [y for _, y in sorted(zip(xs, ys))], ":^", color="k", label="independent low-dim")
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["dims"], [str(d) for d in result["dims"]])
        ax.set_xlabel("embedding size m")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"Matryoshka evaluation on {result['data']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
