"""`npuinfer report KIND DIR`: rebuild a run's result files from its raw rows, no model needed.

    npuinfer report ceval results/ceval_qwen-7b_npu0     JSON, markdown and chart from cache.csv alone
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..ceval.aggregate import aggregate
from ..ceval.cache import META_FILE, read_cache, read_meta
from ..ceval.report import rebuild_report
from ..ceval.rows import rules_for, task_of
from ..options import UsageError
from ..results.table import accuracy_text


def add_parser(sub) -> None:
    parser = sub.add_parser("report", help="rebuild result files from a run's raw rows")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    ceval = kinds.add_parser("ceval", help="C-Eval: subject_acc.json, classes_acc.json, summary.md and the "
                                           "chart from cache.csv and cache_meta.json (part files merged first)")
    ceval.add_argument("dir", help="a C-Eval results directory, e.g. results/ceval_qwen-tiny_cpu (or another "
                                   "task's, e.g. results/mmlu_qwen-tiny_cpu)")
    ceval.set_defaults(run=run_ceval)


def run_ceval(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    check_ceval_dir(Path(args.dir))
    paths = rebuild_report(args.dir)
    rows = read_cache(args.dir)
    if all(r.answer is not None for r in rows):
        classes = aggregate(rows, rules_for(task_of(read_meta(args.dir))).spec).classes  # C-Eval's, or the task's
        table = [(k, t.total, t.correct, accuracy_text(t.accuracy)) for k, t in classes.items()]
        print(tabulate(table, headers=["category", "n", "correct", "accuracy"], tablefmt="github",
                       disable_numparse=True))
    else:
        print(f"{len(rows)} test-split predictions (no answers, no accuracy)")
    for path in paths:
        print(f"wrote {path}")
    return 0


def check_ceval_dir(path: Path) -> None:
    """A results folder that holds C-Eval runs (``ceval_*/``) rather than being one is named with them."""
    if (path / META_FILE).exists() or not path.is_dir():
        return
    runs = sorted(p for p in path.glob("ceval_*") if (p / META_FILE).is_file())
    if runs:
        raise UsageError(f"{path}: holds C-Eval runs rather than being one (no {META_FILE} in it); give one of: "
                         + ", ".join(str(p) for p in runs))
