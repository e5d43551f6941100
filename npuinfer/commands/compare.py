"""`npuinfer compare RUN_A RUN_B --labels NPU,GPU`: two results directories side by side.

    npuinfer compare results/npu results/gpu --labels NPU,GPU        prints compare.md; writes it with
                                                                     performance.csv and accuracy.csv

Performance rows are matched on (model, batch, input, output), accuracy on subject and category
(and Avg); ratio columns are A/B (对比), difference columns A-B. Rows found in one run only are
listed with a note. See npuinfer/reports/compare.py.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..reports.compare import compare_runs, parse_labels, to_markdown, write_comparison


def add_parser(sub) -> None:
    parser = sub.add_parser("compare", help="two results directories side by side: performance and accuracy (every "
                                            "task) with ratio (A/B) and difference (A-B) columns")
    parser.add_argument("run_a", metavar="RUN_A",
                        help="a results directory (performance_*.csv, a task's <task>_<model>_<device>/)")
    parser.add_argument("run_b", metavar="RUN_B", help="the run to compare with (the ratio's denominator)")
    parser.add_argument("--labels", default=None, metavar="A,B",
                        help="names of the two runs in the tables, e.g. NPU,GPU (default: the directory names)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where compare.md, performance.csv and accuracy.csv go "
                             "(default results/compare_<A>_vs_<B>)")
    parser.set_defaults(run=run)


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "run"


def run(args: argparse.Namespace) -> int:
    labels = parse_labels(args.labels, Path(args.run_a), Path(args.run_b))
    comparison = compare_runs(args.run_a, args.run_b, labels)
    out = Path(args.out) if args.out else Path("results") / f"compare_{_safe(labels.a)}_vs_{_safe(labels.b)}"
    paths = write_comparison(comparison, out)
    print(to_markdown(comparison))
    busy = comparison.busy_warning()
    if busy:
        print(busy, file=sys.stderr)
    for path in paths:
        print(f"wrote {path}")
    return 0
