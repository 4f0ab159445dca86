"""`reslab` subcommands of this package: each builder adds one subparser (see reslab.cli)."""
from __future__ import annotations

import argparse


def _parse_input_size(text: str) -> tuple[int, int, int]:
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"--input-size must be C,H,W (e.g. 3,32,32), got {text!r}")
    return size  # type: ignore[return-value]


def cmd_diagram(args: argparse.Namespace) -> int:
    from .diagram import draw_diagram

    out = args.out or f"{args.model}.svg"
    spec = draw_diagram(args.model, out, input_size=args.input_size)
    stages = sum(s.reduction is not None for s in spec.sections)
    print(f"wrote {out}: {spec.model_name}, input {'x'.join(map(str, spec.input_shape))}, {stages} stages, "
          f"{spec.residual_sums} residual sums, {spec.params:,} parameters")
    return 0


def _build_diagram(sub) -> None:
    p = sub.add_parser("diagram", help="draw a model's structure (stages, blocks, shortcuts joining at ⊕) to SVG/PNG")
    p.add_argument("model", help="registered model name (see `reslab models`)")
    p.add_argument("--out", default=None, help="output file, .svg, .png or .pdf (default: MODEL.svg)")
    p.add_argument("--input-size", type=_parse_input_size, default=None, metavar="C,H,W",
                   help="input shape for the shape pass (default: the model's native size)")
    p.set_defaults(func=cmd_diagram)


COMMANDS: list = [_build_diagram]
