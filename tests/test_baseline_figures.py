"""Every figure the performance gate reads from a baseline must be a finite number above zero. A NaN compares
false against the limit, an Infinity gives a slowdown of 0, a negative one a negative slowdown (each passed
every case), and an infinite calibration divided by zero. The gate, `baseline update` and `baseline verify`
each refuse such a row, naming the file, the line and the column. Real files: copies of the committed
baseline results/baselines/cpu-tiny."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from npuinfer.cli import main
from npuinfer.gates.performance import BaselineError, PerformanceBaseline, gate_case
from npuinfer.gates.baseline_store import verify_baseline
from npuinfer.results.table import read_csv, write_csv

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "results" / "baselines" / "cpu-tiny"
QWEN, QWEN_CAL = "performance_qwen-tiny_cpu.csv", "calibration_qwen-tiny_cpu.csv"
FIRST = "forward_first_token_time(ms)"
BAD = ["nan", "NaN", "inf", "-Infinity", "-0.9", "0", "fast"]


def set_cell(path: Path, column: str, value: str, *, line: int = 2, drop_rounds: bool = False) -> dict[str, str]:
    """Rewrite one cell of a CSV (``line`` counts the header as 1); returns the row as it was."""
    header, rows = read_csv(path)
    original = dict(rows[line - 2])
    rows[line - 2][column] = value
    if drop_rounds:  # a row without per-round figures: the gate reads its columns
        rows[line - 2]["rounds_detail"] = ""
    write_csv(path, header, rows)
    return original


@pytest.fixture
def baseline(tmp_path) -> Path:
    copy = tmp_path / "baseline"
    shutil.copytree(COMMITTED, copy)
    return copy


def qwen_case(directory: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The first qwen-tiny case's row and calibration row, as this run measured them (the committed ones)."""
    return read_csv(COMMITTED / QWEN)[1][0], read_csv(COMMITTED / QWEN_CAL)[1][0]


@pytest.mark.parametrize("value", BAD)
def test_the_gate_refuses_a_baseline_figure_that_is_not_finite_and_positive(baseline, value):
    set_cell(baseline / QWEN, FIRST, value, drop_rounds=True)
    row, cal = qwen_case(baseline)
    with pytest.raises(BaselineError) as caught:
        gate_case(PerformanceBaseline(baseline), row, "cpu", calibration=cal)
    assert f"{baseline / QWEN}: line 2 ({row['case_id']}): column {FIRST} is {value!r}" in str(caught.value)


def test_the_gate_refuses_a_figure_inside_the_rounds_and_an_infinite_calibration(baseline):
    header, rows = read_csv(baseline / QWEN)
    rounds = json.loads(rows[1]["rounds_detail"])
    rounds[2]["itl_min_ms"] = float("nan")
    rows[1]["rounds_detail"] = json.dumps(rounds)
    write_csv(baseline / QWEN, header, rows)
    row, cal = qwen_case(baseline)
    with pytest.raises(BaselineError, match=r"line 3 \(.*\): column rounds_detail round 3 itl_min_ms is nan"):
        gate_case(PerformanceBaseline(baseline), row, "cpu", calibration=cal)

    shutil.copyfile(COMMITTED / QWEN, baseline / QWEN)
    set_cell(baseline / QWEN_CAL, "calibration_min(ms)", "inf")  # was a ZeroDivisionError
    with pytest.raises(BaselineError) as caught:
        gate_case(PerformanceBaseline(baseline), row, "cpu", calibration=cal)
    assert f"{baseline / QWEN_CAL}: line 2 (qwen-tiny-bs1-in32-out32): column calibration_min(ms) is 'inf'" \
        in str(caught.value)


def test_baseline_update_refuses_a_run_with_a_nan_and_leaves_the_baseline_as_it_was(baseline, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(COMMITTED, run, ignore=shutil.ignore_patterns("manifest.json", "*.md"))
    set_cell(run / QWEN, "E2E throughput (token/s)", "Infinity", line=3)
    before = {p: p.read_bytes() for p in baseline.rglob("*") if p.is_file()}
    assert main(["baseline", "update", str(run), str(baseline)]) == 1
    err = capsys.readouterr().err
    assert f"{run / QWEN}: line 3 (qwen-tiny-bs8-in32-out32): column E2E throughput (token/s) is 'Infinity'" in err
    assert {p: p.read_bytes() for p in baseline.rglob("*") if p.is_file()} == before


def test_baseline_verify_names_a_nan_that_the_manifest_matches(baseline, capsys):
    """A baseline written by an npuinfer that let the NaN in: its hash and row count match the manifest."""
    set_cell(baseline / QWEN, FIRST, "-1.5", line=2)
    set_cell(baseline / QWEN_CAL, "calibration(ms)", "nan", line=3)
    manifest = json.loads((baseline / "manifest.json").read_text(encoding="utf-8"))
    for name in (QWEN, QWEN_CAL):
        manifest["files"][name]["sha256"] = hashlib.sha256((baseline / name).read_bytes()).hexdigest()
    (baseline / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _, problems = verify_baseline(baseline)
    assert f"{baseline / QWEN}: line 2 (qwen-tiny-bs1-in32-out32): column {FIRST} is '-1.5'" in problems
    assert any(p.startswith(f"{baseline / QWEN_CAL}: line 3 (") and p.endswith("column calibration(ms) is 'nan'")
               for p in problems), problems
    assert main(["baseline", "verify", str(baseline)]) == 1
