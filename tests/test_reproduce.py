"""`reslab reproduce he2016-cifar` end to end on a tiny budget and generated CIFAR-like data."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reslab.cli import main
from reslab.reproduce.he2016 import BUDGETS, run_configs
from reslab.train.schedules import lr_multiplier


def make_folder(root, n_train=12, n_test=6, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                img[:, :, c % 3] += np.uint8(120 + 40 * (c // 3))  # a colour cue decides the class
                Image.fromarray(img).save(d / f"{i}.jpg")
    return root


def test_reproduce_tiny_end_to_end(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "repro"
    from reslab.reproduce.he2016 import reproduce_he2016_cifar

    result = reproduce_he2016_cifar(str(data), depths=[20, 32], plain=True, seeds=2, out=out,
                                    overrides={"iterations": 6, "batch_size": 16, "progress": False,
                                               "eval_every": 1, "train_fraction": 1.0}, command="test")
    table = json.loads((out / "table.json").read_text())
    names = [r["network"] for r in table["rows"]]
    assert names == ["plain20", "plain32", "resnet20", "resnet32"]
    res20 = table["rows"][2]
    assert res20["paper_test_error"] == 8.75 and res20["paper_params"] == "0.27M" and res20["seeds"] == [0, 1]
    assert 0 <= res20["test_error_mean"] <= 100 and res20["iterations"] == 6
    md = (out / "table.md").read_text()
    assert "| resnet32 |" in md and "8.75" in md and "7.51" in md
    png = (out / "figure6.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert set(result["files"]) == {str(out / n) for n in ("table.md", "table.json", "figure6.png")}
    # A second invocation finds every run finished and only rewrites the results.
    mtime = (out / "runs/resnet20-seed0/summary.json").stat().st_mtime
    assert main(["reproduce", "he2016-cifar", "--data", str(data), "--depths", "20,32", "--seeds", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert (out / "runs/resnet20-seed0/summary.json").stat().st_mtime == mtime


def test_full_budget_is_the_papers_recipe():
    runs = run_configs([20, 110], plain=False, budget=BUDGETS["full"], seeds=1, data="cifar10:/x", out=Path("/x"))
    cfg20, cfg110 = runs[0][2], runs[1][2]
    assert cfg20.iterations == 64000 and cfg20.milestones == [32000, 48000] and cfg20.batch_size == 128
    assert cfg20.momentum == 0.9 and cfg20.weight_decay == 1e-4 and cfg20.crop_padding == 4 and cfg20.flip
    lr = lambda c, s: c.lr * lr_multiplier(s, c.iterations, c)  # noqa: E731
    assert [lr(cfg20, s) for s in (0, 32000, 48000)] == [0.1, 0.1 * 0.1, 0.1 * 0.1 * 0.1]
    assert lr(cfg110, 0) == 0.01 and lr(cfg110, 400) == 0.1  # resnet110 warm-up (He et al. 2016 §4.2)


def test_short_budget_keeps_the_schedule_shape():
    runs = run_configs([56], plain=True, budget=BUDGETS["short"], seeds=1, data="d", out=Path("/x"))
    for _, _, cfg in runs:
        assert cfg.milestones == [cfg.iterations // 2, cfg.iterations * 3 // 4]
        # the paper's recipe otherwise; a stratified subset keeps the CPU budget
        assert cfg.batch_size == 128 and cfg.lr == 0.1 and cfg.train_fraction == BUDGETS["short"].train_fraction
        # every network warms up linearly over the budget's first iterations, then follows the steps
        lr = lambda s: cfg.lr * lr_multiplier(s, cfg.iterations, cfg)  # noqa: E731
        warm = BUDGETS["short"].warmup_iters
        assert cfg.warmup_iters == warm and lr(0) == pytest.approx(0.1 / warm) and lr(warm) == 0.1
        assert lr(cfg.iterations // 2) == pytest.approx(0.01)
    assert [n for n, _, _ in runs] == ["plain56", "resnet56"]


def test_a_short_final_epoch_is_folded_into_the_one_before():
    from reslab.reproduce.he2016 import merged_epochs

    records = [{"epoch": 1, "step": 78, "train_top1": 0.5}, {"epoch": 2, "step": 156, "train_top1": 0.8},
               {"epoch": 3, "step": 158, "train_top1": 0.0, "test_top1": 0.7}]  # 2 unlucky batches at the end
    merged = merged_epochs(records)
    assert [m["step"] for m in merged] == [78, 158] and merged[-1]["test_top1"] == 0.7
    assert merged[-1]["train_top1"] == pytest.approx(0.8 * 78 / 80)  # weighted by steps, not the last 2 batches
    assert merged_epochs(records[:2]) == [{**records[0], "steps": 78}, {**records[1], "steps": 78}]
