"""Calibration figures on disk: per benchmark case, ``calibration_<model>_<device>.csv`` beside the
performance CSV, keyed like the performance rows (npuinfer.results.performance.PERFORMANCE_KEY): the
median decode step of the reference workload (npuinfer.calibration_workload, which says why it exists)
timed right before and right after the case, and its fastest step (those timed between the case's runs
included). This module never imports pytest.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..calibration_workload import WORKLOAD
from .naming import CALIBRATION as CALIBRATION_KIND, result_path
from .performance import PERFORMANCE_KEY, now_iso
from .table import CsvTable, parse_float

CALIBRATION = "calibration(ms)"
CALIBRATION_FIGURES = (CALIBRATION, "calibration_before(ms)", "calibration_after(ms)")
# The fastest step of all, interleaved ones included: what the gate divides the fastest readings of a case by.
CALIBRATION_MIN = "calibration_min(ms)"
CALIBRATION_COLUMNS = (PERFORMANCE_KEY + ["case_id", *CALIBRATION_FIGURES, "workload", "calibration_dtype",
                                          "cpu_threads", "measured_at", CALIBRATION_MIN, "calibration_steps"])


def calibration_path(results_dir: str | Path, model: str, device_label: str) -> Path:
    return result_path(CALIBRATION_KIND, results_dir, model, device_label)


def calibration_table(path: str | Path) -> CsvTable:
    return CsvTable(path, CALIBRATION_COLUMNS, PERFORMANCE_KEY)


def calibration_row(key: Mapping[str, object], case_id: str, before: Sequence[float], after: Sequence[float],
                    dtype_name: str, between: Sequence[float] = ()) -> dict[str, object]:
    """One calibration row, keyed like the case's performance row: the median step of both sides
    together, each side's own median, and the fastest step of all (``between``: the steps timed
    between the case's runs)."""
    every = [*before, *between, *after]
    return {**{k: key[k] for k in PERFORMANCE_KEY}, "case_id": case_id,
            CALIBRATION: statistics.median([*before, *after]), "calibration_before(ms)": statistics.median(before),
            "calibration_after(ms)": statistics.median(after), "workload": WORKLOAD, "calibration_dtype": dtype_name,
            "cpu_threads": torch.get_num_threads(), "measured_at": now_iso(), CALIBRATION_MIN: min(every),
            "calibration_steps": len(every)}


def calibration_value(row: Mapping[str, object] | None, column: str = CALIBRATION) -> float | None:
    """A calibration row's value in ms (``column``: the median step, or CALIBRATION_MIN), or None (no row,
    or a missing or non-positive value)."""
    value = row.get(column) if row else None
    value = parse_float(value) if isinstance(value, str) else value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        return None
    return float(value)
