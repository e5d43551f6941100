"""Configurations measured in processes of their own, taking turns: what comparisons/quant_vs_float.py speed and
comparisons/realsize_vs_hf.py --separate share.

A process per run keeps each configuration's peak memory its own and lets two models that do not fit in memory
together be compared at all. The machine's speed drifts over minutes on a shared VM, so the order is reversed every
other round (A B, B A, A B, ...): a drift then falls on both sides alike instead of always on the one that runs
second.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence

RESULT = "RESULT "  # the line a child reports on; anything else it prints is left alone


def turns(labels: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, label) in the order the processes run: ``labels`` in order in even rounds, reversed in odd ones."""
    for round_ in range(rounds):
        for label in labels if round_ % 2 == 0 else labels[::-1]:
            yield round_, label


def report(result: dict) -> None:
    """In a child: hand ``result`` to the parent."""
    print(RESULT + json.dumps(result), flush=True)


def run_turn(cmd: list[str], what: str) -> dict:
    """Run one child to the end and return what it reported; a failed child stops the benchmark with its output
    (a negative exit code is a signal: -9 is a kill, e.g. by the out-of-memory killer)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{what}: the process failed (exit code {proc.returncode}, "
                         f"{'a report' if lines else 'no report'}): {' '.join(cmd)}")
    return json.loads(lines[-1][len(RESULT):])
