"""One typed configuration for a training run: defaults < recipe file < CLI flags.

The resolved config is saved as ``config.yaml`` in the run directory, so a run can be repeated or resumed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from reslab.data.augment import CROP_MODES, FLIP_MODES, BatchAugment


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and what to do."""


@dataclass
class TrainConfig:
    # --- what to train, on what
    model: str = "resnet20"  # registry name (`reslab models`)
    model_kwargs: dict = field(default_factory=dict)  # family options, e.g. {"shortcut": "B"}
    data: str = "digits"  # digits | cifar10:DIR | cifar100:DIR | an ImageFolder path
    val_fraction: float = 0.0  # held out of train for model selection (He et al.: 5k of 50k = 0.1)
    train_fraction: float = 1.0  # train on a stratified subset (nested: a smaller fraction is inside a larger one)
    image_size: int | None = None  # resize stored images to this side (None: keep the data's native size)
    recipe: str | None = None  # name of a shipped recipe or a YAML file; recorded for provenance

    # --- schedule length: epochs, or iterations as in the paper (iterations win when both are set)
    epochs: int = 30
    iterations: int | None = None
    batch_size: int = 128  # global batch, whatever the number of processes

    # --- optimiser (SGD with momentum, as in He et al. 2016 §3.4 / §4.2)
    optimizer: str = "sgd"  # sgd | nesterov | adamw | muon (Muon on conv filters, Nesterov SGD on the rest)
    lr: float = 0.1  # peak learning rate for the global batch
    momentum: float = 0.9
    weight_decay: float = 1e-4
    no_decay_bn_bias: bool = False  # exclude BN parameters and biases from weight decay
    norm_bias_lr_mult: float = 1.0  # lr multiplier of BN (and whitening) biases; airbench's bias_scaler is 64
    freeze_norm_weight: bool = False  # BN scales fixed at 1, only BN biases learn (airbench's BatchNorm)
    label_smoothing: float = 0.0
    muon_lr: float = 0.24  # --optimizer muon: peak lr of the conv filters (airbench94_muon's 0.24 at batch 2000)
    muon_momentum: float = 0.6  # --optimizer muon: Nesterov momentum of the conv filters (airbench94_muon)

    # --- learning-rate schedule (multipliers of lr, computed per iteration)
    schedule: str = "step"  # step | cosine | onecycle | constant
    milestones: list[int] = field(default_factory=list)  # iterations where lr is multiplied by gamma (step)
    milestone_epochs: list[float] = field(default_factory=list)  # the same in epochs (converted at start)
    gamma: float = 0.1
    warmup_iters: int = 0  # iterations of warm-up
    warmup_lr: float | None = None  # constant warm-up lr (He et al. resnet110: 0.01); None = linear from 0
    final_lr_fraction: float = 0.0  # cosine/onecycle end value as a fraction of lr

    # --- regularisers and auxiliary objectives
    drop_path_rate: float = 0.0  # stochastic depth, linear decay over blocks (Huang et al. 2016); needs model support
    drop_path_schedule: str = "constant"  # constant | linear (ScheduledDropPath, Zoph et al. 2018: rate rises 0 -> max)
    grad_noise: float = 0.0  # gradient-noise eta: variance eta/(1+t)^gamma (Neelakantan et al. 2015); 0 = off
    grad_noise_gamma: float = 0.55
    matryoshka: list[int] = field(default_factory=list)  # nested embedding sizes for the MRL loss, e.g. 8,16,32,64
    distill_from: str | None = None  # teacher run directory for knowledge distillation
    distill_temperature: float = 4.0
    distill_weight: float = 0.9  # weight of the soft-target term (1 - weight on the labels)
    guide: str | None = None  # guide run directory or model name (untrained) for CKA guidance
    guide_weight: float = 1.0
    guide_layers: str = "stages"  # stages | blocks: align each stage output, or each residual block's output

    # --- transfer: start from trained weights (reslab finetune)
    init_from: str | None = None  # run dir, checkpoint or torchvision .pth to start from (head reset when classes differ)
    freeze: list[str] = field(default_factory=list)  # modules that stop learning, e.g. stem,layer1 (BN kept in eval mode)
    backbone_lr_mult: float = 1.0  # backbone lr = lr * this; the classifier fc gets lr (discriminative fine-tuning)

    # --- augmentation (batched, on the training device)
    crop_padding: int = 4  # pad-and-crop, He et al. §4.2
    crop_mode: str = "constant"  # padding fill: constant (zeros: the mean colour) | reflect (airbench's translate)
    flip: bool = True
    flip_mode: str = "random"  # random | alternate (each image mirrored in every other epoch; airbench §3.6)
    progressive_sizes: list[int] = field(default_factory=list)  # progressive resizing: equal phases at these sides

    # --- speed
    amp: str = "auto"  # auto | bf16 | fp16 | off   (auto: bf16 where the hardware runs it fast)
    channels_last: bool = True
    compile: bool = False  # torch.compile the training step's model
    ema_decay: float = 0.0  # exponential moving average of weights (0 = off), evaluated instead of raw weights
    whiten_bias_epochs: int | None = None  # train whitening-stem biases for the first N epochs only (airbench: 3)
    lookahead_every: int = 0  # lookahead: sync slow weights every N steps (0 = off; airbench uses 5)
    lookahead_decay: float = 0.77  # the slow weights' final decay per sync, reached as (step/total)^3 (0.95^5)
    threads: int | None = None  # torch intra-op threads (None: PyTorch's default)
    retain_memory: bool = True  # keep freed memory in the process (glibc malloc): no page faults per step

    # --- evaluation and output
    eval_every: int = 1  # evaluate every N epochs (and always at the end)
    eval_batch_size: int = 512
    tta_flip: bool = False  # average predictions over the image and its mirror at test time
    tta_shift: int = 0  # also average over copies translated by +-N pixels (multi-crop TTA; 0 = off)
    out: str | None = None  # run directory (default runs/<model>-<data>-<time>)
    auto_resume: bool = False  # if --out already holds a checkpoint, continue from it (torchrun restarts, preemption)
    tensorboard: bool = False
    progress: bool = True

    # --- reproducibility and hardware
    seed: int = 0
    deterministic: bool = False  # deterministic kernels, no cuDNN autotuning (slower); exact resume on CPU either way
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    sync_bn: bool = False  # SyncBatchNorm under torch.distributed
    nan_policy: str = "stop"  # stop | skip  (skip: drop the step and halve the learning rate)

    def validate(self) -> "TrainConfig":
        def bad(option: str, why: str):
            raise ConfigError(f"invalid --{option.replace('_', '-')}: {why}")

        if self.epochs < 1 and not self.iterations:
            bad("epochs", f"must be >= 1, got {self.epochs}")
        if self.iterations is not None and self.iterations < 1:
            bad("iterations", f"must be >= 1, got {self.iterations}")
        if self.batch_size < 1:
            bad("batch_size", f"must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", f"must be a finite number > 0, got {self.lr}")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            bad("momentum", f"must be in [0, 1), got {self.momentum}")
        if not (self.muon_lr > 0 and math.isfinite(self.muon_lr)):
            bad("muon_lr", f"must be a finite number > 0, got {self.muon_lr}")
        if not 0 <= self.muon_momentum < 1:
            bad("muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.train_fraction <= 1:
            bad("train_fraction", f"must be in (0, 1], got {self.train_fraction}")
        if not 0 <= self.val_fraction < 1:
            bad("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.whiten_bias_epochs is not None and self.whiten_bias_epochs < 0:
            bad("whiten_bias_epochs", f"must be >= 0 (0: frozen from the start), got {self.whiten_bias_epochs}")
        if self.lookahead_every < 0:
            bad("lookahead_every", f"must be >= 0 (0 = off), got {self.lookahead_every}")
        if not 0 < self.lookahead_decay < 1:
            bad("lookahead_decay", f"must be in (0, 1), got {self.lookahead_decay}")
        if self.lookahead_every and self.ema_decay:
            bad("lookahead_every", "lookahead and --ema-decay both average the weights; use one of them")
        if not 0 <= self.drop_path_rate < 1:
            bad("drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}")
        if self.grad_noise < 0:
            bad("grad_noise", f"must be >= 0, got {self.grad_noise}")
        if any(m < 1 for m in self.matryoshka):
            bad("matryoshka", f"sizes must be >= 1, got {self.matryoshka}")
        if self.distill_temperature <= 0 or not 0 <= self.distill_weight <= 1:
            bad("distill_temperature", "temperature must be > 0 and --distill-weight in [0, 1]")
        if self.guide_weight < 0:
            bad("guide_weight", f"must be >= 0, got {self.guide_weight}")
        if sum(x is not None and x != [] for x in (self.distill_from, self.guide, self.matryoshka or None)) > 1:
            bad("guide", "--guide, --distill-from and --matryoshka cannot be combined in one run")
        if not self.backbone_lr_mult > 0:
            bad("backbone_lr_mult", f"must be > 0 (freeze stages with --freeze instead), got {self.backbone_lr_mult}")
        if not self.norm_bias_lr_mult > 0:
            bad("norm_bias_lr_mult", f"must be > 0, got {self.norm_bias_lr_mult}")
        if self.crop_padding < 0:
            bad("crop_padding", f"must be >= 0, got {self.crop_padding}")
        if self.image_size is not None and self.image_size < 1:
            bad("image_size", f"must be >= 1, got {self.image_size}")
        if any(s < 4 for s in self.progressive_sizes):
            bad("progressive_sizes", f"image sides must be >= 4 pixels, got {self.progressive_sizes}")
        if self.tta_shift < 0:
            bad("tta_shift", f"must be >= 0, got {self.tta_shift}")
        if self.eval_every < 1:
            bad("eval_every", f"must be >= 1, got {self.eval_every}")
        choices = {
            "optimizer": ("sgd", "nesterov", "adamw", "muon"),
            "schedule": ("step", "cosine", "onecycle", "constant"),
            "amp": ("auto", "bf16", "fp16", "off"),
            "nan_policy": ("stop", "skip"),
            "drop_path_schedule": ("constant", "linear"),
            "guide_layers": ("stages", "blocks"),
            "flip_mode": FLIP_MODES,
            "crop_mode": CROP_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, f"{getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("device", f"{self.device!r} is not auto, cpu, cuda or cuda:N")
        if any(m < 0 for m in self.milestones):
            bad("milestones", "iterations must be >= 0")
        from reslab.models import model_entry

        try:
            model_entry(self.model)
        except ValueError as e:
            raise ConfigError(f"invalid --model: {e}") from None
        return self

    def batch_augment(self) -> BatchAugment:
        """The training augmentation these options describe (the loop, QAT and pruning fine-tunes share it)."""
        return BatchAugment(crop_padding=self.crop_padding, crop_mode=self.crop_mode, flip=self.flip,
                            flip_mode=self.flip_mode)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPE_DIR = "recipes"


def list_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("reslab.train").joinpath(RECIPE_DIR).iterdir()
                  if p.name.endswith(".yaml"))


def read_recipe(name_or_path: str) -> dict[str, Any]:
    """Values of a shipped recipe (by name) or of a YAML file (by path), checked against TrainConfig."""
    return _read_recipe_file(name_or_path)[0]


def recipe_description(name_or_path: str) -> str:
    """A recipe's ``description`` (what it is for, what it reproduces, how it was chosen), one paragraph."""
    return " ".join(str(_read_recipe_file(name_or_path)[1] or "").split())


def _read_recipe_file(name_or_path: str) -> tuple[dict[str, Any], str | None]:
    """(checked values, description) of a recipe."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {str(path)!r} does not exist")
        text = path.read_text()
        where = str(path)
    else:
        res = resources.files("reslab.train").joinpath(RECIPE_DIR, f"{name_or_path}.yaml")
        if not res.is_file():
            raise ConfigError(f"unknown recipe {name_or_path!r}; shipped recipes: {', '.join(list_recipes())}"
                              " (or give a path to a YAML file)")
        text = res.read_text()
        where = f"recipe {name_or_path}"
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of option: value, got {type(values).__name__}")
    description = values.pop("description", None)
    per_model = values.get("per_model", {})
    if not isinstance(per_model, dict) or not all(isinstance(v, dict) for v in per_model.values()):
        raise ConfigError(f"{where}: per_model must map model names to option mappings")
    for model_values in per_model.values():
        _check_keys(model_values, f"{where} (per_model)")
    _check_keys({k: v for k, v in values.items() if k != "per_model"}, where)
    return values, description


def _check_keys(values: dict, where: str) -> None:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}")


def _field_type(name: str):
    """The declared type of a field, without ``| None``: bool, int, float, str, list or dict."""
    import typing

    hint = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (list, dict):
        return typing.get_origin(hint), typing.get_args(hint)
    if args and typing.get_origin(hint) is not None:
        hint = args[0]
        if typing.get_origin(hint) in (list, dict):
            return typing.get_origin(hint), typing.get_args(hint)
    return hint, ()


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check a recipe/flag value against the field's type, so a typo fails early with the option's name."""
    kind, args = _field_type(name)
    if value is None or (isinstance(value, str) and value.lower() == "none" and kind is not str):
        return None
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer() or isinstance(value, bool):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind is float:
            return float(value)
        if kind is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            item = args[0] if args else str
            return [item(float(v)) if item is int and isinstance(v, str) else item(v) for v in value]
        if kind is dict:
            if not isinstance(value, dict):
                raise ValueError
            return value
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: option {name!r} expects {getattr(kind, '__name__', kind)}, got {value!r}") from None


def coerce_values(values: dict[str, Any], where: str = "flags") -> dict[str, Any]:
    """Check option names and convert values to the field types (e.g. CLI strings)."""
    _check_keys(values, where)
    return {k: _coerce(k, v, where) for k, v in values.items()}


def resolve_config(overrides: dict[str, Any] | None = None, recipe: str | None = None) -> TrainConfig:
    """Defaults < recipe < overrides (None values in overrides mean 'not given')."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    recipe = overrides.pop("recipe", None) or recipe
    values: dict[str, Any] = {}
    if recipe:
        recipe_values = read_recipe(recipe)
        per_model = recipe_values.pop("per_model", {})
        values.update(recipe_values)
        # Model-specific recipe values (e.g. the paper's resnet110 warm-up) apply before flags.
        values.update(per_model.get(overrides.get("model", values.get("model")), {}))
        values["recipe"] = recipe
    _check_keys(overrides, "flags")
    values.update(overrides)
    typed = {k: _coerce(k, v, f"recipe {recipe}" if k not in overrides else "flags") for k, v in values.items()}
    return TrainConfig(**typed).validate()


def load_config_file(path: str | Path) -> TrainConfig:
    """Read a run's saved ``config.yaml`` back into a TrainConfig."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    _check_keys(values, str(path))
    return TrainConfig(**{k: _coerce(k, v, str(path)) for k, v in values.items()})


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    from reslab.train.rundir import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
