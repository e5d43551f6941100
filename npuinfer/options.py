"""Command-line options shared by `npuinfer` subcommands (the pytest plugin mirrors them)."""
from __future__ import annotations

import argparse

from .memory import parse_size
from .registry import DEFAULT_MODEL


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def memory_limit(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help=f"registry name (default {DEFAULT_MODEL} unless --model-path is given)")
    parser.add_argument("--model-path", default=None, help="checkpoint directory as downloaded from the Hub")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | npu[:N] (default auto)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="default fp16 on accelerators, fp32 on cpu")
    parser.add_argument("--max-seq-len", type=positive_int, default=None,
                        help="cap the KV cache (also $MAX_SEQ_LEN)")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"],
                        help="scaled_dot_product_attention (default) or the eager path")
    parser.add_argument("--kernels", default="fused", choices=["fused", "plain"],
                        help="fused: the device's fused ops (each checked against plain torch at load), "
                             "plain: plain torch ops (default fused)")
    parser.add_argument("--compile", action="store_true",
                        help="run the decode step as one graph (cpu: an AOTInductor library; cuda: CUDA graphs; "
                             "npu: torchair); the first run at a new shape builds it")


def model_name(args: argparse.Namespace) -> str | None:
    if args.model is None and args.model_path is None:
        return DEFAULT_MODEL
    return args.model
