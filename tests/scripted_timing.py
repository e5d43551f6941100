"""A pytest plugin for tests of the bench gate: every measurement gives known figures.

Loaded into a `pytest bench/` subprocess with ``-p scripted_timing`` (tests/ on PYTHONPATH). It replaces
the two measurements the bench session makes, through the interfaces the session calls:
``npuinfer.timing.measure_case`` (as npuinfer.pytest_plugin.bench imported it) and
``Calibrator.measure``. Everything else runs for real: the model loads, rows and calibrations are written,
the baseline is looked up, the gate compares, retries, reports.

``$NPUINFER_SCRIPTED_TIMING`` names a JSON file: case id -> a list of attempts, each
``{"first_ms": 10.0, "next_ms": 2.0, "calibration_ms": 1.0}`` (calibration optional, default 1.0). The n-th
measurement of a case takes the n-th attempt (the last one again when there are fewer). Every round of an
attempt is the same run: the first forward ``first_ms``, each later one ``next_ms``, no time between them.
A case the file does not name fails, so a test cannot silently measure for real.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from npuinfer.pytest_plugin import bench as bench_plugin
from npuinfer import calibration_workload as calibration
from npuinfer.timing import CaseTiming, DetailRun

NS_PER_MS = 1_000_000
SCRIPT: dict[str, list[dict[str, float]]] = json.loads(Path(os.environ["NPUINFER_SCRIPTED_TIMING"]).read_text())
_measured: Counter = Counter()  # case id -> measurements made
_calibrated: Counter = Counter()  # case id -> calibrations made (one before and one after each measurement)
_current: list[str] = []  # the case running now


def attempt(case_id: str, index: int) -> dict[str, float]:
    if case_id not in SCRIPT:
        pytest.fail(f"scripted_timing: no figures for {case_id} in {os.environ['NPUINFER_SCRIPTED_TIMING']}")
    attempts = SCRIPT[case_id]
    return attempts[min(index, len(attempts) - 1)]


def scripted_run(batch: int, input_len: int, output_len: int, first_ms: float, next_ms: float) -> DetailRun:
    forward = (round(first_ms * NS_PER_MS),) + (round(next_ms * NS_PER_MS),) * (output_len - 1)
    ends = tuple(sum(forward[: i + 1]) for i in range(output_len))
    return DetailRun(batch=batch, input_len=input_len, output_len=output_len, response_ns=ends[-1],
                     forward_ns=forward, pre_ns=(0,) * output_len, post_ns=(0,) * output_len, token_ns=ends)


def scripted_measure_case(backend, case, *, rounds=3, warmup=1, mode="detail", seed=0, repeat=None):
    figures = attempt(case.id, _measured[case.id])
    _measured[case.id] += 1
    run = scripted_run(case.batch, case.input_len, case.output_len, figures["first_ms"], figures["next_ms"])
    return CaseTiming(mode, (run,) * rounds, (run,) * warmup)


def scripted_calibration(self, batch: int, input_len: int, steps: int | None = None) -> list[float]:
    case_id = _current[-1]
    figures = attempt(case_id, _calibrated[case_id] // 2)  # before and after each measurement
    _calibrated[case_id] += 1
    return [figures.get("calibration_ms", 1.0)] * (self.steps if steps is None else steps)


def pytest_runtest_setup(item: pytest.Item) -> None:
    case = getattr(item, "callspec", None) and item.callspec.params.get("perf_case")
    if case is not None:
        _current.append(case.id)


bench_plugin.measure_case = scripted_measure_case
calibration.Calibrator.measure = scripted_calibration
