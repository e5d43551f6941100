"""The `npuinfer` command. Each subcommand is a module in npuinfer/commands/ with
``add_parser(subparsers)`` and ``run(args) -> int``; they are discovered, not listed here."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .options import UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npuinfer", description="LLM inference benchmarks and accuracy on npu, cuda, cpu")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UsageError as exc:
        parser.error(str(exc))
    except (ValueError, LookupError, RuntimeError, OSError) as exc:
        # Errors from bad input carry their own message naming the file, field or option.
        print(f"npuinfer {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
