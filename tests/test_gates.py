"""The regression gates against a baseline directory made by `npuinfer baseline update`.

Performance: the gate's arithmetic on real rows from a real sweep (an equal baseline passes exactly, one
doctored 20% faster fails naming metric, case and both values), then the plugin end to end in
subprocesses: the doctored baseline fails `pytest bench/`, a re-measured run passes against its own
earlier measurement, and a case with no baseline row is reported as not gated, never passed silently.
Accuracy: the same through the accuracy suite's gate (pytest accuracy/ --baseline), on a baseline that
`npuinfer baseline update` wrote.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from npuinfer.ceval.synth import write_synthetic_ceval
from npuinfer.results.baseline import compare_row, gate_values, parse_regression
from npuinfer.results.calibration import calibration_value

REPO = Path(__file__).resolve().parents[1]
FIRST, NEXT = "forward_first_token_time(ms)", "forward_next_token_time(ms)"
TPUT, RESPONSE = "E2E throughput (token/s)", "ResponseTime(s)"
TIME_COLUMNS = [RESPONSE, FIRST, NEXT, "pre_next_token_time(ms)", "post_next_token_time_post(ms)", "TTFT(ms)",
                "TPOT(ms)", "TPOT_p50(ms)", "TPOT_p90(ms)", "TPOT_p99(ms)", "ITL_p50(ms)", "ITL_p90(ms)",
                "ITL_p99(ms)"]
CASES = ["qwen-tiny-bs1-in16-out8", "qwen-tiny-bs2-in16-out8"]
# The tolerance CI gates with (README's test command), chosen from the spread in results/baselines/cpu-tiny/SPREAD.md.
CI_TOLERANCE = "25%"


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # as README's gated sweep runs


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env())


def bench(results: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["-m", "pytest", "bench/test_performance.py", "-p", "no:cacheprovider", "-q", "-rs",
                "--benchmark-disable", "--results-dir", str(results), "--model", "qwen-tiny", "--batch-sizes", "1,2",
                "--case-pairs", "16x8", "--rounds", "10", "--calibrate", *args])


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def write_rows(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def faster(row: dict[str, str], factor: float) -> dict[str, str]:
    """The row as if every time had been ``factor`` times what was measured (0.8: 20% faster)."""
    out = dict(row)
    for column in TIME_COLUMNS:
        if out.get(column):
            out[column] = repr(float(out[column]) * factor)
    out[TPUT] = repr(float(out[TPUT]) / factor)
    rounds = json.loads(out["rounds_detail"])
    out["rounds_detail"] = json.dumps([{k: v * factor for k, v in r.items()} for r in rounds])
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory, npuinfer_cache) -> Path:
    """One real sweep, made into a baseline directory by `npuinfer baseline update`."""
    results = tmp_path_factory.mktemp("run")
    proc = bench(results)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    baseline = tmp_path_factory.mktemp("baselines") / "equal"
    proc = run(["-m", "npuinfer", "baseline", "update", str(results), str(baseline)])
    assert proc.returncode == 0, proc.stderr
    return baseline


@pytest.fixture(scope="module")
def rows(measured) -> list[tuple[dict[str, str], float]]:
    _, perf = read_rows(measured / "performance_qwen-tiny_cpu.csv")
    _, cal = read_rows(measured / "calibration_qwen-tiny_cpu.csv")
    calibration = {r["case_id"]: calibration_value(r) for r in cal}
    assert sorted(calibration) == CASES and all(calibration.values())
    return [(r, calibration[r["case_id"]]) for r in perf]


# ----------------------------------------------------------------------------------------- the arithmetic


def test_max_regression_takes_a_fraction_or_a_percentage():
    assert parse_regression("0.1") == pytest.approx(0.1) and parse_regression("10%") == pytest.approx(0.1)
    assert parse_regression("150%") == pytest.approx(1.5)
    for bad in ("10", "fast", "-5%"):
        with pytest.raises(argparse.ArgumentTypeError, match="fraction such as 0.1 or a percentage such as 10%"):
            parse_regression(bad)


def test_gate_values_come_from_the_rounds_and_the_median_gap(rows):
    for row, _ in rows:
        values = gate_values(row)
        rounds = json.loads(row["rounds_detail"])
        assert len(rounds) == 10
        assert values[FIRST].value == min(r["first_token_ms"] for r in rounds)
        assert values[NEXT].value == float(row["ITL_p50(ms)"])
        batch, output = int(row["batch_size"]), int(row["output_seq_len(Decoding)"])
        e2e_s = (values[FIRST].value + (output - 1) * values[NEXT].value) / 1000
        assert values[TPUT].value == pytest.approx(batch * output / e2e_s)


def test_an_equal_baseline_passes_exactly(rows):
    for row, cal in rows:
        for calibration in (cal, None):
            outcome = compare_row(row, row, calibration=calibration, baseline_calibration=calibration)
            assert outcome.status == "passed" and len(outcome.checks) == 3
            assert all(c.slowdown == pytest.approx(1.0) for c in outcome.checks)


def test_a_baseline_20_percent_faster_fails_naming_metric_case_and_values(rows):
    for row, cal in rows:
        base = faster(row, 0.8)
        outcome = compare_row(row, base, calibration=cal, baseline_calibration=cal, source="b.csv")
        assert outcome.status == "failed"
        assert [c.metric for c in outcome.regressions] == [FIRST, NEXT, TPUT]
        assert all(c.slowdown == pytest.approx(1.25) for c in outcome.checks)
        message = outcome.message()
        assert message.startswith(f"{row['case_id']}: slower than 10% of the baseline (b.csv")
        for check in outcome.checks:
            assert f"{check.metric} (" in message
            assert f"{check.current:.6g} now vs {check.baseline:.6g} in the baseline" in message
            assert "25.0% slower" in message
        # within 30%: passes
        assert compare_row(row, base, calibration=cal, baseline_calibration=cal, max_regression=0.3).status == "passed"


def test_calibration_cancels_a_machine_that_is_uniformly_slower(rows):
    """Every time doubled *and* the reference workload twice as slow: the same code on a slower machine."""
    for row, cal in rows:
        slow = faster(row, 2.0)
        assert compare_row(slow, row).status == "failed"  # raw: 100% slower
        outcome = compare_row(slow, row, calibration=2 * cal, baseline_calibration=cal)
        assert outcome.status == "passed"
        assert all(c.slowdown == pytest.approx(1.0) for c in outcome.checks)


def two_machine_baseline(measured: Path, directory: Path, shift_days: int):
    """A copy of ``measured`` plus the same rows as if measured on "Other CPU" (2x faster, calibration 2x
    faster too) ``shift_days`` later. Returns (perf, cal, other, other_cal) rows."""
    import datetime as dt

    shutil.copytree(measured, directory)
    shifted = lambda r: {**r, "measured_at": (dt.datetime.fromisoformat(r["measured_at"])  # noqa: E731
                                               + dt.timedelta(days=shift_days)).isoformat()}
    header, perf = read_rows(directory / "performance_qwen-tiny_cpu.csv")
    other = [shifted({**faster(r, 0.5), "device_name": "Other CPU"}) for r in perf]
    write_rows(directory / "performance_qwen-tiny_cpu.csv", header, perf + other)
    cal_header, cal = read_rows(directory / "calibration_qwen-tiny_cpu.csv")
    other_cal = [shifted({**r, "calibration(ms)": repr(float(r["calibration(ms)"]) / 2)}) for r in cal]
    write_rows(directory / "calibration_qwen-tiny_cpu.csv", cal_header, cal + other_cal)
    return perf, cal, other, other_cal


def test_a_baseline_keeps_rows_per_cpu_model_with_their_own_calibrations(measured, tmp_path):
    """Rows of two cpu models in one baseline: a run is gated against its own machine's row and that row's
    calibration (nearest in time among rows with the same key); another machine falls back with a note."""
    from npuinfer.results.baseline import PerformanceBaseline

    two = tmp_path / "two"
    perf, cal, other, other_cal = two_machine_baseline(measured, two, shift_days=1)
    baseline = PerformanceBaseline(two)
    for mine, theirs in ((perf, cal), (other, other_cal)):
        for row, expected_cal in zip(mine, theirs):
            found, _, note = baseline.find(row, "cpu")
            assert found == row and note == ""
            assert baseline.calibration(found, "cpu") == expected_cal
    found, _, note = baseline.find({**perf[0], "device_name": "Third CPU"}, "cpu")
    assert found == other[0] and "no baseline row measured on Third CPU" in note


def test_baseline_update_replaces_this_machines_rows_and_keeps_another_machines(measured, tmp_path):
    """Refreshing a baseline from a run on one cpu model keeps the rows (and their calibrations) measured on
    another; a second refresh replaces the first one's rows instead of adding more."""
    from npuinfer.results.baseline import PerformanceBaseline

    two = tmp_path / "two"
    perf, cal, other, other_cal = two_machine_baseline(measured, two, shift_days=-1)
    header, rows = read_rows(two / "performance_qwen-tiny_cpu.csv")  # and a row that names no machine
    write_rows(two / "performance_qwen-tiny_cpu.csv", header, rows + [{**perf[0], "device_name": ""}])
    run_dir = tmp_path / "run"  # this machine's run: the measured baseline's own files
    shutil.copytree(measured, run_dir)

    for _ in range(2):
        proc = run(["-m", "npuinfer", "baseline", "update", str(run_dir), str(two)])
        assert proc.returncode == 0, proc.stderr
        assert f"kept {len(other)} row(s) measured on Other CPU" in proc.stderr
        _, merged = read_rows(two / "performance_qwen-tiny_cpu.csv")
        _, merged_cal = read_rows(two / "calibration_qwen-tiny_cpu.csv")
        assert sorted(map(str, merged)) == sorted(map(str, perf + other))  # each row once
        assert sorted(map(str, merged_cal)) == sorted(map(str, cal + other_cal))
    baseline = PerformanceBaseline(two)
    for mine, theirs in ((perf, cal), (other, other_cal)):
        for row, expected_cal in zip(mine, theirs):
            found, _, _ = baseline.find(row, "cpu")
            assert found == row and baseline.calibration(found, "cpu") == expected_cal


# ----------------------------------------------------------------------------------------- the plugin, end to end


def test_pytest_bench_fails_against_a_baseline_20_percent_faster(measured, tmp_path):
    doctored = tmp_path / "doctored"
    shutil.copytree(measured, doctored)
    header, perf = read_rows(doctored / "performance_qwen-tiny_cpu.csv")
    write_rows(doctored / "performance_qwen-tiny_cpu.csv", header, [faster(r, 0.8) for r in perf])
    results = tmp_path / "results"
    proc = bench(results, "--baseline", str(doctored))
    assert proc.returncode == 1, proc.stdout[-3000:]
    _, now = read_rows(results / "performance_qwen-tiny_cpu.csv")
    _, base = read_rows(doctored / "performance_qwen-tiny_cpu.csv")
    now, base = {r["case_id"]: gate_values(r) for r in now}, {r["case_id"]: gate_values(r) for r in base}
    assert " failed" in proc.stdout.strip().splitlines()[-1], proc.stdout[-3000:]
    named = 0
    for case in CASES:
        if f"{case}: slower than 10% of the baseline ({doctored / 'performance_qwen-tiny_cpu.csv'}" not in proc.stdout:
            continue
        for metric in (FIRST, NEXT, TPUT):  # each regressed metric: its name and both values
            line = f"{metric} ({now[case][metric].how}): {now[case][metric].value:.6g} now vs " \
                   f"{base[case][metric].value:.6g} in the baseline"
            named += line in proc.stdout
    assert named >= 1, proc.stdout[-4000:]
    assert "npuinfer performance gate" in proc.stdout and "REGRESSED qwen-tiny-bs" in proc.stdout


def test_a_case_without_a_baseline_row_warns_and_a_remeasured_run_passes(measured, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(measured, partial)
    header, perf = read_rows(partial / "performance_qwen-tiny_cpu.csv")
    write_rows(partial / "performance_qwen-tiny_cpu.csv", header, [r for r in perf if r["case_id"] == CASES[0]])
    proc = bench(tmp_path / "results", "--baseline", str(partial), "--max-regression", CI_TOLERANCE)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "2 passed" in proc.stdout
    assert "PerformanceBaselineWarning" in proc.stdout  # in pytest's warnings summary
    assert f"{CASES[1]}: performance gate skipped: no row for batch 2, input 16, output 8" in proc.stdout
    assert "1 case(s) within the limit, 0 regressed, 1 NOT GATED" in proc.stdout
    assert f"NOT GATED {CASES[1]}" in proc.stdout


def test_baseline_update_writes_the_files_and_a_manifest(measured):
    names = sorted(p.name for p in measured.iterdir())
    assert names == ["calibration_qwen-tiny_cpu.csv", "manifest.json", "performance_qwen-tiny_cpu.csv"]
    manifest = json.loads((measured / "manifest.json").read_text())
    import torch

    assert manifest["torch"] == torch.__version__ and manifest["device"] == ["cpu (" + manifest["files"][
        "performance_qwen-tiny_cpu.csv"]["device_name"] + ")"]
    assert Path(manifest["source"]).name.startswith("run") and manifest["updated_at"]
    assert manifest["files"]["calibration_qwen-tiny_cpu.csv"]["cpu_threads"] == "1"


def test_baseline_update_refuses_a_directory_without_results(tmp_path):
    proc = run(["-m", "npuinfer", "baseline", "update", str(tmp_path), str(tmp_path / "b")])
    assert proc.returncode == 1 and f"RUN_DIR {tmp_path}: no performance_<model>_<device>.csv" in proc.stderr
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------- accuracy


def accuracy(results: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "-rs", "--device", "cpu", "--results-dir",
                str(results), "--ceval-dir", str(data), *args])


def test_accuracy_gate_on_a_baseline_written_by_baseline_update(tmp_path):
    data = write_synthetic_ceval(tmp_path / "ceval", subjects=["logic", "marxism"], val_per_subject=8,
                                 test_per_subject=2)
    first = accuracy(tmp_path / "run", data)
    assert first.returncode == 0, first.stdout[-3000:]
    baseline = tmp_path / "baseline"
    proc = run(["-m", "npuinfer", "baseline", "update", str(tmp_path / "run"), str(baseline)])
    assert proc.returncode == 0, proc.stderr
    acc_file = baseline / "ceval_qwen-tiny_cpu" / "subject_acc.json"
    assert sorted(p.name for p in acc_file.parent.iterdir()) == ["cache_meta.json", "classes_acc.json",
                                                                  "subject_acc.json"]
    accs = json.loads(acc_file.read_text())

    equal = accuracy(tmp_path / "equal", data, "--baseline", str(baseline))  # fresh results: scored again
    assert equal.returncode == 0, equal.stdout[-3000:]
    assert "2 passed" in equal.stdout

    doctored = json.loads(acc_file.read_text())
    doctored["logic"] = accs["logic"] + 0.2
    del doctored["marxism"]
    acc_file.write_text(json.dumps(doctored))
    worse = accuracy(tmp_path / "worse", data, "--baseline", str(baseline))
    assert worse.returncode == 1, worse.stdout[-3000:]
    assert f"qwen-tiny-logic: accuracy {accs['logic']!r}" in worse.stdout
    assert f"below the baseline {doctored['logic']!r}" in worse.stdout
    assert "qwen-tiny-marxism: no baseline accuracy" in worse.stdout  # not gated, and says so


# ----------------------------------------------------------------------------------------- CI


def ci_test_lines() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [line[: -len("; passed_or_empty")] for line in lines if line.endswith("; passed_or_empty")]


def test_ci_runs_readme_test_lines_verbatim():
    readme = (REPO / "README.md").read_text().splitlines()
    ci = ci_test_lines()
    assert ci[0] == "python -m pytest" and len(ci) == 3
    for line in ci:
        assert line in readme, line
    assert f"--max-regression {CI_TOLERANCE}" in ci[1] and "--baseline results/baselines/cpu-tiny" in ci[2]


@pytest.mark.parametrize("status, survives", [(0, True), (5, True), (1, False), (2, False)])
def test_ci_accepts_pytest_exit_code_5_and_stops_on_failures(status, survives):
    text = (REPO / ".ci" / "run").read_text()
    function = text[text.index("passed_or_empty() {"):text.index("\n}\n") + 3]
    proc = subprocess.run(["bash", "-c", f"set -u\n{function}\n(exit {status}); passed_or_empty\necho went-on"],
                          capture_output=True, text=True, timeout=30)
    assert ("went-on" in proc.stdout) is survives
    assert proc.returncode == (0 if survives else status)
