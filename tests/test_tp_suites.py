"""`pytest bench/ --tp 2` and `pytest accuracy/ --tp 2` on a tiny model: real torchrun, gloo, 2 ranks."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from accuracy_runs import assert_same_rows

REPO = Path(__file__).resolve().parents[1]


def _pytest(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
def test_accuracy_tp2_equals_tp1(tmp_path):
    selection = ["accuracy/", "--model", "internlm-tiny", "-k", "law or marxism"]
    _pytest(*selection, "--results-dir", str(tmp_path / "tp1"))
    _pytest(*selection, "--tp", "2", "--results-dir", str(tmp_path / "tp2"))
    one = (tmp_path / "tp1" / "ceval_internlm-tiny_cpu")
    two = (tmp_path / "tp2" / "ceval_internlm-tiny_cpu")
    rows = _rows(two / "cache.csv")
    assert len(rows) == len({(r["subject"], r["question_id"]) for r in rows}) == 6  # rank 0 alone wrote them
    # every column byte for byte; the log-likelihoods within 1e-4 (tp sums the halves' partial products in
    # another order: the last bits differ)
    assert_same_rows(two / "cache.csv", one / "cache.csv")
    assert (two / "classes_acc.json").read_text() == (one / "classes_acc.json").read_text()


def test_bench_tp2_rows_come_from_two_ranks(tmp_path):
    _pytest("bench/test_performance.py", "--model", "gpt-neox-tiny", "--tp", "2", "--batch-sizes", "1",
            "--case-pairs", "16x4", "--rounds", "1", "--warmup", "1", "--results-dir", str(tmp_path))
    rows = _rows(tmp_path / "performance_gpt-neox-tiny_cpu.csv")
    assert len(rows) == 1  # written once, by rank 0
    row = rows[0]
    assert row["tp"] == "2" and row["status"] == "ok"
    assert float(row["forward_first_token_time(ms)"]) > 0 and float(row["ResponseTime(s)"]) > 0
