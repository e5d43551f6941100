"""`npuinfer make-tiny NAME DIR`: a tiny checkpoint in the family's real on-disk layout."""
from __future__ import annotations

import argparse

from ..registry import MODELS
from ..tiny import make_tiny


def add_parser(sub) -> None:
    parser = sub.add_parser("make-tiny", help="write a tiny random checkpoint in a family's real layout")
    parser.add_argument("name", choices=[n for n, s in MODELS.items() if s.tiny], metavar="NAME",
                        help="one of: " + ", ".join(n for n, s in MODELS.items() if s.tiny))
    parser.add_argument("dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = make_tiny(args.name, args.dir, seed=args.seed)
    print(f"wrote {args.name} to {out}")
    return 0
