"""Frozen features as they are: a linear probe and cosine k-nearest neighbours.

- Linear probe: logistic regression on standardised features (Razavian et al. 2014, "CNN Features off-the-shelf",
  §2.1 used a linear SVM on L2-normalised features; a multinomial logistic regression is the modern equivalent
  and gives probabilities). The network is not touched.
- kNN: cosine similarity to the training features, majority vote of the ``k`` nearest (ties: the class with the
  larger summed similarity), as in the kNN evaluation of self-supervised features (Wu et al. 2018, §3.4).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 C: float = 1.0, max_iter: int = 2000, seed: int = 0) -> float:
    """Top-1 accuracy on ``test`` of a logistic regression fitted on standardised ``train`` features."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # lbfgs on separable features: accuracy is what counts
        clf.fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


def cosine_neighbours(db: np.ndarray, queries: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Indices (Q, k) and cosine similarities (Q, k) of the ``k`` most similar database rows to each query."""
    d = torch.nn.functional.normalize(torch.as_tensor(db, dtype=torch.float32), dim=1)
    q = torch.nn.functional.normalize(torch.as_tensor(queries, dtype=torch.float32), dim=1)
    k = min(k, d.shape[0])
    idx, sim = [], []
    for start in range(0, q.shape[0], chunk):  # chunks keep the similarity matrix small for big databases
        s = q[start:start + chunk] @ d.T
        top = s.topk(k, dim=1)
        idx.append(top.indices)
        sim.append(top.values)
    return torch.cat(idx).numpy(), torch.cat(sim).numpy()


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int) -> np.ndarray:
    """Majority vote of the ``k`` cosine-nearest training samples (ties broken by summed similarity)."""
    idx, sim = cosine_neighbours(train_x, test_x, k)
    labels = np.asarray(train_y)[idx]  # (Q, k)
    n_classes = int(max(train_y.max(), 0)) + 1
    votes = np.zeros((len(labels), n_classes))
    np.add.at(votes, (np.arange(len(labels))[:, None], labels), 1.0)
    score_sum = np.zeros_like(votes)
    np.add.at(score_sum, (np.arange(len(labels))[:, None], labels), sim)
    return np.argmax(votes + 1e-6 * score_sum / (1 + np.abs(score_sum).max()), axis=1)


def knn_accuracy(train_x, train_y, test_x, test_y, k: int) -> float:
    return float((knn_predict(train_x, train_y, test_x, k) == np.asarray(test_y)).mean())


def probe(run: str | Path, data: str | None, *, knn: list[int] | None = None, layer: str = "pre_logits",
          C: float = 1.0, linear: bool = True, device: str = "auto", out: str | Path | None = None) -> dict[str, Any]:
    """``reslab probe``: linear-probe (and optional kNN) accuracy of a run's frozen features on ``data``.

    Fits on the train split of ``data``, reports on its test split; writes ``probe.json`` into the run (or ``out``).
    """
    from reslab.train.checkpoint import checkpoint_run_dir, find_checkpoint, load_model
    from reslab.train.engine import select_device
    from reslab.train.rundir import environment_info, write_json
    from reslab.transfer.features import load_data_as_model, split_features

    dev = select_device(device)
    model, card = load_model(run, device=dev)
    splits = load_data_as_model(card, data)
    train_x, train_y = split_features(model, card, splits.train, layer=layer, device=dev)
    test_x, test_y = split_features(model, card, splits.test, layer=layer, device=dev)
    result: dict[str, Any] = {"run": str(find_checkpoint(run)), "data": data or card["data"], "layer": layer,
                              "dim": int(train_x.shape[1]), "classes": len(splits.classes),
                              "train_count": int(len(train_y)), "test_count": int(len(test_y))}
    if linear:
        result["linear_top1"] = linear_probe(train_x, train_y, test_x, test_y, C=C)
        result["linear_C"] = C
    for k in knn or []:
        result[f"knn{k}_top1"] = knn_accuracy(train_x, train_y, test_x, test_y, k)
    result["environment"] = environment_info(str(dev))
    ckpt = find_checkpoint(run)
    run_dir = checkpoint_run_dir(ckpt)
    target = Path(out) if out else run_dir / "probe.json"
    write_json(target, result)
    result["written_to"] = str(target)
    return result
