"""The training loop on real data (scikit-learn's handwritten digits): it learns, it records the run, it resumes
exactly, and its schedules, recipes and objectives do what the papers say."""
import json

import pytest
import torch
from safetensors.torch import load_file

from reslab.train import TrainConfig, resolve_config, train
from reslab.train.config import ConfigError, load_config_file
from reslab.train.engine import Lookahead, TrainingError
from reslab.train.objectives import linear_cka
from reslab.train.schedules import lr_multiplier, progressive_size

FAST = dict(model="resnet20", data="digits", image_size=16, batch_size=64, progress=False, flip=False,
            crop_padding=2, amp="off")


def weights(run_dir, name="last"):
    return load_file(str(run_dir / "checkpoints" / name / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_default_recipe_learns_digits(tmp_path):
    """The README's default run, shortened: the quick recipe on digits is far above chance (10%)."""
    cfg = resolve_config({"epochs": 6, "out": str(tmp_path / "run"), "progress": False}, "quick")
    summary = train(cfg)
    assert summary.status == "finished"
    assert summary.final["test_top1"] > 0.85
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.json", "curves.png"):
        assert (run / name).is_file(), name
    for ckpt in ("last", "best"):
        assert (run / "checkpoints" / ckpt / "model.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 7))
    assert {"train_loss", "train_top1", "test_top1", "test_top5", "lr", "images_per_s", "seconds"} <= records[-1].keys()
    saved = json.loads((run / "summary.json").read_text())
    assert saved["params"] == 269_434  # resnet20 with a 1-channel stem
    assert saved["environment"]["torch"] == torch.__version__
    assert load_config_file(run / "config.yaml").epochs == 6


@pytest.mark.parametrize("augment", [{}, {"flip": True, "flip_mode": "alternate"}, {"optimizer": "muon"},
                                     {"progressive_sizes": [8, 12, 16]}, {"lookahead_every": 4}])
def test_resume_is_exact(tmp_path, augment):
    """Two epochs straight equal one epoch + interruption + resume, bit for bit (alternating flips too,
    which depend on the epoch; Muon's momentum buffers and group learning rates too; progressive resizing,
    whose image size depends on the step; lookahead's slow weights, interrupted between two syncs)."""
    cfg = TrainConfig(**{**FAST, **augment}, epochs=2, schedule="onecycle", warmup_iters=5, lr=0.05)
    train(cfg, out=str(tmp_path / "straight"))

    def interrupt(step):
        if step == 30:  # mid-way through epoch 2 (22 steps per epoch)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=str(tmp_path / "resumed"), on_step=interrupt)
    summary = train(resume=tmp_path / "resumed")
    assert summary.steps == 44
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert load_config_file(tmp_path / "resumed" / "config.yaml").flip_mode == cfg.flip_mode


def test_resume_extends_epochs_exactly(tmp_path):
    """1 epoch, then --resume --epochs 2, equals 2 epochs straight (constant lr schedule)."""
    cfg = TrainConfig(**FAST, epochs=2, schedule="constant", lr=0.05)
    train(cfg, out=str(tmp_path / "straight"))
    train(cfg, out=str(tmp_path / "pieces"), epochs=1)
    train(resume=tmp_path / "pieces", epochs=2)
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "pieces"))


def test_out_dir_with_a_run_is_not_overwritten(tmp_path):
    cfg = TrainConfig(**FAST, epochs=1, out=str(tmp_path / "run"))
    train(cfg)
    with pytest.raises(TrainingError, match="already holds a run"):
        train(cfg)


def test_validation_split_selects_best(tmp_path):
    summary = train(TrainConfig(**FAST, epochs=2, val_fraction=0.2, out=str(tmp_path / "run")))
    assert "val_top1" in summary.final and "val_top1" in summary.best
    manifest = json.loads((tmp_path / "run/checkpoints/best/manifest.json").read_text())
    assert manifest["metrics"]["val_top1"] == summary.best["val_top1"]


def test_he2016_schedule_steps_at_paper_iterations():
    """lr 0.1, /10 at 32k and 48k, stop at 64k (He et al. 2016 §4.2); resnet110 warms up at 0.01."""
    cfg = resolve_config({}, "he2016-cifar")
    lr = lambda s: cfg.lr * lr_multiplier(s, cfg.iterations, cfg)  # noqa: E731
    assert cfg.iterations == 64000 and cfg.batch_size == 128
    assert lr(0) == pytest.approx(0.1) and lr(31999) == pytest.approx(0.1)
    assert lr(32000) == pytest.approx(0.01) and lr(47999) == pytest.approx(0.01)
    assert lr(48000) == pytest.approx(0.001) and lr(63999) == pytest.approx(0.001)
    cfg110 = resolve_config({"model": "resnet110"}, "he2016-cifar")
    assert cfg110.lr * lr_multiplier(399, 64000, cfg110) == pytest.approx(0.01)
    assert cfg110.lr * lr_multiplier(400, 64000, cfg110) == pytest.approx(0.1)


def test_onecycle_and_cosine_shapes():
    cfg = TrainConfig(schedule="onecycle", warmup_iters=10)
    m = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert m[9] == pytest.approx(1.0) and m[0] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(m[10:], m[11:])) and m[-1] < 0.02
    cos = TrainConfig(schedule="cosine")
    assert lr_multiplier(50, 100, cos) == pytest.approx(0.5)


@pytest.mark.parametrize("flags, message", [
    ({"lr": "-1"}, "--lr"), ({"batch_size": "0"}, "--batch-size"), ({"model": "resnet21"}, "unknown model"),
    ({"schedule": "linear"}, "--schedule"), ({"epochs": "two"}, "epochs"),
])
def test_bad_flags_name_the_option(flags, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(flags)


def test_bad_recipe_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config({}, str(bad))
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown option"):
        resolve_config({}, str(bad))
    with pytest.raises(ConfigError, match="unknown recipe"):
        resolve_config({}, "no-such-recipe")


def test_flags_override_recipe():
    cfg = resolve_config({"lr": "0.3", "epochs": "3"}, "quick")
    assert cfg.lr == 0.3 and cfg.epochs == 3 and cfg.recipe == "quick" and cfg.flip is False


def test_ema_and_label_smoothing_run(tmp_path):
    """EMA weights are saved beside the raw ones, differ from them, and are what evaluation uses."""
    cfg = TrainConfig(**FAST, epochs=4, schedule="onecycle", warmup_iters=10, label_smoothing=0.1)
    summary = train(cfg, out=str(tmp_path / "r"), ema_decay=0.9)
    ema = load_file(str(tmp_path / "r/checkpoints/last/ema.safetensors"))
    raw = weights(tmp_path / "r")
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())
    assert summary.final["test_top1"] > 0.85
    from reslab.evaluate import evaluate

    assert evaluate(tmp_path / "r")["top1"] == pytest.approx(summary.final["test_top1"], abs=1e-6)


@pytest.mark.parametrize("total_steps", [4, 5])
def test_lookahead_follows_its_update_rule(total_steps):
    """Every k steps: slow <- d*slow + (1-d)*fast with d = peak*(t/T)^3, fast <- slow; after the last step
    (a sync step or not) the model keeps the slow weights, BN running statistics included; between syncs the
    fast weights are left alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    la = Lookahead(model, every=2, peak_decay=0.8, total_steps=total_steps)
    slow = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for step in range(1, total_steps + 1):
        with torch.no_grad():
            for v in model.state_dict().values():
                if v.is_floating_point():
                    v.add_(torch.randn_like(v))  # an optimiser step (and new BN statistics)
        fast = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        la.after_step(model, step)
        now = model.state_dict()
        if step % 2 == 0:
            d = 0.8 * (step / total_steps) ** 3
            slow = {k: d * slow[k] + (1 - d) * fast[k] for k in slow}
        expected = slow if step % 2 == 0 or step == total_steps else fast
        for k in expected:
            torch.testing.assert_close(now[k], expected[k])
    assert la.decay(total_steps) == pytest.approx(0.8) and la.decay(0) == 0


def test_lookahead_trains_and_refuses_ema(tmp_path):
    summary = train(TrainConfig(**FAST, epochs=4, schedule="onecycle", warmup_iters=10, lookahead_every=5),
                    out=str(tmp_path / "r"))
    assert summary.final["test_top1"] > 0.85
    with pytest.raises(ConfigError, match="--lookahead-every"):
        TrainConfig(**FAST, lookahead_every=5, ema_decay=0.9).validate()


def test_bf16_autocast_trains_like_fp32(tmp_path):
    """The speed path (bf16 autocast + channels_last) learns as well as fp32 on a short run."""
    accs = {}
    for amp in ("off", "bf16"):
        s = train(TrainConfig(**{**FAST, "amp": amp}, epochs=4, schedule="onecycle", warmup_iters=10,
                              lr=0.1, out=str(tmp_path / amp)))
        accs[amp] = s.final["test_top1"]
    assert accs["bf16"] > 0.8 and abs(accs["bf16"] - accs["off"]) < 0.08


def test_linear_cka_properties():
    torch.manual_seed(0)
    x = torch.randn(64, 20)
    q, _ = torch.linalg.qr(torch.randn(20, 20))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, 3 * x @ q) == pytest.approx(1.0, abs=1e-4)  # orthogonal + isotropic scale invariant
    assert linear_cka(x, torch.randn(64, 20)) < 0.5


@pytest.mark.parametrize("extra", [
    {"matryoshka": [8, 16, 32, 64]},
    {"guide": "resnet20", "model": "plain20"},
    {"grad_noise": 0.01},
    {"drop_path_rate": 0.2, "drop_path_schedule": "linear"},
])
def test_objectives_and_regularisers_train(tmp_path, extra):
    s = train(TrainConfig(**{**FAST, **extra}, epochs=3, schedule="onecycle", warmup_iters=10, lr=0.05,
                          out=str(tmp_path / "r")))
    assert s.status == "finished" and s.final["test_top1"] > 0.3
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "r").values())


def test_gradient_noise_changes_weights_deterministically(tmp_path):
    base = TrainConfig(**FAST, epochs=1)
    train(base, out=str(tmp_path / "a"), grad_noise=0.3)
    train(base, out=str(tmp_path / "b"), grad_noise=0.3)
    train(base, out=str(tmp_path / "c"))
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert not torch.equal(weights(tmp_path / "a")["fc.weight"], weights(tmp_path / "c")["fc.weight"])


def test_distillation_from_teacher_run(tmp_path):
    train(TrainConfig(**FAST, epochs=2, out=str(tmp_path / "teacher")))
    s = train(TrainConfig(**FAST, epochs=1, distill_from=str(tmp_path / "teacher"), out=str(tmp_path / "student")))
    assert s.status == "finished"


def test_distillation_loss_follows_hinton():
    """Hinton et al. 2015, §2: (1 - a) CE + a T^2 KL(p_teacher^T || p_student^T), checked against the definitions."""
    import torch.nn.functional as F

    from reslab.train.objectives import Distillation

    torch.manual_seed(0)
    x, y = torch.randn(16, 12), torch.randint(0, 6, (16,))
    teacher, student = torch.nn.Linear(12, 6), torch.nn.Linear(12, 6)
    with torch.no_grad():
        t_logits, s_logits = teacher(x), student(x)

    # a student that equals its teacher has no soft-target loss
    copy = torch.nn.Linear(12, 6)
    copy.load_state_dict(teacher.state_dict())
    loss, _ = Distillation(teacher, temperature=4.0, alpha=1.0)(copy, x, y)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # weight 0 is plain cross-entropy on the labels, whatever the teacher says
    loss, _ = Distillation(teacher, temperature=4.0, alpha=0.0)(student, x, y)
    assert loss.item() == pytest.approx(F.cross_entropy(s_logits, y).item(), rel=1e-6)
    # the soft term is T^2 times the KL divergence sum_i p_i log(p_i / q_i), averaged over the batch
    for t in (1.0, 3.0):
        p, q = torch.softmax(t_logits.double() / t, 1), torch.softmax(s_logits.double() / t, 1)
        kl = (p * (p / q).log()).sum(1).mean().item()
        loss, _ = Distillation(teacher, temperature=t, alpha=1.0)(student, x, y)
        assert loss.item() == pytest.approx(t ** 2 * kl, rel=1e-4)
    # the T^2 factor keeps the soft term O(1) as T grows: T^2 KL -> Var_i(v_i - z_i) / 2 (uniform over classes),
    # where an unscaled KL would vanish like 1 / T^2
    limit = 0.5 * (t_logits - s_logits).double().var(1, unbiased=False).mean().item()
    loss, _ = Distillation(teacher, temperature=200.0, alpha=1.0)(student, x, y)
    assert loss.item() == pytest.approx(limit, rel=0.02)


def test_train_fraction_uses_nested_subsets(tmp_path):
    from reslab.data import load_data
    from reslab.data.sources import stratified_split

    labels = load_data("digits").train.labels
    small, large = (stratified_split(labels, f, 0)[1] for f in (0.3, 0.6))
    assert set(small) < set(large) and abs(len(large) - 0.6 * len(labels)) < 10
    s = train(TrainConfig(**FAST, epochs=1, train_fraction=0.6, out=str(tmp_path / "r")))
    assert s.steps == len(large) // 64


def test_tensorboard_events_written(tmp_path):
    pytest.importorskip("tensorboard")
    train(TrainConfig(**FAST, epochs=1, tensorboard=True, out=str(tmp_path / "r")))
    events = list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_linear_cka_survives_huge_activations():
    torch.manual_seed(0)
    x = torch.randn(32, 50)
    assert linear_cka(x * 1e12, x * 3e15) == pytest.approx(1.0, abs=1e-4)


def test_guidance_hooks_hold_nothing_outside_the_objective():
    from reslab.models import create_model
    from reslab.train.objectives import Guidance

    target, guide = create_model("plain20"), create_model("resnet20")
    objective = Guidance(target, guide, weight=1.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, logits = objective(target, x, y)
    assert torch.isfinite(loss) and logits.shape == (4, 10)
    loss.backward()
    assert target.conv1.weight.grad is not None and guide.conv1.weight.grad is None
    with torch.no_grad():
        target(x)  # an evaluation pass
    assert objective.target_layers.outputs == [] and objective.guide_layers.outputs == []


@pytest.mark.parametrize("layers, pairs", [("stages", 3), ("blocks", 27)])
def test_guidance_aligns_stages_or_every_block(layers, pairs):
    """plain56 guided by resnet56: 3 stage pairs or 27 residual-block pairs, each CKA differentiable."""
    from reslab.models import create_model
    from reslab.train.objectives import Guidance

    torch.manual_seed(0)
    target, guide = create_model("plain56"), create_model("resnet56")
    objective = Guidance(target, guide, weight=1.0, layers=layers)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    logits, cka = objective.alignments(target, x)
    assert objective.pairs == pairs and len(cka) == pairs and logits.shape == (8, 10)
    assert all(0 <= c.item() <= 1 + 1e-5 for c in cka)
    first = target.layer1[0].conv1.weight
    (grad,) = torch.autograd.grad(sum(1 - c for c in cka), first)  # the alignment term alone reaches block 1
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    loss, _ = objective(target, x, y)
    assert loss.requires_grad and torch.isfinite(loss)


def test_guidance_blocks_pair_layers_of_the_same_depth():
    """A guide identical to the target aligns perfectly block by block (CKA 1 at every pair); a shallower target
    is aligned with the guide's last blocks."""
    import copy

    from reslab.models import create_model
    from reslab.train.objectives import Guidance

    torch.manual_seed(0)
    target = create_model("resnet20").eval()
    x = torch.randn(8, 3, 16, 16)
    _, cka = Guidance(target, copy.deepcopy(target), weight=1.0, layers="blocks").alignments(target, x)
    assert len(cka) == 9 and all(c.item() == pytest.approx(1.0, abs=1e-4) for c in cka)
    assert Guidance(target, create_model("resnet56"), weight=1.0, layers="blocks").pairs == 9
    with pytest.raises(ValueError, match="no residual blocks"):
        Guidance(target, create_model("simplenet"), weight=1.0, layers="blocks")


def test_guide_layers_flag_reaches_the_objective():
    from reslab.models import create_model
    from reslab.train.objectives import build_objective

    cfg = resolve_config({"model": "plain20", "guide": "resnet20", "guide_layers": "blocks"})
    objective = build_objective(cfg, create_model("plain20"), num_classes=10, in_chans=3, device="cpu")
    assert objective.pairs == 9
    with pytest.raises(ConfigError, match="guide-layers"):
        resolve_config({"guide": "resnet20", "guide_layers": "layers"})


def test_scheduled_drop_path_rises_from_zero_to_the_configured_rates():
    """ScheduledDropPath (Zoph et al. 2018, §4.1): the loop scales every block's rate by step / total_steps."""
    from reslab.models import create_model
    from reslab.train.objectives import set_drop_path_scale

    model = create_model("resnet20", drop_path_rate=0.4)
    configured = [m.drop_path.p for m in model.modules() if hasattr(m, "drop_path")]
    assert max(configured) == pytest.approx(0.4)
    total = 200
    for step, fraction in ((0, 0.0), (100, 0.5), (total, 1.0), (100, 0.5)):  # rates never compound
        set_drop_path_scale(model, step / total)
        rates = [m.drop_path.p for m in model.modules() if hasattr(m, "drop_path")]
        assert rates == pytest.approx([fraction * r for r in configured]), step


@pytest.mark.parametrize("step", [0, 100])
def test_gradient_noise_has_the_annealed_variance(step):
    """Neelakantan et al. 2015, Eq. 1: on zero gradients the added noise has mean 0, variance eta / (1 + t)^gamma."""
    from reslab.train.objectives import add_gradient_noise

    model = torch.nn.Linear(1000, 1000)  # ~1M gradient entries: the variance estimate is within ~0.3%
    model.frozen = frozen = torch.nn.Linear(3, 3)  # no gradient
    model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    eta, gamma = 0.3, 0.55
    add_gradient_noise(model, step, eta, gamma, generator=torch.Generator().manual_seed(0))
    noise = torch.cat([model.weight.grad.flatten(), model.bias.grad])
    assert noise.mean().item() == pytest.approx(0.0, abs=0.003)
    assert noise.var().item() == pytest.approx(eta / (1 + step) ** gamma, rel=0.02)
    assert frozen.weight.grad is None  # parameters without a gradient are left alone


def test_drop_path_on_a_plain_net_is_an_error(tmp_path):
    with pytest.raises(TrainingError, match="drop-path-rate"):
        train(TrainConfig(**{**FAST, "model": "plain20"}, epochs=1, drop_path_rate=0.2, out=str(tmp_path / "r")))


def test_progressive_size_cuts_the_run_into_equal_phases():
    sizes = [16, 24, 32]
    got = [progressive_size(step, 90, sizes) for step in range(90)]
    assert got == [16] * 30 + [24] * 30 + [32] * 30
    assert progressive_size(89, 90, [32]) == 32 and progressive_size(5, 90, []) is None


def test_progressive_resizing_trains_small_then_at_full_size(tmp_path, monkeypatch):
    """Each phase's batches reach the model at the phase's side (recorded per epoch too), and the run ends at
    the full size it is evaluated at."""
    from reslab.data import augment

    sides, original = [], augment.resize_batch

    def spy(x, side):
        out = original(x, side)
        sides.append(tuple(out.shape[-2:]))
        return out

    monkeypatch.setattr(augment, "resize_batch", spy)  # the loop imports it from there at start
    summary = train(TrainConfig(**FAST, epochs=3, progressive_sizes=[8, 12, 16], out=str(tmp_path / "run")))
    per_epoch = summary.steps // 3
    assert sides == [(8, 8)] * per_epoch + [(12, 12)] * per_epoch + [(16, 16)] * per_epoch
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_image_size"] for r in records] == [8, 12, 16]


def test_progressive_sizes_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="--progressive-sizes: image sides must be >= 4"):
        TrainConfig(**FAST, progressive_sizes=[2, 16]).validate()
    with pytest.raises(TrainingError, match="--progressive-sizes .*would upsample.*<= 16"):
        train(TrainConfig(**FAST, epochs=1, progressive_sizes=[8, 32], out=str(tmp_path / "run")))


_FAULTS_SCRIPT = """
import resource, sys, torch
from reslab.train.engine import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1))
x = torch.randn(64, 3, 64, 64)  # 32 MiB activations: above glibc's largest default mmap threshold
step = lambda: net(x).square().mean().backward()
step(), step()  # the first steps fault their pages in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retained_memory_is_reused_without_page_faults():
    """With glibc's default thresholds every training step gets its large blocks as fresh mmap pages (about
    147,000 faults a step here); retained, the steps reuse the freed blocks and fault (almost) nothing."""
    import subprocess
    import sys

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0] == "True", int(out[1])

    (applied, retained), (_, default) = faults("retain"), faults("default")
    assert applied
    assert default > 5 * 50_000  # fresh pages on every step
    assert retained < default / 10


def test_training_retains_memory_unless_told_not_to(tmp_path, monkeypatch):
    from reslab.train import loop

    calls = []
    monkeypatch.setattr(loop, "retain_freed_memory", lambda: calls.append(1) or True)
    train(TrainConfig(**FAST, iterations=1, out=str(tmp_path / "a")))
    train(TrainConfig(**FAST, iterations=1, retain_memory=False, out=str(tmp_path / "b")))
    assert calls == [1]


def test_evaluation_top1_breaks_exact_ties_like_argmax():
    """Quantized logits tie often; top-1 counts argmax's choice (the quantize report's), whatever topk's order."""
    from reslab.train.engine import evaluate_loader

    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (1000, 10), generator=generator).float()  # ties in most rows
    labels = logits.argmax(1)
    assert (logits.topk(5, dim=1).indices[:, 0] != labels).sum() > 100  # topk alone would miss these
    model = torch.nn.Identity()
    loader = [(logits[i:i + 100], labels[i:i + 100]) for i in range(0, 1000, 100)]
    result = evaluate_loader(model, loader, device=torch.device("cpu"), amp_dtype=None, num_classes=10)
    assert result["top1"] == 1.0


def test_cudnn_autotuning_follows_the_deterministic_flag():
    """Non-deterministic runs let cuDNN pick the fastest algorithm per shape; --deterministic turns that off."""
    from reslab.train.loop import seed_everything

    before = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    try:
        seed_everything(0, deterministic=False)
        assert torch.backends.cudnn.benchmark
        seed_everything(0, deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1])
