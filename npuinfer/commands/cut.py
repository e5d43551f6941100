"""`npuinfer cut --model-path DIR --tp N`: write DIR/part_model/{0..N-1} for tensor parallel runs."""
from __future__ import annotations

import argparse

from ..options import UsageError
from ..options import add_model_options, positive_int
from ..parallel.cut import cut_checkpoint
from ..locate import resolve_model_dir


def add_parser(sub) -> None:
    parser = sub.add_parser("cut", help="cut a checkpoint into part_model/{rank} for tensor parallel runs")
    add_model_options(parser.add_argument, model_help="registry name (its directory, or its tiny stand-in's cache)",
                      path_help="checkpoint directory; part_model/ is written inside it")
    parser.add_argument("--tp", type=positive_int, required=True, help="tensor parallel size (ranks)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    name, path = args.npuinfer_model, args.npuinfer_model_path
    if name is None and path is None:
        raise UsageError("give the checkpoint directory (--model-path DIR) or a registry name (--model)")
    model_dir = resolve_model_dir(name, path) if name else path
    folders = cut_checkpoint(model_dir, args.tp)
    size = sum(f.stat().st_size for f in folders[0].iterdir()) / 2**20
    print(f"cut {model_dir} for tensor parallel size {args.tp}: wrote {', '.join(map(str, folders))} "
          f"({size:.1f} MiB per rank); run it with torchrun --nproc-per-node {args.tp} -m npuinfer infer "
          f"--model-path {model_dir} --tp {args.tp}")
    return 0
