"""`reslab reproduce PAPER`: one command per reproduced paper result."""
from __future__ import annotations


def _run(args) -> int:
    from reslab.reproduce.he2016 import reproduce_he2016_cifar

    overrides = {k: v for k, v in {"device": args.device, "amp": args.amp,
                                   "progress": False if args.no_progress else None}.items() if v is not None}
    result = reproduce_he2016_cifar(args.data, depths=[int(d) for d in args.depths.split(",")], plain=args.plain,
                                    budget=args.budget, seeds=args.seeds, out=args.out, overrides=overrides)
    print(open(result["files"][0]).read())
    print("wrote " + ", ".join(result["files"]))
    return 0


def build_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="reproduce a paper's headline result (he2016-cifar: Table 6 and Figure 6)")
    p.add_argument("paper", choices=["he2016-cifar"])
    p.add_argument("--data", required=True,
                   help="CIFAR-10: cifar10:DIR (python batches) or an ImageFolder with train/ and test/")
    p.add_argument("--depths", default="20,56", help="comma-separated depths from 20,32,44,56,110(,1202)")
    p.add_argument("--plain", action=__import__("argparse").BooleanOptionalAction, default=True,
                   help="also train the plain counterparts (Figure 6, left)")
    p.add_argument("--budget", choices=["full", "short"], default="short",
                   help="full: the paper's 64k iterations (GPU); short: a 2-core-CPU budget of the same shape")
    p.add_argument("--seeds", type=int, default=1, help="runs per network (mean ± std in the table)")
    p.add_argument("--out", default="reproductions/he2016-cifar")
    p.add_argument("--device", default=None)
    p.add_argument("--amp", default=None, choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


COMMANDS: list = [build_reproduce]
