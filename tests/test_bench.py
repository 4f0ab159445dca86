"""Speed paths keep accuracy, and the benchmarks run and write well-formed results.

Timings never decide pass or fail here (the machines running the suite are shared); the tests check that each
optimisation trains to the same accuracy as its absence on a short digits run, that the fast inference path
agrees with eager fp32, that the speed recipes run, and that ``reslab bench ...`` writes complete JSON.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reslab.train import TrainConfig, resolve_config, train

# A short digits run at the native 8x8 size: a few seconds per run on 2 cores.
DIGITS = dict(model="resnet20", data="digits", batch_size=64, epochs=3, lr=0.1, optimizer="nesterov",
              schedule="onecycle", warmup_iters=10, label_smoothing=0.1, crop_padding=1, flip=False,
              progress=False, eval_every=3, threads=1)


def digits_accuracy(tmp_path, name, **overrides):
    summary = train(TrainConfig(**{**DIGITS, **overrides}, out=str(tmp_path / name)))
    return summary.final["test_top1"]


@pytest.fixture(scope="module")
def fp32_accuracy(tmp_path_factory):
    return digits_accuracy(tmp_path_factory.mktemp("fp32"), "run", amp="off", channels_last=True)


@pytest.mark.parametrize("change", [dict(amp="bf16", channels_last=True), dict(amp="off", channels_last=False)],
                         ids=["bf16-autocast", "channels-last-off"])
def test_optimisation_keeps_accuracy(tmp_path, fp32_accuracy, change):
    """bf16 autocast and channels_last are pure speed choices: accuracy stays within run-to-run noise."""
    accuracy = digits_accuracy(tmp_path, "run", **change)
    assert fp32_accuracy > 0.8 and accuracy > 0.8
    assert abs(accuracy - fp32_accuracy) < 0.06


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RESLAB_TEST_COMPILE"),
                    reason="torch.compile of a training step takes 1-4 minutes on a 2-core CPU (inductor builds "
                           "C++ kernels for forward and backward); set RESLAB_TEST_COMPILE=1 to run it")
def test_compile_keeps_accuracy(tmp_path, fp32_accuracy):
    accuracy = digits_accuracy(tmp_path, "run", amp="off", compile=True)
    assert abs(accuracy - fp32_accuracy) < 0.06


def test_fast_inference_path_agrees_with_eager():
    from reslab.bench.infer_speed import agreement, eager_fp32
    from reslab.evaluate.inference import fast_inference_model
    from reslab.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding has something to fold
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(16, 3, 32, 32)
    ref = eager_fp32(model)(x)
    fp32 = fast_inference_model(model, x, bf16=False)(x)
    assert torch.allclose(fp32, ref, atol=1e-3, rtol=1e-3)
    bf16 = agreement(ref, fast_inference_model(model, x)(x), None)
    assert bf16["max_abs_logit_diff"] < 0.1 * float(ref.abs().max()) + 0.05


@pytest.mark.parametrize("recipe", ["fast", "fast94", "fast-gpu"])
def test_speed_recipes_run(tmp_path, recipe):
    """Each speed recipe trains a couple of steps on the CPU (fast-gpu without compile: see the compile test)."""
    cfg = resolve_config({"data": "digits", "iterations": 2, "batch_size": 32, "eval_batch_size": 256,
                          "progress": False, "compile": False, "threads": 1, "out": str(tmp_path / "run")}, recipe)
    assert cfg.recipe == recipe
    summary = train(cfg)
    assert summary.status == "finished" and summary.steps == 2
    assert 0 <= summary.final["test_top1"] <= 1


# ------------------------------------------------------------------------------------------ the bench commands


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A two-class 32x32 JPEG ImageFolder with train/ and test/ (class b has a white left half)."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("test", 8)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n // 2):
                arr = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
                if c == "b":
                    arr[:, :16] = 255
                Image.fromarray(arr).save(root / split / c / f"{i}.jpg")
    return root


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "cache"))


def read_result(path):
    result = json.loads(open(path).read())
    assert {"benchmark", "command", "environment", "loadavg_before", "loadavg_after"} <= result.keys()
    assert {"torch", "cpu", "date"} <= result["environment"].keys()
    return result


@pytest.mark.parametrize("isolate", [True, False])
def test_bench_train_writes_json(tmp_path, tiny_folder, isolate):
    from reslab.bench.train_speed import bench_train
    from reslab.train.engine import cpu_has_fast_bf16

    variants = [("fp32", dict(batch_size=8, amp=False, channels_last=False)),
                ("bf16 cl", dict(batch_size=8, amp=True, channels_last=True))]
    out = tmp_path / "train.json"
    result = bench_train(str(tiny_folder), iterations=2, warmup=1, repeats=1, reference_iterations=2,
                         reference_workers=0, reference_batch_size=8,
                         configs={"reslab b8": {"batch_size": 8, "eval_batch_size": 64}},
                         ablation=variants, ablation_images=16, threads=1, out=str(out), isolate=isolate)
    saved = read_result(out)
    assert saved["isolated_processes"] is isolate
    assert [r["pipeline"] for r in saved["rows"]] == ["reference", "reslab b8"]
    for row in saved["rows"]:
        assert row["images_per_s"] > 0 and row["fraction_of_peak"] > 0
    # the peak is in the precision the loop trains in: bf16 only where the CPU has it natively
    assert saved["peak_dtype"] == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert saved["peak_matmul_flops"] == saved[f"peak_{saved['peak_dtype']}_matmul_flops"] > 0
    assert saved["training_flops_per_image"] > 0
    assert [r["variant"] for r in saved["ablation"]] == ["fp32", "bf16 cl"]
    assert result["path"] == str(out)


def test_isolated_sample_runs_in_a_fresh_process_and_reports_its_failure(tiny_folder):
    import os

    from reslab.bench.train_speed import run_isolated

    options = dict(data=str(tiny_folder), iterations=1, warmup=1, batch_size=8, workers=0)
    first = run_isolated("reference_sample", threads=1, **options)
    second = run_isolated("reference_sample", threads=1, **options)
    assert first["images_per_s"] > 0 and first["process"]["threads"] == 1
    assert len({os.getpid(), first["process"]["pid"], second["process"]["pid"]}) == 3  # a new process each
    with pytest.raises(RuntimeError, match="no_such_function"):
        run_isolated("no_such_function")


@pytest.mark.parametrize("bf16", [True, False])
def test_ablation_times_bf16_only_where_the_cpu_has_it(bf16):
    from reslab.bench.train_speed import ablation_variants

    rows = ablation_variants(bf16, compile=True)
    assert rows[0][1] == dict(batch_size=128, amp=False, channels_last=False)  # the baseline: plain fp32
    assert any(name == "+ bf16 autocast" for name, _ in rows) is bf16
    assert {opts["amp"] for _, opts in rows[1:]} == {bf16}
    assert rows[-1][1]["compile"] and len({name for name, _ in rows}) == len(rows)


def test_bench_infer_writes_json(tmp_path, tiny_folder):
    from reslab.bench.infer_speed import bench_infer

    out = tmp_path / "infer.json"
    bench_infer(models={"resnet20": 32}, batch=4, repeats=1, data=str(tiny_folder), check_count=16, threads=1,
                out=str(out))
    saved = read_result(out)
    (model,) = saved["models"]
    paths = [r["path"] for r in model["rows"]]
    assert paths[:2] == ["eager fp32", "onnxruntime fp32"] and model["best"] in paths and model["default"] in paths
    for row in model["rows"]:
        assert row["latency_ms"] > 0 and row["images_per_s"] > 0 and 0 <= row["top1_agreement"] <= 1
    assert model["rows"][1]["top1_agreement"] == 1.0  # ONNX Runtime fp32 computes the same function


def test_bench_data_writes_json(tmp_path, tiny_folder):
    from reslab.bench.data_speed import bench_data

    out = tmp_path / "data.json"
    bench_data(str(tiny_folder), workers=1, repeats=1, batch_size=8, loader_images=64, reference_images=16,
               reference_batch_size=8, reference_workers=0,
               threads=1, out=str(out))
    saved = read_result(out)
    assert saved["decode"]["images"] == 40
    assert all(row["images_per_s"] > 0 for row in saved["loader"])


def test_bench_time_to_accuracy_writes_json(tmp_path):
    from reslab.bench.time_to_accuracy import bench_time_to_accuracy

    out = tmp_path / "tta.json"
    bench_time_to_accuracy("fast", seeds=2, data="digits", threads=1, out=str(out), iterations=3, batch_size=32,
                           eval_batch_size=256)
    saved = read_result(out)
    assert len(saved["runs"]) == 2 and saved["target_top1"] == 0.90 and saved["met"] in (True, False)
    assert 0 <= saved["test_top1_mean"] <= 1 and saved["train_seconds_mean"] > 0


def test_time_to_accuracy_warmup_run_is_untimed(tmp_path, capsys):
    from reslab.bench.time_to_accuracy import bench_time_to_accuracy, print_time_to_accuracy

    result = bench_time_to_accuracy("fast", seeds=1, data="digits", threads=1, out=str(tmp_path / "tta.json"),
                                    out_root=str(tmp_path / "runs"), warmup_iterations=2, iterations=3,
                                    batch_size=32, eval_batch_size=256, val_fraction=0.2)
    assert result["warmup"]["iterations"] == 2 and result["warmup"]["wall_seconds"] > 0
    assert Path(result["warmup"]["run_dir"]).parent == tmp_path / "runs" / "warmup"
    assert [r["steps"] for r in result["runs"]] == [3]  # the timed seed is the whole run, not the warm-up
    print_time_to_accuracy(result)
    out = capsys.readouterr().out
    assert "untimed warm-up run first: 2 steps" in out and "val top-1" in out  # a validation split is shown
    with pytest.raises(ValueError, match="--warmup-iterations"):
        bench_time_to_accuracy("fast", seeds=1, data="digits", warmup_iterations=-1)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RESLAB_TEST_COMPILE"), reason="torch.compile: see test_compile_keeps_accuracy")
def test_time_to_accuracy_warmup_builds_the_compiled_graphs(tmp_path, monkeypatch):
    """After the warm-up run, the timed seeds compile nothing new (dynamo reuses the graphs for a new model)."""
    from torch._dynamo.utils import counters

    from reslab.bench import time_to_accuracy

    graphs_after = []
    real_run_seed = time_to_accuracy.run_seed

    def spy(*args, **kwargs):
        result = real_run_seed(*args, **kwargs)
        graphs_after.append(counters["stats"]["unique_graphs"])
        return result

    monkeypatch.setattr(time_to_accuracy, "run_seed", spy)
    time_to_accuracy.bench_time_to_accuracy(
        "fast", seeds=2, data="digits", threads=2, out=str(tmp_path / "tta.json"), warmup_iterations=2,
        iterations=2, batch_size=32, eval_batch_size=256, compile=True, amp="off")
    assert graphs_after[0] > 0 and graphs_after[1:] == [graphs_after[0]] * 2


def test_bench_cli_parses(tmp_path):
    from reslab.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "train", "--data", "x", "--iterations", "5", "--compile"])
    assert args.iterations == 5 and args.compile and callable(args.func)
    args = parser.parse_args(["bench", "time-to-accuracy", "--recipe", "fast94", "--seeds", "3"])
    assert args.recipe == "fast94" and args.seeds == 3 and args.warmup_iterations == 0
    args = parser.parse_args(["bench", "time-to-accuracy", "--recipe", "fast-gpu", "--warmup-iterations", "20"])
    assert args.warmup_iterations == 20


# ------------------------------------------------------------------------ benchmarks/peak_bounds.py (the ceilings)


def benchmark_script(name: str):
    """The module of ``benchmarks/<name>.py`` (a script folder, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peak_bounds():
    return benchmark_script("peak_bounds")


def test_peak_bounds_turn_each_target_into_flops(peak_bounds):
    """Target 1 needs 5x the reference's training FLOP/s (3 passes x 2 FLOPs a multiply-add), target 2 the
    recipes' total training FLOPs over their budgets, Issue #7 4x fp32 eager's inference FLOP/s; each against
    its peak."""
    peaks = {"fp32": 100e9, "int8": 200e9}
    recipes = [{"name": "fast", "macs": 50_000_000, "epochs": 10, "budget_s": 300},
               {"name": "fast94", "macs": 100_000_000, "epochs": 14, "budget_s": 1800}]
    rows = peak_bounds.target_rows(peaks, "fp32", reference_images_per_s=300, eager_images_per_s=1000,
                                   resnet20_macs=40_000_000, recipes=recipes)
    assert [r["target"].split()[0] for r in rows] == ["#3.1", "#3.2", "#3.2", "#7"]
    assert "`fast94` (14 epochs) in 1800 s" in rows[2]["target"]
    assert rows[0]["needs"] == pytest.approx(5 * 300 * 240e6)                # 360 GFLOP/s
    assert rows[0]["needs_of_peak"] == pytest.approx(3.6) and not rows[0]["reachable"]
    assert rows[1]["needs"] == pytest.approx(10 * 50_000 * 300e6 / 300)      # 500 GFLOP/s
    assert rows[2]["needs"] == pytest.approx(14 * 50_000 * 600e6 / 1800)     # 233 GFLOP/s
    assert rows[3]["needs"] == pytest.approx(4 * 1000 * 80e6) and rows[3]["peak"] == 200e9
    assert rows[3]["needs_of_peak"] == pytest.approx(1.6)
    # a machine 4.5x as fast reaches the first target (360 of 450 GFLOP/s), not the second (500)
    fast_rows = peak_bounds.target_rows({"fp32": 450e9, "int8": 1e12}, "fp32", reference_images_per_s=300,
                                        eager_images_per_s=1000, resnet20_macs=40_000_000, recipes=recipes)
    assert [r["reachable"] for r in fast_rows] == [True, False, True, True]


def test_int8_peak_is_measured_per_engine():
    """The int8 peak is a rate for each quantized engine this PyTorch has, and the engine in use before is
    restored (the quantize report's int8 ceiling relies on both)."""
    from reslab.bench import int8_matmul_peak

    before = torch.backends.quantized.engine
    peaks = int8_matmul_peak(n=128, repeats=1)
    assert peaks and set(peaks) <= {"onednn", "x86"}
    assert all(np.isfinite(v) and v > 1e6 for v in peaks.values())
    assert torch.backends.quantized.engine == before


def test_tta_views_schemes_match_reslab_tta():
    """benchmarks/tta_views.py: its airbench scheme is exactly reslab's `--tta-flip --tta-shift 1`, its flip scheme
    `--tta-flip`, on a real network's logits (so the richer schemes it reports are compared like for like)."""
    from reslab.models import create_model
    from reslab.train.engine import tta_logits

    tta_views = benchmark_script("tta_views")
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)
    logits, labels = tta_views.view_logits(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert torch.equal(labels, y) and len(logits) == 18
    schemes = tta_views.combinations(logits)
    with torch.no_grad():
        assert torch.allclose(schemes["none"], model(x), atol=1e-5)
        assert torch.allclose(schemes["flip (2 views)"], tta_logits(model, x, flip=True), atol=1e-5)
        airbench = schemes["flip + shift 1, airbench (6 views; reslab's --tta-shift 1)"]
        assert torch.allclose(airbench, tta_logits(model, x, flip=True, shift=1), atol=1e-5)
        assert not torch.allclose(schemes["flip + 3x3 grid, equal weights (18 views)"], airbench, atol=1e-5)
