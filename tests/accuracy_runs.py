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
