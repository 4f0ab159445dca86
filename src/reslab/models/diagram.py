"""Structure diagrams of any registered model: stem, stages, blocks, and where the residual sums are.

In the spirit of neural circuit diagrams, the picture shows the data path as boxes on a wire, and every
shortcut as a bypass wire that leaves the main path before a block and joins it again at a ⊕ after it
(with a box on the bypass when the shortcut is a projection, and the residual scale when it is not 1).
Plain networks therefore show no ⊕ at all. One row per stage, each titled with its output tensor shape.

Nothing here knows any architecture. The structure comes from walking the modules:
- a forward pass with hooks records, for every module, when it first runs and its input/output shapes;
- the network is unfolded in execution order into units: a ``ResidualBlock`` is one unit (⊕ if it has a
  shortcut), other modules made only of leaf layers (e.g. ``ConvNormAct``) are layer units, plain
  ``nn.Sequential``/``ModuleList`` containers and stages are opened, anything else is a composite unit;
- ``stage_info`` splits the units: each stage ends at the last unit inside the module its ``StageInfo``
  names (a container of blocks, or the stage's last block for flat torchvision layouts like MobileNetV2);
  units before the first stage are the stem, units after the last stage the head.

``describe`` returns that structure (testable without drawing); ``draw_diagram`` renders it with matplotlib
to SVG, PNG or PDF.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .blocks import PadShortcut, ResidualBlock
from .registry import create_model, model_entry

# ---------------------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One box of the diagram."""

    name: str  # qualified module name ("layer2.0"), or "pool" for the functional global pooling
    kind: str  # "residual" (a ResidualBlock), "block" (another composite module) or "layer"
    lines: list[str]  # label, one line per layer for layer units
    out_shape: tuple[int, ...]  # per-sample output shape, (C, H, W) or (F,)
    shortcut: str | None = None  # None: no sum; "identity" or a description of the projection
    residual_scale: float = 1.0

    @property
    def is_sum(self) -> bool:
        return self.shortcut is not None


@dataclass
class Section:
    """The stem, one stage, or the head: one row of the diagram."""

    title: str
    units: list[Unit]
    out_shape: tuple[int, ...]
    reduction: int | None = None  # cumulative stride, for stages


@dataclass
class DiagramSpec:
    model_name: str
    input_shape: tuple[int, ...]
    params: int
    sections: list[Section] = field(default_factory=list)

    @property
    def residual_sums(self) -> int:
        return sum(u.is_sum for s in self.sections for u in s.units)


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape[1:]) if isinstance(t, torch.Tensor) else ()


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape)


def _layer_label(m: nn.Module) -> str | None:
    """A short label for a leaf layer; ``None`` for layers not worth drawing (identity)."""
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        stride = f"/{m.stride[0]}" if m.stride[0] > 1 else ""
        if m.groups > 1 and m.groups == m.in_channels == m.out_channels:
            kind = "dw conv"
        elif m.groups > 1:
            kind = f"conv g{m.groups}"
        else:
            kind = "conv"
        return f"{kind} {kh}×{kw}{stride}, {m.out_channels}"
    if isinstance(m, nn.Linear):
        return f"fc {m.in_features}→{m.out_features}"
    if isinstance(m, nn.BatchNorm2d):
        return "BN"
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        s = m.stride if isinstance(m.stride, int) else m.stride[0]
        return f"{'max' if isinstance(m, nn.MaxPool2d) else 'avg'} pool {k}×{k}" + (f"/{s}" if s > 1 else "")
    if isinstance(m, (nn.Dropout, nn.Dropout2d)):
        return f"dropout {m.p:g}" if m.p > 0 else None
    if isinstance(m, nn.Identity):
        return None
    return type(m).__name__  # ReLU, ReLU6, ...


def _convs(m: nn.Module) -> list[nn.Conv2d]:
    return [c for c in m.modules() if isinstance(c, nn.Conv2d)]


def _shortcut_label(block: ResidualBlock) -> str | None:
    if not block.use_shortcut:
        return None
    if block.downsample is None:
        return "identity"
    if isinstance(block.downsample, PadShortcut):
        return f"pad{'/' + str(block.downsample.stride) if block.downsample.stride > 1 else ''}"
    labels = [lab for c in block.downsample.children() if (lab := _layer_label(c))] or ["projection"]
    return " · ".join(labels)


def _is_layer(m: nn.Module) -> bool:
    """Leaf layers, and small modules made only of leaf layers (conv-BN-act units)."""
    children = list(m.children())
    return not children or all(not list(c.children()) for c in children)


def describe(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224), *,
             name: str | None = None) -> DiagramSpec:
    """The diagram's structure for ``model`` on one (C, H, W) input, found by walking modules and hooks."""
    first_call: dict[str, int] = {}
    in_shapes: dict[str, tuple[int, ...]] = {}
    out_shapes: dict[str, tuple[int, ...]] = {}

    def pre_hook(qualname):
        def hook(_m, inputs):
            if qualname not in first_call:
                first_call[qualname] = len(first_call)
                in_shapes[qualname] = _shape(inputs[0]) if inputs else ()
        return hook

    def post_hook(qualname):
        def hook(_m, _inputs, output):
            out_shapes.setdefault(qualname, _shape(output))
        return hook

    modules = dict(model.named_modules())
    handles = []
    for qualname, m in modules.items():
        if qualname:
            handles += [m.register_forward_pre_hook(pre_hook(qualname)), m.register_forward_hook(post_hook(qualname))]
    was_training = model.training
    param = next(model.parameters(), None)
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=param.device if param is not None else "cpu",
                              dtype=param.dtype if param is not None else torch.float32))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    # containers that are never called themselves (ModuleList) run when their first member runs
    first_seen: dict[str, int] = {}
    for qualname, index in first_call.items():
        parts = qualname.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            first_seen[prefix] = min(first_seen.get(prefix, index), index)

    stage_info = list(getattr(model, "stage_info", []))
    stage_names = {info.name for info in stage_info}

    # Unfold into units, in execution order.
    units: list[Unit] = []

    def unfold(prefix: str, module: nn.Module) -> None:
        children = [(f"{prefix}.{n}" if prefix else n, c) for n, c in module.named_children()]
        for qualname, child in sorted((c for c in children if c[0] in first_seen), key=lambda c: first_seen[c[0]]):
            if isinstance(child, ResidualBlock):
                convs = _convs(child)
                if child.downsample is not None:  # the projection is drawn on the bypass, not in the box
                    convs = [c for c in convs if all(c is not d for d in _convs(child.downsample))]
                lines = [type(child).__name__]
                lines += [_layer_label(c) for c in convs] if len(convs) <= 3 else [f"{len(convs)} convs"]
                units.append(Unit(qualname, "residual", lines, out_shapes.get(qualname, ()), _shortcut_label(child),
                                  float(getattr(child, "residual_scale", 1.0))))
            elif qualname in stage_names or type(child) in (nn.Sequential, nn.ModuleList):
                unfold(qualname, child)
            elif _is_layer(child):
                labels = [lab for c in (list(child.children()) or [child]) if (lab := _layer_label(c))]
                if labels:
                    if len(in_shapes.get(qualname, ())) == 1 and units and len(units[-1].out_shape) > 1:
                        units.append(Unit("pool", "layer", ["global avg pool"], in_shapes[qualname]))
                    units.append(Unit(qualname, "layer", [" · ".join(labels)], out_shapes.get(qualname, ())))
            else:
                convs = _convs(child)
                branches = getattr(child, "branches", None)
                detail = f"{len(convs)} convs" + (f", {len(branches)} branches" if branches is not None else "")
                units.append(Unit(qualname, "block", [type(child).__name__, detail], out_shapes.get(qualname, ())))

    unfold("", model)
    if units and len(units[-1].out_shape) > 1:  # no classifier (reset_classifier(0)): pooling ends the net
        units.append(Unit("pool", "layer", ["global avg pool"], (units[-1].out_shape[0],)))

    def inside(unit: Unit, stage: str) -> bool:
        return unit.name == stage or unit.name.startswith(stage + ".")

    spec = DiagramSpec(name or getattr(model, "model_name", type(model).__name__), tuple(input_size),
                       sum(p.numel() for p in model.parameters()))
    if not stage_info:
        spec.sections.append(Section("network", units, units[-1].out_shape if units else ()))
        return spec
    ends = []
    for info in stage_info:
        members = [i for i, u in enumerate(units) if inside(u, info.name)]
        if not members:
            raise ValueError(f"stage {info.name!r} of {spec.model_name} ran no module in the forward pass")
        ends.append(max(members))
    start = min(i for i, u in enumerate(units) if inside(u, stage_info[0].name))
    if start:
        spec.sections.append(Section("stem", units[:start], units[start - 1].out_shape))
    begin = start
    for info, end in zip(stage_info, ends):
        spec.sections.append(Section(info.name, units[begin:end + 1], out_shapes.get(info.name, units[end].out_shape),
                                     info.reduction))
        begin = end + 1
    if units[begin:]:
        spec.sections.append(Section("head", units[begin:], units[-1].out_shape))
    return spec


# ---------------------------------------------------------------------------------------------------------
# Drawing (sizes in inches: the axes span the figure, one data unit per inch)
# ---------------------------------------------------------------------------------------------------------
BOX_W, GAP, LINE_H, PAD = 1.75, 0.6, 0.15, 0.08
BYPASS_H = 0.32  # height of the bypass wire above a box
LEFT, RIGHT, TOP = 0.6, 0.5, 0.55
MAX_BOXES = 6  # per row; longer stages show their first 3 and last 2 boxes around an ellipsis box
COLORS = {"layer": "#e8eef7", "residual": "#fdf0d5", "block": "#e3f1e3", "more": "#ffffff", "plain": "#eeeeee"}
BANDS = ("#f7f7f7", "#ffffff")
FORMATS = (".svg", ".png", ".pdf")


def _merge_layers(units: list[Unit], max_lines: int = 6) -> list[Unit]:
    """Consecutive layer units share one box (a conv-BN-ReLU-pool stem reads as one box), up to max_lines."""
    merged: list[Unit] = []
    for u in units:
        last = merged[-1] if merged else None
        if u.kind == "layer" and last is not None and last.kind == "layer" and len(last.lines) < max_lines:
            merged[-1] = Unit(last.name, "layer", last.lines + u.lines, u.out_shape)
        else:
            merged.append(Unit(u.name, u.kind, list(u.lines), u.out_shape, u.shortcut, u.residual_scale))
    return merged


def _visible(units: list[Unit]) -> list[Unit]:
    if len(units) <= MAX_BOXES:
        return units
    hidden = units[3:-2]
    kinds = sorted({u.lines[0] for u in hidden})
    sums = sum(u.is_sum for u in hidden)
    lines = [f"⋯ {len(hidden)} more", ", ".join(kinds)[:28]] + ([f"({sums} with ⊕)"] if sums else [])
    return units[:3] + [Unit("…", "more", lines, hidden[-1].out_shape)] + units[-2:]


def draw_diagram(name_or_model: str | nn.Module, out: str | Path, *,
                 input_size: tuple[int, int, int] | None = None, dpi: int = 150) -> DiagramSpec:
    """Draw a model's structure to ``out`` (.svg, .png or .pdf) and return the structure drawn.

    ``name_or_model``: a registered name (built with default arguments) or a module. ``input_size``
    defaults to the registry's native size (or 3x224x224 for an unregistered module).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle

    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"diagram output {str(out)!r} must end in one of {', '.join(FORMATS)}")
    if isinstance(name_or_model, str):
        entry = model_entry(name_or_model)
        model, name = create_model(name_or_model), name_or_model
        input_size = tuple(input_size or entry.input_size)
    else:
        model, name = name_or_model, getattr(name_or_model, "model_name", None)
        if input_size is None:
            input_size = model_entry(name).input_size if name else (3, 224, 224)
    if len(input_size) != 3 or min(input_size) < 1:
        raise ValueError(f"input size must be three positive numbers C,H,W, got {input_size}")
    spec = describe(model, tuple(input_size), name=name)

    rows = [(s, _visible(_merge_layers(s.units))) for s in spec.sections]
    n_cols = max(len(boxes) for _, boxes in rows)
    row_heights = []
    for _, boxes in rows:
        lines = max(len(u.lines) for u in boxes)
        has_bypass = any(u.is_sum for u in boxes)
        row_heights.append(0.32 + (BYPASS_H + 0.1 if has_bypass else 0.05) + lines * LINE_H + 2 * PAD + 0.3)
    title = (f"{spec.model_name}: input {_fmt_shape(spec.input_shape)}, {spec.params:,} parameters, "
             f"{spec.residual_sums} residual sums (⊕)")
    width = max(LEFT + n_cols * (BOX_W + GAP) + RIGHT, LEFT + 0.09 * len(title))  # 10 pt bold ~ 0.09 in/char
    height = TOP + sum(row_heights) + 0.3

    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    ax.text(LEFT, height - 0.3, title, fontsize=10, weight="bold", va="center")

    def arrow(x0, y0, x1, y1, **kw):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=8, lw=0.9,
                                     color=kw.get("color", "black"), shrinkA=0, shrinkB=0))

    y_top = height - TOP
    previous_exit = None  # where the last row's wire leaves, to route it into the next row
    sum_index = 0
    for r, ((section, boxes), row_h) in enumerate(zip(rows, row_heights)):
        y_bottom = y_top - row_h
        ax.add_patch(Rectangle((0.05, y_bottom + 0.04), width - 0.1, row_h - 0.08, color=BANDS[r % 2], zorder=0))
        header = section.title if section.reduction is None else f"{section.title}  (stride {section.reduction})"
        ax.text(0.15, y_top - 0.18, f"{header}   →  {_fmt_shape(section.out_shape)}", fontsize=8.5, weight="bold",
                va="center", color="#333333")
        box_h = max(len(u.lines) for u in boxes) * LINE_H + 2 * PAD
        y_mid = y_bottom + 0.3 + box_h / 2  # the main wire of this row
        x_in = LEFT - GAP / 2 - 0.1
        if previous_exit is None:
            ax.text(x_in - 0.05, y_mid, "x", fontsize=8, ha="right", va="center")
        else:  # down from the previous row's end, back to the left, into this row
            px, py = previous_exit
            y_turn = y_top - 0.02
            ax.plot([px, px, x_in, x_in], [py, y_turn, y_turn, y_mid], color="black", lw=0.9)
        x = LEFT
        arrow(x_in, y_mid, x, y_mid)
        for i, u in enumerate(boxes):
            h = len(u.lines) * LINE_H + 2 * PAD
            color = COLORS["plain"] if (u.kind == "residual" and not u.is_sum) else COLORS[u.kind]
            ax.add_patch(FancyBboxPatch((x, y_mid - h / 2), BOX_W, h, boxstyle="round,pad=0,rounding_size=0.06",
                                        fc=color, ec="#555555", lw=0.8, ls="--" if u.kind == "more" else "-"))
            for k, line in enumerate(u.lines):
                ax.text(x + BOX_W / 2, y_mid + h / 2 - PAD - (k + 0.5) * LINE_H, line, fontsize=6.5, ha="center",
                        va="center", weight="bold" if k == 0 and u.kind != "layer" else "normal")
            ax.text(x + BOX_W / 2, y_mid - h / 2 - 0.1, _fmt_shape(u.out_shape), fontsize=5.5, ha="center",
                    va="center", color="#666666")
            x_next = x + BOX_W + GAP
            if u.is_sum:
                cx, radius = x + BOX_W + GAP / 2, 0.09
                arrow(x + BOX_W, y_mid, cx - radius, y_mid)
                circle = Circle((cx, y_mid), radius, fc="white", ec="black", lw=0.9, zorder=3)
                sum_index += 1
                circle.set_gid(f"residual-sum-{sum_index}")
                ax.add_patch(circle)
                ax.plot([cx - radius * 0.6, cx + radius * 0.6], [y_mid, y_mid], color="black", lw=0.9, zorder=4)
                ax.plot([cx, cx], [y_mid - radius * 0.6, y_mid + radius * 0.6], color="black", lw=0.9, zorder=4)
                # the bypass: leaves the wire before the box, rides above it, drops into the ⊕
                x_split, y_bypass = x - 0.12, y_mid + h / 2 + BYPASS_H  # just after the previous ⊕
                ax.plot([x_split, x_split, cx], [y_mid, y_bypass, y_bypass], color="#c0392b", lw=1.0)
                arrow(cx, y_bypass, cx, y_mid + radius, color="#c0392b")
                ax.add_patch(Circle((x_split, y_mid), 0.025, color="#c0392b", zorder=3))
                if u.shortcut != "identity":
                    ax.text((x_split + cx) / 2, y_bypass, u.shortcut, fontsize=5.5, ha="center", va="center",
                            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="#c0392b", lw=0.7))
                if u.residual_scale != 1.0:
                    ax.text(x + BOX_W + 0.03, y_mid + 0.1, f"×{u.residual_scale:g}", fontsize=5.5, color="#c0392b")
                if i < len(boxes) - 1:
                    arrow(cx + radius, y_mid, x_next, y_mid)
                exit_x = cx + radius
            else:
                if i < len(boxes) - 1:
                    arrow(x + BOX_W, y_mid, x_next, y_mid)
                exit_x = x + BOX_W
            x = x_next
        previous_exit = (exit_x, y_mid)
        y_top = y_bottom
    px, py = previous_exit
    arrow(px, py, px + 0.3, py)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return spec
