"""The regression gates against a baseline directory made by `npuinfer baseline update`.

Performance: the gate's arithmetic on real rows from a real sweep (an equal baseline passes exactly, one
doctored 20% faster fails naming metric, case and both values); then the plugin in `pytest bench/`
subprocesses whose measurements are scripted (tests/scripted_timing.py), so every verdict follows from
known figures: a slower case fails naming metric, case and both values, calibration cancels a slower
machine, a case with no baseline row is reported as not gated, never passed silently. No test here
asserts how a real measurement compares with another: the one gated run on real measurements uses an 11x
tolerance against a baseline doctored 100x faster, which no noise reaches either way.
The accuracy gate on a baseline that `npuinfer baseline update` wrote is tests/test_accuracy_gate.py's (and
the subject gate tests/test_accuracy_suite.py::test_baseline_gate's).
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

from npuinfer.gates.performance import PerformanceBaseline, compare_row, gate_case, gate_values, parse_regression
from npuinfer.results.calibration import CALIBRATION_MIN, calibration_value

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
    calibration = {r["case_id"]: calibration_value(r, CALIBRATION_MIN) for r in cal}
    assert sorted(calibration) == CASES and all(calibration.values())
    assert all(calibration_value(r, CALIBRATION_MIN) <= calibration_value(r) for r in cal)
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


def test_the_fastest_reading_is_the_fastest_gap_of_any_round(rows):
    for row, _ in rows:
        values = gate_values(row, "fastest")
        rounds = json.loads(row["rounds_detail"])
        assert all(r["itl_min_ms"] > 0 for r in rounds)
        assert values[NEXT].value == min(r["itl_min_ms"] for r in rounds) <= float(row["ITL_p50(ms)"])
        assert values[NEXT].how == "fastest inter-token gap over 10 rounds"
        assert values[FIRST].value == gate_values(row)[FIRST].value  # the best round either way


def slow_spell(row: dict[str, str]) -> dict[str, str]:
    """The row as if the machine had run at half speed for all but its fastest round: every median and mean
    doubled, the fastest readings as they were."""
    out = faster(row, 2.0)
    rounds = json.loads(row["rounds_detail"])
    best = min(range(len(rounds)), key=lambda i: rounds[i]["first_token_ms"])
    fastest_gap = min(range(len(rounds)), key=lambda i: rounds[i]["itl_min_ms"])
    slow = json.loads(out["rounds_detail"])
    slow[best]["first_token_ms"] = rounds[best]["first_token_ms"]
    slow[fastest_gap]["itl_min_ms"] = rounds[fastest_gap]["itl_min_ms"]
    out["rounds_detail"] = json.dumps(slow)
    return out


def test_a_slow_spell_of_the_machine_moves_the_typical_reading_but_not_the_fastest(rows):
    for row, cal in rows:
        spell = slow_spell(row)
        assert compare_row(spell, row, estimator="fastest").status == "passed"
        assert compare_row(spell, row).estimator == "fastest"  # both rows carry the fastest gaps
        typical = compare_row(spell, row, estimator="typical")
        assert typical.status == "failed" and NEXT in [c.metric for c in typical.regressions]


def test_rows_and_calibrations_from_before_the_fastest_figures_are_read_the_typical_way(measured, rows, tmp_path):
    """Baseline rows written before rounds carried itl_min_ms (the committed AMD rows) are still gated: by the
    median gap over the median calibration step, on both sides."""
    old = tmp_path / "old"
    shutil.copytree(measured, old)
    header, perf = read_rows(old / "performance_qwen-tiny_cpu.csv")
    for r in perf:
        r["rounds_detail"] = json.dumps([{k: v for k, v in x.items() if k != "itl_min_ms"}
                                         for x in json.loads(r["rounds_detail"])])
    write_rows(old / "performance_qwen-tiny_cpu.csv", header, perf)
    cal_header, cals = read_rows(old / "calibration_qwen-tiny_cpu.csv")
    write_rows(old / "calibration_qwen-tiny_cpu.csv", [c for c in cal_header if c != CALIBRATION_MIN],
               [{k: v for k, v in c.items() if k != CALIBRATION_MIN} for c in cals])
    _, now_cals = read_rows(measured / "calibration_qwen-tiny_cpu.csv")
    now_cal = {c["case_id"]: c for c in now_cals}
    for row, _ in rows:
        outcome = gate_case(PerformanceBaseline(old), row, "cpu", calibration=now_cal[row["case_id"]])
        assert outcome.estimator == "typical" and outcome.status == "passed"
        median = calibration_value(now_cal[row["case_id"]])
        assert outcome.calibration == (median, median)
        check = {c.metric: c for c in outcome.checks}[NEXT]
        assert check.how.startswith("median inter-token gap") and check.current == float(row["ITL_p50(ms)"])
        # the fastest figures of both sides when both have them
        fresh = gate_case(PerformanceBaseline(measured), row, "cpu", calibration=now_cal[row["case_id"]])
        assert fresh.estimator == "fastest" and fresh.calibration[0] == calibration_value(now_cal[row["case_id"]],
                                                                                           CALIBRATION_MIN)


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
    from npuinfer.gates.performance import PerformanceBaseline

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
    from npuinfer.gates.performance import PerformanceBaseline

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


# ----------------------------------------------------------------------------------------- the plugin, scripted
# The gate in a real `pytest bench/` session whose measurements give known figures (tests/scripted_timing.py):
# outcomes that depend on nothing but the figures written here.

BASE = {"first_ms": 10.0, "next_ms": 2.0}  # every scripted baseline case; output 8: 333.33 token/s at batch 1


def scaled(factor: float, calibration_ms: float = 1.0) -> dict[str, float]:
    """The baseline's figures with every time ``factor`` times as long."""
    return {"first_ms": BASE["first_ms"] * factor, "next_ms": BASE["next_ms"] * factor,
            "calibration_ms": calibration_ms}


def scripted_bench(results: Path, script: dict[str, list[dict[str, float]]], *args: str
                   ) -> subprocess.CompletedProcess:
    results.mkdir(parents=True, exist_ok=True)
    script_file = results / "scripted_timing.json"
    script_file.write_text(json.dumps(script))
    path = os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_performance.py", "-p", "scripted_timing", "-p",
         "no:cacheprovider", "-q", "-rs", "--benchmark-disable", "--results-dir", str(results), "--model", "qwen-tiny",
         "--batch-sizes", "1,2", "--case-pairs", "16x8", "--rounds", "10", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**env(), "PYTHONPATH": path, "NPUINFER_SCRIPTED_TIMING": str(script_file)})


@pytest.fixture(scope="module")
def scripted_baseline(tmp_path_factory, npuinfer_cache) -> Path:
    """A baseline made by `npuinfer baseline update` from a scripted sweep: both cases at BASE, calibration 1 ms."""
    results = tmp_path_factory.mktemp("scripted_run")
    proc = scripted_bench(results, {case: [scaled(1.0)] for case in CASES}, "--calibrate")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    baseline = tmp_path_factory.mktemp("baselines") / "scripted"
    proc = run(["-m", "npuinfer", "baseline", "update", str(results), str(baseline)])
    assert proc.returncode == 0, proc.stderr
    return baseline


def test_pytest_bench_fails_a_case_slower_than_the_baseline_naming_metric_case_and_both_values(
        scripted_baseline, tmp_path):
    """One case 25% slower in every metric fails the default 10% limit; one 5% slower passes."""
    proc = scripted_bench(tmp_path / "results", {CASES[0]: [scaled(1.25)], CASES[1]: [scaled(1.05)]},
                          "--baseline", str(scripted_baseline))
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "1 failed, 1 passed" in proc.stdout
    source = scripted_baseline / "performance_qwen-tiny_cpu.csv"
    assert f"{CASES[0]}: slower than 10% of the baseline ({source}" in proc.stdout
    expected = [(FIRST, "best of 10 rounds", 12.5, 10.0), (NEXT, "fastest inter-token gap", 2.5, 2.0),
                (TPUT, "batch x output", 8 / 0.0300, 8 / 0.024)]
    for metric, how, now, base in expected:
        line = next(x for x in proc.stdout.splitlines() if x.strip().startswith(f"{metric} ({how}"))
        assert line.endswith(f"25.0% slower; raw (uncalibrated) {now:.6g} now vs {base:.6g} in the baseline"), line
        assert ": calibrated (" in line
    assert "npuinfer performance gate" in proc.stdout
    assert "1 case(s) within the limit, 1 regressed, 0 NOT GATED" in proc.stdout
    assert f"REGRESSED {CASES[0]}" in proc.stdout and f"REGRESSED {CASES[1]}" not in proc.stdout
    assert "largest change against the baseline: 25.0% slower" in proc.stdout


def test_calibration_cancels_a_uniformly_slower_machine_end_to_end(scripted_baseline, tmp_path):
    """Every time twice as long *and* the reference workload twice as slow passes (raw, the same rows fail:
    test_calibration_cancels_a_machine_that_is_uniformly_slower)."""
    script = {case: [scaled(2.0, calibration_ms=2.0)] for case in CASES}
    calibrated = scripted_bench(tmp_path / "calibrated", script, "--baseline", str(scripted_baseline))
    assert calibrated.returncode == 0, calibrated.stdout[-4000:]
    assert "2 case(s) within the limit, 0 regressed" in calibrated.stdout
    assert "largest change against the baseline: 0.0% " in calibrated.stdout


def test_a_case_without_a_baseline_row_is_not_gated_and_says_so(scripted_baseline, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(scripted_baseline, partial)
    header, perf = read_rows(partial / "performance_qwen-tiny_cpu.csv")
    write_rows(partial / "performance_qwen-tiny_cpu.csv", header, [r for r in perf if r["case_id"] == CASES[0]])
    proc = scripted_bench(tmp_path / "results", {case: [scaled(1.0)] for case in CASES}, "--baseline", str(partial))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "2 passed" in proc.stdout
    assert "PerformanceBaselineWarning" in proc.stdout  # in pytest's warnings summary
    assert f"{CASES[1]}: performance gate skipped: no row for batch 2, input 16, output 8" in proc.stdout
    assert "1 case(s) within the limit, 0 regressed, 1 NOT GATED" in proc.stdout
    assert f"NOT GATED {CASES[1]}" in proc.stdout


def gate_attempts(results: Path) -> dict[str, tuple[str, list[dict]]]:
    """case id -> (gate_retries, gate_attempts) of the run's rows."""
    _, rows = read_rows(results / "performance_qwen-tiny_cpu.csv")
    return {r["case_id"]: (r["gate_retries"], json.loads(r["gate_attempts"])) for r in rows}


def test_a_case_beyond_the_limit_is_measured_again_and_fails_only_if_a_metric_always_is(scripted_baseline, tmp_path):
    """Confirm before failing: 50% slower once, then as fast as the baseline, passes (and says so); 50% slower
    in every attempt fails, each attempt's figures in the row and in the message."""
    script = {CASES[0]: [scaled(1.5), scaled(1.0)], CASES[1]: [scaled(1.5)]}
    results = tmp_path / "results"
    proc = scripted_bench(results, script, "--baseline", str(scripted_baseline))
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "1 failed, 1 passed" in proc.stdout
    attempts = gate_attempts(results)
    retries, passed = attempts[CASES[0]]
    assert retries == "3" and [a["verdict"] for a in passed] == ["failed", "passed"]
    assert [a["metrics"][FIRST]["now"] for a in passed] == [15.0, 10.0]
    assert [a["metrics"][NEXT]["slowdown"] for a in passed] == [1.5, 1.0]
    assert all(a["calibration_ms"] == 1.0 and a["baseline_calibration_ms"] == 1.0 for a in passed)
    retries, failed = attempts[CASES[1]]
    assert retries == "3" and [a["verdict"] for a in failed] == ["failed"] * 4
    # every attempt's rounds are kept, numbered
    records = [json.loads(line) for line in (results / "performance_qwen-tiny_cpu.rounds.jsonl").read_text().splitlines()]
    assert [(r["case_id"], r["gate_attempt"]) for r in records] == [(CASES[0], 1), (CASES[0], 2), (CASES[1], 1),
                                                                     (CASES[1], 2), (CASES[1], 3), (CASES[1], 4)]
    out = proc.stdout
    assert f"{CASES[1]}: slower than 10% of the baseline" in out and "4 attempts, 4 beyond the limit; " in out
    assert f"{FIRST} beyond it in every attempt (best 50.0% slower)" in out
    attempt_line = (f"beyond the limit: {FIRST} calibrated 15 vs 10 (50.0% slower; raw 15 vs 10), "
                    f"{NEXT} calibrated 3 vs 2 (50.0% slower; raw 3 vs 2)")
    assert all(f"  attempt {i}: {attempt_line}" in out for i in (1, 2, 3, 4)), out[-4000:]
    assert f"REGRESSED {CASES[1]}" in out
    assert f"RE-MEASURED {CASES[0]}: within 10% of the baseline" in out
    assert "2 attempts, 1 beyond the limit; no metric beyond it in every attempt" in out
    assert f"  attempt 2: within the limit: {FIRST} calibrated 10 vs 10 (0.0% slower; raw 10 vs 10)" in out
    assert "1 case(s) within the limit, 1 regressed, 0 NOT GATED" in out
    assert "1 within the limit only when re-measured" in out


def test_a_case_fails_only_when_the_same_metric_is_beyond_the_limit_in_every_attempt(scripted_baseline, tmp_path):
    """At 25% with one retry: first-token time 50% slower, then next-token time 30% slower (throughput within
    25% both times) passes; both slower twice fails."""
    script = {CASES[0]: [{"first_ms": 15.0, "next_ms": 2.0}, {"first_ms": 10.0, "next_ms": 2.6}],
              CASES[1]: [scaled(1.5), scaled(1.5)]}
    proc = scripted_bench(tmp_path / "results", script, "--baseline", str(scripted_baseline), "--max-regression",
                          "25%", "--gate-retries", "1")
    assert proc.returncode == 1 and "1 failed, 1 passed" in proc.stdout, proc.stdout[-4000:]
    attempts = gate_attempts(tmp_path / "results")
    assert [a["verdict"] for a in attempts[CASES[0]][1]] == ["failed", "failed"]  # each attempt beyond, on its own
    assert [a["verdict"] for a in attempts[CASES[1]][1]] == ["failed", "failed"]
    assert f"RE-MEASURED {CASES[0]}: within 25% of the baseline" in proc.stdout
    assert f"REGRESSED {CASES[1]}" in proc.stdout


def test_a_gated_run_that_compares_nothing_fails_saying_why(scripted_baseline, tmp_path):
    """Every case skipped (too long for MAX_SEQ_LEN), or a baseline with no row for any case: not a pass."""
    script = {case: [scaled(1.0)] for case in CASES}
    short = scripted_bench(tmp_path / "short", script, "--baseline", str(scripted_baseline), "--max-seq-len", "20")
    assert short.returncode == 1, short.stdout[-4000:]
    assert "2 skipped" in short.stdout
    assert "0 case(s) within the limit, 0 regressed, 2 NOT GATED" in short.stdout
    assert f"NOT GATED {CASES[0]}: not measured, so not compared with the baseline (Skipped: qwen-tiny: input 16 " \
           "+ output 8 = 24 tokens exceeds the 20" in short.stdout
    assert f"FAILED no performance case was compared with --baseline {scripted_baseline}: 2 NOT GATED" in short.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text("{}")
    unrelated = scripted_bench(tmp_path / "unrelated", script, "--baseline", str(empty))
    assert unrelated.returncode == 1, unrelated.stdout[-4000:]
    assert "2 passed" in unrelated.stdout  # each case ran; the session fails
    assert f"NOT GATED {CASES[1]}: performance gate skipped: no performance_qwen-tiny_cpu.csv in {empty}" \
           in unrelated.stdout
    assert f"FAILED no performance case was compared with --baseline {empty}" in unrelated.stdout


def test_require_baseline_fails_every_case_not_gated(scripted_baseline, tmp_path):
    """--require-baseline (CI): a case with no baseline row fails, and so does a skipped one."""
    partial = tmp_path / "partial"
    shutil.copytree(scripted_baseline, partial)
    header, perf = read_rows(partial / "performance_qwen-tiny_cpu.csv")
    write_rows(partial / "performance_qwen-tiny_cpu.csv", header, [r for r in perf if r["case_id"] == CASES[0]])
    proc = scripted_bench(tmp_path / "results", {case: [scaled(1.0)] for case in CASES}, "--baseline", str(partial),
                          "--require-baseline", "--case-pairs", "16x8,2040x16")
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "3 failed, 1 passed" in proc.stdout
    out = proc.stdout
    assert f"{CASES[1]}: performance gate skipped: no row for batch 2, input 16, output 8" in out
    assert "NOT GATED, and --require-baseline asks every case to be compared with a baseline row" in out
    for batch in (1, 2):
        assert f"_ test_performance[qwen-tiny-bs{batch}-in2040-out16] _" in out  # a failure, no longer a skip
        assert f"NOT GATED qwen-tiny-bs{batch}-in2040-out16: not measured" in out
    assert "1 case(s) within the limit, 0 regressed, 3 NOT GATED" in out


# ----------------------------------------------------------------------------------------- the plugin, measured
# The one gated run on real measurements: a tolerance no noise can reach, either way (11x).


def test_a_real_sweep_passes_against_itself_and_fails_a_baseline_100x_faster(measured, tmp_path):
    doctored = tmp_path / "doctored"
    shutil.copytree(measured, doctored)
    header, perf = read_rows(doctored / "performance_qwen-tiny_cpu.csv")
    write_rows(doctored / "performance_qwen-tiny_cpu.csv", header,
               [faster(r, 0.01) if r["case_id"] == CASES[1] else r for r in perf])
    results = tmp_path / "results"
    proc = bench(results, "--baseline", str(doctored), "--max-regression", "1000%")
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "1 failed, 1 passed" in proc.stdout
    assert f"{CASES[1]}: slower than 1000% of the baseline ({doctored / 'performance_qwen-tiny_cpu.csv'}" \
        in proc.stdout
    _, now = read_rows(results / "performance_qwen-tiny_cpu.csv")
    _, base = read_rows(doctored / "performance_qwen-tiny_cpu.csv")
    now = {r["case_id"]: gate_values(r, "fastest") for r in now}
    base = {r["case_id"]: gate_values(r, "fastest") for r in base}
    for metric in (FIRST, NEXT, TPUT):
        line = next(x.strip() for x in proc.stdout.splitlines()
                    if x.strip().startswith(f"{metric} ({now[CASES[1]][metric].how}): "))
        assert line.endswith(f"{now[CASES[1]][metric].value:.6g} now vs {base[CASES[1]][metric].value:.6g} in the "
                             "baseline"), line
    assert "1 case(s) within the limit, 1 regressed, 0 NOT GATED" in proc.stdout


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


# ----------------------------------------------------------------------------------------- CI


def ci_test_lines() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [line[: -len("; passed_or_empty")] for line in lines if line.endswith("; passed_or_empty")]


def test_ci_runs_readme_test_lines_verbatim():
    readme = (REPO / "README.md").read_text().splitlines()
    ci = ci_test_lines()
    assert ci[0] == "python3 -m npuinfer baseline verify results/baselines/cpu-tiny" and len(ci) == 6
    assert ci[1:3] == ["python3 -m pytest", "python3 -m pytest -m e2e"]  # every test: the quick ones, then the e2e ones
    for line in ci:
        assert line in readme, line
    assert f"--max-regression {CI_TOLERANCE}" in ci[3] and "--baseline results/baselines/cpu-tiny" in ci[4]
    assert "--require-baseline" in ci[3] and "--gate-retries" in ci[3]  # confirm before failing; nothing unmeasured
    served = ci[5]  # a served deployment's case, against a real vLLM, gated the same way
    assert served.startswith("python3 tests/vllm_server.py run -- python3 -m pytest bench/test_serving.py --backend openai")
    assert all(f in served for f in ("--baseline results/baselines/cpu-tiny", "--require-baseline", "--gate-retries"))


@pytest.mark.parametrize("status, survives", [(0, True), (5, True), (1, False), (2, False)])
def test_ci_accepts_pytest_exit_code_5_and_stops_on_failures(status, survives):
    text = (REPO / ".ci" / "run").read_text()
    function = text[text.index("passed_or_empty() {"):text.index("\n}\n") + 3]
    proc = subprocess.run(["bash", "-c", f"set -u\n{function}\n(exit {status}); passed_or_empty\necho went-on"],
                          capture_output=True, text=True, timeout=30)
    assert ("went-on" in proc.stdout) is survives
    assert proc.returncode == (0 if survives else status)
