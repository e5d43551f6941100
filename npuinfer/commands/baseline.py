"""`npuinfer baseline update RUN_DIR BASELINE_DIR`: make or refresh a baseline from a run;
`npuinfer baseline verify BASELINE_DIR`: check it against its manifest.

    npuinfer baseline update results/run1 results/baselines/cpu-tiny
    npuinfer baseline update results/npu results/baselines/npu-qwen7b --model qwen-7b
    npuinfer baseline verify results/baselines/cpu-tiny

Copies the run's performance CSVs with their calibrations and each accuracy task's folder (ceval_, mmlu_, ...:
subject_acc.json, classes_acc.json, cache_meta.json, cache.csv) into BASELINE_DIR, replacing the same files and
keeping the others, and records their source, date, torch and device in BASELINE_DIR/manifest.json.
A performance CSV keeps the rows (and calibrations) measured on other machines (cpu models): only the
run's own machine's rows are replaced. An update is all or nothing: the directory is staged as a whole
and swapped in by one rename, so a killed update leaves the old baseline or the new one.
`verify` checks every file the manifest lists (sha256, and row count for a CSV) and that every baseline
file is listed; exit 1 naming each file that differs.
Gate a later run with ``pytest bench/ accuracy/ --baseline BASELINE_DIR``.
"""
from __future__ import annotations

import argparse
import sys

from ..gates.baseline_store import update_baseline, verify_baseline


def add_parser(sub) -> None:
    parser = sub.add_parser("baseline", help="make or refresh a baseline directory from a run")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    update = actions.add_parser("update", help="copy a run's performance CSVs, calibrations and accuracy (every task) "
                                               "files into a baseline directory, with a manifest")
    update.add_argument("run_dir", metavar="RUN_DIR", help="a results directory, e.g. results/ or results/run1")
    update.add_argument("baseline_dir", metavar="BASELINE_DIR", help="e.g. results/baselines/cpu-tiny")
    update.add_argument("--model", action="append", default=None, dest="models",
                        help="only this model's files (repeat for several)")
    update.set_defaults(run=run_update)
    verify = actions.add_parser("verify", help="check a baseline directory's files against its manifest.json "
                                               "(sha256, row counts, nothing unlisted)")
    verify.add_argument("baseline_dir", metavar="BASELINE_DIR", help="e.g. results/baselines/cpu-tiny")
    verify.set_defaults(run=run_verify)


def run_update(args: argparse.Namespace) -> int:
    written, warnings = update_baseline(args.run_dir, args.baseline_dir, args.models)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    checked, problems = verify_baseline(args.baseline_dir)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"{args.baseline_dir}: {len(problems)} problem(s) against manifest.json", file=sys.stderr)
        return 1
    print(f"{args.baseline_dir}: {checked} files match manifest.json (sha256, row counts)")
    return 0
