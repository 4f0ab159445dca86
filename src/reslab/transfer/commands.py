"""`reslab` subcommands of this package: each builder adds one subparser (see reslab.cli).

Handlers stay thin: parse flags, call the Python API in reslab.transfer.*, print the numbers and where they went.
"""
from __future__ import annotations

import argparse


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


# ---------------------------------------------------------------------------------------------------------
# features, probe


def cmd_features(args) -> int:
    from reslab.transfer.features import features

    r = features(args.run, args.data, out=args.out, layer=args.layer, split=args.split, device=args.device,
                 batch_size=args.batch_size)
    print(f"{r['count']} x {r['dim']} features of {r['layer']} -> {', '.join(r['written'])}")
    return 0


def _build_features(sub) -> None:
    p = sub.add_parser("features", help="extract pooled embeddings of a run's layer for a data set (.npy/.safetensors)")
    p.add_argument("run", help="run directory or checkpoint folder")
    p.add_argument("--data", default=None, help="dataset spec (default: the data the run was trained on)")
    p.add_argument("--layer", default="pre_logits",
                   help="a stage name (model.stage_info, e.g. layer2) or pre_logits (the pooled final features)")
    p.add_argument("--out", required=True, help="FILE.npy (+ FILE.json sidecar) or FILE.safetensors")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_features)


def cmd_probe(args) -> int:
    from reslab.transfer.probe import probe

    r = probe(args.run, args.data, knn=args.knn, layer=args.layer, C=args.C, linear=not args.no_linear,
              device=args.device, out=args.out)
    parts = [f"{r['classes']} classes, {r['train_count']} train / {r['test_count']} test, {r['dim']}-d {r['layer']}"]
    if "linear_top1" in r:
        parts.append(f"linear probe {_pct(r['linear_top1'])}")
    parts += [f"{k.split('_')[0]} {_pct(v)}" for k, v in r.items() if k.startswith("knn")]
    print("  ".join(parts) + f"  -> {r['written_to']}")
    return 0


def _build_probe(sub) -> None:
    p = sub.add_parser("probe", help="linear probe (logistic regression) and cosine kNN on a run's frozen features")
    p.add_argument("run", help="run directory or checkpoint folder")
    p.add_argument("--data", default=None, help="dataset spec (fit on its train split, report on its test split)")
    p.add_argument("--knn", type=_int_list, default=None, metavar="K[,K]", help="also cosine kNN with these k")
    p.add_argument("--layer", default="pre_logits", help="stage name or pre_logits")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--no-linear", action="store_true", help="kNN only")
    p.add_argument("--out", default=None, help="JSON output path (default: RUN/probe.json)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_probe)


# ---------------------------------------------------------------------------------------------------------
# finetune, soup


def cmd_finetune(args) -> int:
    from reslab.cli import _print_summary
    from reslab.transfer.finetune import finetune

    extra = {k: v for k, v in (("seed", args.seed), ("batch_size", args.batch_size), ("device", args.device),
                               ("val_fraction", args.val_fraction), ("weight_decay", args.weight_decay))
             if v is not None}
    summary = finetune(args.run, args.data, weights=args.weights, model=args.model, freeze=args.freeze,
                       epochs=args.epochs, lr=args.lr, head_lr_mult=args.head_lr_mult, out=args.out,
                       progress=not args.no_progress, **extra)
    _print_summary(summary)
    return 0


def _build_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a run (or torchvision weights) on new data: new head, "
                                        "frozen early stages, lower backbone lr")
    p.add_argument("run", nargs="?", default=None, help="run directory or checkpoint to start from")
    p.add_argument("--data", required=True, help="dataset spec of the new task")
    p.add_argument("--weights", default=None, help="a torchvision .pth state_dict instead of RUN (needs --model)")
    p.add_argument("--model", default=None, help="architecture of --weights, e.g. resnet18")
    p.add_argument("--freeze", type=_name_list, default=[], metavar="NAMES",
                   help="modules that stop learning, e.g. stem,layer1")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate of the backbone")
    p.add_argument("--head-lr-mult", type=float, default=10.0, help="the new head learns at lr x this")
    p.add_argument("--weight-decay", type=float, default=None, help="(default 5e-4)")
    p.add_argument("--val-fraction", type=float, default=None, help="held out of train (default 0.1)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory to create")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)


def cmd_soup(args) -> int:
    from reslab.transfer.soup import soup

    r = soup(args.runs, args.data, greedy=args.greedy, out=args.out, device=args.device)
    for ing in r["ingredients"]:
        print(f"  ingredient {ing['run']}: val {_pct(ing['val_top1'])}  test {_pct(ing['test_top1'])}")
    print(f"uniform soup ({len(r['uniform']['runs'])}): val {_pct(r['uniform']['val_top1'])}  "
          f"test {_pct(r['uniform']['test_top1'])}")
    if "greedy" in r:
        print(f"greedy soup ({len(r['greedy']['runs'])}): val {_pct(r['greedy']['val_top1'])}  "
              f"test {_pct(r['greedy']['test_top1'])}")
    b = r["best_ingredient"]
    print(f"best ingredient: val {_pct(b['val_top1'])}  test {_pct(b['test_top1'])}  ({b['run']})")
    for w in r["warnings"]:
        print(f"warning: {w}")
    print(f"{r['written']} soup written to {r['out']}")
    return 0


def _build_soup(sub) -> None:
    p = sub.add_parser("soup", help="uniform and greedy model soups of runs fine-tuned from the same start")
    p.add_argument("runs", nargs="+", help="run directories (at least two)")
    p.add_argument("--data", default=None, help="dataset spec (default: the runs' data)")
    p.add_argument("--greedy", action="store_true", help="also the greedy soup, and write it instead of the uniform")
    p.add_argument("--out", default=None, help="run directory for the soup (default: beside the first run)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_soup)


# ---------------------------------------------------------------------------------------------------------
# retrieve (Matryoshka evaluation), synth


def cmd_retrieve(args) -> int:
    from reslab.transfer.retrieval import retrieve

    r = retrieve(args.run, args.data, dims=args.dims, baselines=args.baseline, out=args.out, device=args.device,
                 probe=not args.no_probe)
    k = r["k"]
    for row in r["runs"]:
        for s in row["scores"]:
            probe_text = f"  linear {_pct(s['linear_top1'])}" if "linear_top1" in s else ""
            print(f"{row['label']:<28} {row['kind']:<11} m={s['dim']:<4} mAP@{k} {_pct(s[f'map@{k}'])}  "
                  f"1-NN {_pct(s['knn1_top1'])}{probe_text}")
    print(f"  figure: {r['figures'][0]}\n  json:   {r['written_to']}")
    return 0


def _build_retrieve(sub) -> None:
    p = sub.add_parser("retrieve", help="Matryoshka evaluation: retrieval mAP@10, 1-NN and probe per embedding size")
    p.add_argument("run", help="run trained with --matryoshka")
    p.add_argument("--data", default=None, help="dataset spec (train = database, test = queries)")
    p.add_argument("--dims", type=_int_list, default=[8, 16, 32, 64], help="nested sizes, e.g. 8,16,32,64")
    p.add_argument("--baseline", nargs="*", default=[], metavar="RUN",
                   help="runs to compare: narrower ones are independent low-dim models, wider ones are truncated")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probes (faster)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/retrieval)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_retrieve)


def cmd_synth(args) -> int:
    from reslab.transfer.synth import synth_glyphs

    r = synth_glyphs(args.alphabet, args.out, n_per_class=args.n_per_class, size=args.size, seed=args.seed,
                     font=args.font, test_fraction=args.test_fraction)
    print(f"{len(r['classes'])} classes x {r['n_per_class']} images ({r['train_per_class']} train / "
          f"{r['test_per_class']} test each), {r['size']}x{r['size']}, fonts: {', '.join(r['fonts'])} -> {r['out']}")
    return 0


def _build_synth(sub) -> None:
    p = sub.add_parser("synth", help="synthetic data sets")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    g = kinds.add_parser("glyphs", help="degraded renderings of an alphabet's letters (Deep Aramaic style) "
                                        "as an ImageFolder")
    g.add_argument("--alphabet", required=True,
                   help="latin, digits, greek, hebrew, phoenician, aramaic, or the characters themselves")
    g.add_argument("--n-per-class", type=int, default=100)
    g.add_argument("--out", required=True, help="folder to create (train/ and test/ inside)")
    g.add_argument("--size", type=int, default=32, help="image side in pixels")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--font", default=None, help="a .ttf/.otf file (default: installed fonts that draw the alphabet)")
    g.add_argument("--test-fraction", type=float, default=0.2)
    g.set_defaults(func=cmd_synth)


COMMANDS: list = [_build_features, _build_probe, _build_finetune, _build_soup, _build_retrieve, _build_synth]
