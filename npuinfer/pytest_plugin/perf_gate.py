"""``--baseline`` for performance rows, in-process (bench.py) or served (serving.py): the baseline read once, a row
judged against its baseline row, and the re-measure rule (a case beyond ``--max-regression`` is measured again up
to ``--gate-retries`` times and fails only where one metric is beyond the limit in every attempt)."""
from __future__ import annotations

from pathlib import Path

import pytest

from ..gates.performance import (
    GATE_ATTEMPTS,
    GATE_RETRIES,
    BaselineError,
    GateOutcome,
    PerformanceBaseline,
    gate_case,
    persistent_regressions,
)


class PerformanceGate:
    def __init__(self, baseline_dir: str | None, max_regression: float, retries: int):
        self.baseline_dir = baseline_dir
        self.max_regression = max_regression
        self.retries = retries
        self._baseline: PerformanceBaseline | None = None

    def judge(self, row: dict, device_label: str, *, mode: str, calibration: dict | None = None
              ) -> GateOutcome | None:
        """One measurement's verdict; None without --baseline. ``mode``: calibrated or raw (a served row)."""
        if not self.baseline_dir:
            return None
        if self._baseline is None:
            if not Path(self.baseline_dir).is_dir():
                pytest.fail(f"--baseline {self.baseline_dir}: the performance gate needs a directory holding "
                            "performance_<model>_<device>.csv files", pytrace=False)
            self._baseline = PerformanceBaseline(self.baseline_dir)
        try:
            return gate_case(self._baseline, row, device_label, calibration=calibration,
                             max_regression=self.max_regression, mode=mode)
        except BaselineError as exc:  # the row was measured and written; only its comparison is refused
            pytest.fail(f"{row.get('case_id')}: --baseline refused:\n{exc}", pytrace=False)

    def settle(self, outcome: GateOutcome | None, attempts: list[dict], row: dict) -> bool:
        """Add this attempt's figures to ``attempts``, the outcome and the row (confirmed failed only when one metric
        is beyond the limit in every attempt so far); True where the case is to be measured again."""
        if outcome is None or outcome.status == "skipped":
            return False
        attempts.append(outcome.figures())
        outcome.status = "failed" if persistent_regressions(attempts, self.max_regression) else "passed"
        outcome.attempts = list(attempts)
        outcome.retries = self.retries
        row.update({GATE_RETRIES: self.retries, GATE_ATTEMPTS: list(attempts)})
        return outcome.status == "failed" and len(attempts) <= self.retries
