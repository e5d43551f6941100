"""`npuinfer quantize --model-path DIR --w8a16|--w8a8 --out DIR2`: write a MindIE-layout W8 checkpoint."""
from __future__ import annotations

import argparse
import json

from ..options import UsageError
from ..quantize import quantize_checkpoint, read_calibration
from ..options import add_model_options
from ..locate import resolve_model_dir


def _layers(text: str) -> set[int]:
    try:
        return {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices separated by commas (0,1,2), got {text!r}") from None


def add_parser(sub) -> None:
    parser = sub.add_parser("quantize", help="quantize a float checkpoint to W8A16 or W8A8 (MindIE layout)")
    add_model_options(parser.add_argument, model_help="registry name (its directory, or its tiny stand-in's cache)",
                      path_help="float checkpoint directory")
    scheme = parser.add_mutually_exclusive_group(required=True)
    scheme.add_argument("--w8a16", dest="scheme", action="store_const", const="W8A16",
                        help="int8 weights per output channel, activations stay floating point")
    scheme.add_argument("--w8a8", dest="scheme", action="store_const", const="W8A8",
                        help="int8 weights and activations (per-tensor activation scale from calibration)")
    parser.add_argument("--out", required=True, help="new directory for the quantized checkpoint")
    parser.add_argument("--calib-file", default=None,
                        help="W8A8 calibration prompts, one per line (default: the Baichuan2 guide's five)")
    parser.add_argument("--skip-layers", type=_layers, default=set(), metavar="0,1,2",
                        help="decoder layers kept in floating point (the guide's roll-back layers)")
    parser.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                        help="W8A8: SmoothQuant activation outliers into the weights first (alpha, e.g. 0.5)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    name, path = args.npuinfer_model, args.npuinfer_model_path
    if name is None and path is None:
        raise UsageError("give the float checkpoint (--model-path DIR) or a registry name (--model)")
    if args.calib_file is not None and args.scheme != "W8A8":
        raise UsageError("--calib-file: only --w8a8 calibrates activations")
    model_dir = resolve_model_dir(name, path) if name else path
    summary = quantize_checkpoint(model_dir, args.out, args.scheme, read_calibration(args.calib_file),
                                  args.skip_layers, args.smooth)
    print(f"wrote {args.out} ({summary['scheme']}, {summary['quantized_linears']} linears quantized, "
          f"{summary['bytes'] / 2**20:.1f} MiB): " + json.dumps(summary, ensure_ascii=False))
    return 0
