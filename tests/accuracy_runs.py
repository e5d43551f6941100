"""`pytest accuracy/` run in a subprocess on C-Eval-format data, and the predictions its cache.csv holds."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_accuracy(results: Path, data: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--device", "cpu",
           "--results-dir", str(results), "--ceval-dir", str(data), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def predictions(results: Path) -> dict[tuple[str, str], str]:
    """(subject, question id) -> prediction, from the one ceval_* run directory under ``results``."""
    (run,) = [p for p in results.iterdir() if p.name.startswith("ceval_")]
    with open(run / "cache.csv", encoding="utf-8", newline="") as f:
        return {(r["subject"], r["question_id"]): r["prediction"] for r in csv.DictReader(f)}


def cache_columns(path: Path) -> tuple[list[list[str]], list[list[float]]]:
    """A cache.csv's rows without their log-likelihoods (file order), and the log-likelihoods (empty where none)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [r[:5] for r in rows], [[float(x) for x in r[5].split(";")] if len(r) > 5 and r[5] else [] for r in rows]


def assert_same_rows(got: Path, want: Path, atol: float = 1e-4) -> None:
    """Two cache.csv files hold the same rows, every column equal but the log-likelihoods, which other kernels or
    other batches compute to other last bits: those within ``atol``."""
    (rows, lps), (ref_rows, ref_lps) = cache_columns(got), cache_columns(want)
    assert rows == ref_rows
    assert all(len(a) == len(b) and all(abs(x - y) < atol for x, y in zip(a, b)) for a, b in zip(lps, ref_lps))
