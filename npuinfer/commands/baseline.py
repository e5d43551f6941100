"""`npuinfer baseline update RUN_DIR BASELINE_DIR`: make or refresh a baseline from a run.

    npuinfer baseline update results/run1 results/baselines/cpu-tiny
    npuinfer baseline update results/npu results/baselines/npu-qwen7b --model qwen-7b

Copies the run's performance CSVs with their calibrations and the C-Eval accuracy files
(subject_acc.json, classes_acc.json, cache_meta.json) into BASELINE_DIR, replacing the same files and
keeping the others, and records their source, date, torch and device in BASELINE_DIR/manifest.json.
A performance CSV keeps the rows (and calibrations) measured on other machines (cpu models): only the
run's own machine's rows are replaced.
Gate a later run with ``pytest bench/ accuracy/ --baseline BASELINE_DIR``.
"""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    parser = sub.add_parser("baseline", help="make or refresh a baseline directory from a run")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    update = actions.add_parser("update", help="copy a run's performance CSVs, calibrations and C-Eval accuracy "
                                               "files into a baseline directory, with a manifest")
    update.add_argument("run_dir", metavar="RUN_DIR", help="a results directory, e.g. results/ or results/run1")
    update.add_argument("baseline_dir", metavar="BASELINE_DIR", help="e.g. results/baselines/cpu-tiny")
    update.add_argument("--model", action="append", default=None, dest="models",
                        help="only this model's files (repeat for several)")
    update.set_defaults(run=run_update)


def run_update(args: argparse.Namespace) -> int:
    from ..results.baseline import update_baseline

    written, warnings = update_baseline(args.run_dir, args.baseline_dir, args.models)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    return 0
