"""Training curves of a run (loss and error against epochs), drawn from its metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

from reslab.train.rundir import read_jsonl


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records to plot")
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], "--", label="train")
    ax_err.plot(epochs, [100 * (1 - r["train_top1"]) for r in records], "--", label="train")
    for split in ("val", "test"):
        pts = [(r["epoch"], r[f"{split}_loss"], r[f"{split}_top1"]) for r in records if f"{split}_top1" in r]
        if pts:
            e, loss, top1 = zip(*pts)
            ax_loss.plot(e, loss, "-o", ms=3, label=split)
            ax_err.plot(e, [100 * (1 - t) for t in top1], "-o", ms=3, label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_err.set(xlabel="epoch", ylabel="top-1 error (%)", title="error")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(run_dir.name, fontsize=9)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
