"""The performance gate: a freshly measured case compared with a baseline, reference results kept in a
directory (committed ones under results/baselines/<name>/). No pytest here.

A baseline directory holds what a results directory holds (``performance_<model>_<device>.csv``,
``calibration_<model>_<device>.csv``, ``ceval_<model>_<device>/subject_acc.json`` ...), copied there by
`npuinfer baseline update` (npuinfer.gates.baseline_store), so a results directory is a baseline too.

Performance gate: first-token time, next-token time and E2E throughput of a case against the baseline
row of the same (model, batch, input, output) measured with the same dtype, backend, timing mode and
tensor-parallel size. Each metric is turned into a *slowdown* (now / baseline for a time, baseline /
now for a throughput, so 1.25 means 25% slower whichever the metric); a case fails when a slowdown
exceeds ``1 + max_regression``. With calibration on both sides (npuinfer.results.calibration) the
compared values are ``time / calibration`` and ``throughput x calibration``: what is left is the
code's speed relative to a fixed workload on the same machine at the same moment.

The gate reads each metric from the row with an estimator that interference cannot fake (`gate_values`):
another process taking the cpu, or the host slowing the whole VM for a while, only ever adds time. So the
first-token time is the best of the rounds (``rounds_detail``), the next-token time the fastest
inter-token gap of any round (``itl_min_ms`` in ``rounds_detail``), and the throughput
batch x output / (first + (output - 1) x next) from those two; the calibration they are divided by is the
reference's fastest step, timed before, between and after the case's runs (``calibration_min(ms)``).
A median gap was used before 2026-12 (estimator "typical", still applied to rows without the fastest
figures): on a VM whose host slowed it for seconds at a time, medians of a whole case doubled while the
fastest readings moved by under 10% (results/baselines/cpu-tiny/SPREAD.md).
The row's own columns (the median round, as published) stay what the tables show; on a machine to
itself both agree, on a shared one only the robust ones repeat.

A case without a comparable baseline row is not gated: its outcome says why, and the pytest plugin
turns that into a visible warning (or, under --require-baseline, a failure). A case beyond the limit is
measured again by the plugin (--gate-retries) and fails only if one metric is beyond the limit in every
attempt (`persistent_regressions`): each attempt's
``GateOutcome.figures()`` is kept in the row (``gate_attempts``). This module never imports pytest.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..results.calibration import CALIBRATION, CALIBRATION_MIN, calibration_path, calibration_table, \
    calibration_value
from ..results.naming import CALIBRATION as CALIBRATION_KIND, kind_of
from ..results.performance import BATCH, BUNCHED, BUNCHED_COLUMN, FIRST, INPUT, NEXT, OUTPUT, SERVING_CASE, THROUGHPUT, \
    performance_path
from ..results.performance import GATE_ATTEMPTS, GATE_RETRIES  # noqa: F401  (the row columns the gate fills, for the plugin)
from ..results.table import CsvTable, parse_float, read_csv
from ..timing import ITL_MIN

DEFAULT_MAX_REGRESSION = 0.10
# A case beyond the limit is measured again up to this many times; it fails only if a metric is beyond the limit
# in every attempt (persistent_regressions).
DEFAULT_GATE_RETRIES = 3
ITL_P50 = "ITL_p50(ms)"
# metric column -> True when higher is better
GATED_METRICS: dict[str, bool] = {FIRST: False, NEXT: False, THROUGHPUT: True}
# Settings a baseline row must share with the case to be compared at all.
MATCH_SETTINGS = ("dtype", "backend", "timing", "tp")
GATE_MODES = ("calibrated", "raw")
# How the gate reads a case (gate_values): "fastest" (the best round's first-token time, the fastest inter-token
# gap, over the fastest reference step) where both rows and both calibrations carry those figures; else "typical"
# (the median inter-token gap, over the median reference step), which rows written before 2026-12 allow.
ESTIMATORS = ("fastest", "typical")
CALIBRATION_COLUMN = {"fastest": CALIBRATION_MIN, "typical": CALIBRATION}


def parse_regression(text: str) -> float:
    """``--max-regression``: a fraction (0.1) or a percentage (10%)."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = math.nan
    if not raw.endswith("%") and value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1 or a percentage such as 10%; got {text!r} "
                                         f"(write {raw}% for {raw} percent)")
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1 or a percentage such as 10%; got {text!r}")
    return value


def _case(row: Mapping[str, object]) -> str:
    return str(row.get("case_id") or f"{row.get('model')}-bs{row.get(BATCH)}-in{row.get(INPUT)}-out{row.get(OUTPUT)}")


def _num(row: Mapping[str, object], column: str) -> float | None:
    value = row.get(column)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return parse_float(value if isinstance(value, str) else None)


def _same(a: object, b: object) -> bool:
    return str(a if a is not None else "") == str(b if b is not None else "")


# --------------------------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class MetricCheck:
    """One gated metric of one case."""

    metric: str
    current: float
    baseline: float
    slowdown: float  # > 1: slower than the baseline (calibrated when ``calibrated`` says how)
    how: str = ""  # how the compared value was read from the rows (see gate_values)
    calibrated: str = ""  # the calibrated pair the slowdown is of, in words; empty when raw values were compared

    def describe(self) -> str:
        """The compared pair and the change, then, when the comparison was calibrated, the raw pair labelled as
        such (the change is of the calibrated pair; the raw one may differ by the machine's speed)."""
        how = f" ({self.how})" if self.how else ""
        raw = f"{self.current:.6g} now vs {self.baseline:.6g} in the baseline"
        if self.calibrated:
            return f"{self.metric}{how}: {self.calibrated}: {_change_words(self.slowdown)}; raw (uncalibrated) {raw}"
        return f"{self.metric}{how}: raw {raw}: {_change_words(self.slowdown)}"


def _change_words(slowdown: float) -> str:
    change = slowdown - 1
    return f"{100 * change:.1f}% slower" if change >= 0 else f"{100 * -change:.1f}% faster"


@dataclass
class GateOutcome:
    """The gate's verdict on one case: ``passed``, ``failed`` or ``skipped`` (no comparable baseline)."""

    case_id: str
    status: str
    checks: list[MetricCheck] = field(default_factory=list)
    max_regression: float = DEFAULT_MAX_REGRESSION
    source: str = ""  # the baseline file compared with
    reason: str = ""  # why skipped
    notes: list[str] = field(default_factory=list)  # worth a warning, the gate still applied
    calibration: tuple[float, float] | None = None  # (now, baseline) ms, when the comparison was calibrated
    estimator: str = "typical"  # ESTIMATORS: how the values were read from the rows
    # When the case was measured more than once (confirm before failing): every attempt's figures(), this one last.
    attempts: list[dict] = field(default_factory=list)
    retries: int = 0  # re-measurements allowed (--gate-retries)

    @property
    def regressions(self) -> list[MetricCheck]:
        return [c for c in self.checks if c.slowdown > 1 + self.max_regression + 1e-12]

    def figures(self) -> dict[str, object]:
        """This comparison in a row's ``gate_attempts`` column: verdict, calibrations, and per metric the
        compared values and the slowdown."""
        return {"verdict": self.status, "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "estimator": self.estimator,
                "calibration_ms": self.calibration[0] if self.calibration else None,
                "baseline_calibration_ms": self.calibration[1] if self.calibration else None,
                "metrics": {c.metric: {"now": c.current, "baseline": c.baseline, "slowdown": round(c.slowdown, 6)}
                            for c in self.checks}}

    def message(self) -> str:
        if self.status == "skipped":
            return f"{self.case_id}: performance gate skipped: {self.reason}"
        verdict = "slower than" if self.status == "failed" else "within"
        lines = [f"{self.case_id}: {verdict} {100 * self.max_regression:g}% of the baseline ({self.source}, "
                 f"--max-regression)"]
        if len(self.attempts) > 1:
            beyond = sum(a["verdict"] == "failed" for a in self.attempts)
            persistent = persistent_regressions(self.attempts, self.max_regression)
            lines[0] += (f"; {len(self.attempts)} attempts, {beyond} beyond the limit; "
                         + (", ".join(f"{m} beyond it in every attempt (best {100 * (v - 1):.1f}% slower)"
                                      for m, v in persistent.items()) if persistent
                            else "no metric beyond it in every attempt")
                         + f" (a case beyond the limit is measured again, up to --gate-retries {self.retries} "
                           "times, and fails only if one metric is beyond it in every attempt)")
        if self.calibration:
            step = "fastest" if self.estimator == "fastest" else "median"
            lines[0] += (f"; calibration {self.calibration[0]:.4g} ms now, {self.calibration[1]:.4g} ms in the "
                         f"baseline ({step} reference decode step)")
        else:
            lines[0] += "; raw times compared"
        if len(self.attempts) > 1:
            lines += [f"  attempt {i}: {describe_attempt(a)}" for i, a in enumerate(self.attempts, 1)]
            lines.append(f"  attempt {len(self.attempts)}, in full:")
        shown = self.regressions if self.status == "failed" else self.checks
        lines += [f"  {c.describe()}" for c in shown]
        return "\n".join(lines)


def persistent_regressions(attempts: Sequence[Mapping[str, object]], max_regression: float) -> dict[str, float]:
    """The metrics beyond the limit in every attempt (GateOutcome.figures), with their smallest slowdown.
    Interference only ever adds time, so a metric's best attempt is its truest reading: a regression in the
    code shows in every attempt, a burst of load on the machine moves from metric to metric and goes."""
    if not attempts:
        return {}
    metrics = [dict(a.get("metrics") or {}) for a in attempts]
    common = [m for m in metrics[0] if all(m in other for other in metrics[1:])]
    best = {m: min(float(other[m]["slowdown"]) for other in metrics) for m in common}
    return {m: v for m, v in best.items() if v > 1 + max_regression + 1e-12}


def describe_attempt(figures: Mapping[str, object]) -> str:
    """One line for one attempt's figures (GateOutcome.figures): verdict, each metric's change, calibration."""
    verdict = "beyond the limit" if figures.get("verdict") == "failed" else "within the limit"
    cal_now, cal_base = figures.get("calibration_ms"), figures.get("baseline_calibration_ms")
    parts = []
    for metric, m in dict(figures.get("metrics") or {}).items():
        raw = f"{m['now']:.6g} vs {m['baseline']:.6g}"
        if cal_now and cal_base and metric in GATED_METRICS:
            a, b = _calibrated_pair(metric, m["now"], m["baseline"], cal_now, cal_base)
            parts.append(f"{metric} calibrated {a:.4g} vs {b:.4g} ({_change_words(m['slowdown'])}; raw {raw})")
        else:
            parts.append(f"{metric} raw {raw} ({_change_words(m['slowdown'])})")
    text = f"{verdict}: " + ", ".join(parts)
    if figures.get("calibration_ms"):
        text += f"; calibration {figures['calibration_ms']:.4g} ms (baseline {figures['baseline_calibration_ms']:.4g})"
    return text


@dataclass(frozen=True)
class GateValue:
    value: float
    how: str


def _rounds(row: Mapping[str, object]) -> list[dict]:
    detail = row.get("rounds_detail")
    if isinstance(detail, str):
        try:
            detail = json.loads(detail) if detail else []
        except json.JSONDecodeError:
            return []
    return [r for r in detail or [] if isinstance(r, dict)]


def _positive(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0]


def has_fastest_gap(row: Mapping[str, object]) -> bool:
    """Whether every round of a row carries its fastest inter-token gap (``itl_min_ms``, rows since 2026-12)."""
    rounds = _rounds(row)
    return bool(rounds) and row.get("timing", "detail") == "detail" and \
        len(_positive(r.get(ITL_MIN) for r in rounds)) == len(rounds)


def gate_values(row: Mapping[str, object], estimator: str = "typical") -> dict[str, GateValue]:
    """The value the gate compares for each metric of a row (see the module docstring): the best round's
    first-token time, the fastest (estimator "fastest") or the median ("typical") inter-token gap, and the
    throughput they give; the row's own columns where the row has no rounds (or no per-token timing)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"gate estimator: expected one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if (_num(row, BUNCHED_COLUMN) or 0) > BUNCHED:  # a served case read in bursts: only its throughput is the server's
        value = _num(row, THROUGHPUT)
        return {THROUGHPUT: GateValue(value, "the row's value (its stream arrived in bursts: TTFT and TPOT not "
                                             "compared)")} if value else {}
    rounds = _rounds(row)
    out: dict[str, GateValue] = {}
    firsts = _positive(r.get("first_token_ms") for r in rounds)
    if firsts:
        out[FIRST] = GateValue(min(firsts), f"best of {len(firsts)} rounds")
    elif _num(row, FIRST):
        out[FIRST] = GateValue(_num(row, FIRST), "the row's value")
    gap = None
    if estimator == "fastest" and has_fastest_gap(row):
        gap = min(_positive(r.get(ITL_MIN) for r in rounds))
        out[NEXT] = GateValue(gap, f"fastest inter-token gap over {len(rounds)} rounds")
    elif row.get("timing", "detail") == "detail" and _num(row, ITL_P50):
        gap = _num(row, ITL_P50)
        out[NEXT] = GateValue(gap, f"median inter-token gap over {len(rounds) or 'all'} rounds, {ITL_P50}")
    elif nexts := _positive(r.get("next_token_ms") for r in rounds):
        out[NEXT] = GateValue(min(nexts), f"best of {len(nexts)} rounds")
    elif _num(row, NEXT):
        out[NEXT] = GateValue(_num(row, NEXT), "the row's value")
    batch, output = _num(row, BATCH), _num(row, OUTPUT)
    if gap and FIRST in out and batch and output:
        first = out[FIRST].value
        seconds = (first + (output - 1) * gap) / 1000
        out[THROUGHPUT] = GateValue(batch * output / seconds, "batch x output / (first + (output - 1) x next), "
                                                              "from the two values above")
    else:
        responses = _positive(r.get("response_s") for r in rounds)
        if responses and batch and output:
            out[THROUGHPUT] = GateValue(batch * output / min(responses), f"best of {len(responses)} rounds")
        elif _num(row, THROUGHPUT):
            out[THROUGHPUT] = GateValue(_num(row, THROUGHPUT), "the row's value")
    return out


def _calibrated_pair(metric: str, now: float, base: float, cal_now: float, cal_base: float) -> tuple[float, float]:
    """(now, baseline) of a metric in calibration units: time / calibration, throughput x calibration."""
    if GATED_METRICS[metric]:
        return now * cal_now, base * cal_base
    return now / cal_now, base / cal_base


def _calibrated(metric: str, now: GateValue, base: GateValue, cal_now: float, cal_base: float) -> tuple[float, str]:
    """(slowdown, words) of a metric in calibration units: time / calibration, throughput x calibration."""
    a, b = _calibrated_pair(metric, now.value, base.value, cal_now, cal_base)
    rule = "throughput x calibration" if GATED_METRICS[metric] else "time / calibration"
    return (b / a if GATED_METRICS[metric] else a / b), f"calibrated ({rule}) {a:.5g} now vs {b:.5g} in the baseline"


def default_estimator(row: Mapping[str, object], baseline_row: Mapping[str, object]) -> str:
    """"fastest" when both rows carry the fastest gaps (`has_fastest_gap`), else "typical"."""
    return "fastest" if has_fastest_gap(row) and has_fastest_gap(baseline_row) else "typical"


def compare_row(row: Mapping[str, object], baseline_row: Mapping[str, object], *,
                max_regression: float = DEFAULT_MAX_REGRESSION, calibration: float | None = None,
                baseline_calibration: float | None = None, source: str = "",
                estimator: str | None = None) -> GateOutcome:
    """Gate one measured row against one baseline row. The calibrations (ms, npuinfer.results.calibration)
    are used when both are given, and must be the ones ``estimator`` reads (CALIBRATION_COLUMN). Without an
    estimator: `default_estimator`."""
    if estimator is None:
        estimator = default_estimator(row, baseline_row)
    calibrated = calibration is not None and baseline_calibration is not None
    outcome = GateOutcome(_case(row), "passed", max_regression=max_regression, source=source, estimator=estimator)
    now_values, base_values = gate_values(row, estimator), gate_values(baseline_row, estimator)
    same_rounds = _same(row.get("rounds"), baseline_row.get("rounds"))
    if not same_rounds:
        outcome.notes.append(f"{row.get('rounds')} rounds now, {baseline_row.get('rounds')} in the baseline: "
                             "best-of-rounds values are drawn from different numbers of runs")
    for metric, higher_better in GATED_METRICS.items():
        now, base = now_values.get(metric), base_values.get(metric)
        if now is None or base is None:
            if base is not None or now is not None:
                outcome.notes.append(f"{metric}: no value to compare (now {row.get(metric)!r}, "
                                     f"baseline {baseline_row.get(metric)!r})")
            continue
        if now.how != base.how and same_rounds:
            outcome.notes.append(f"{metric}: read as {now.how} now, as {base.how} in the baseline")
        if calibrated:
            slowdown, words = _calibrated(metric, now, base, calibration, baseline_calibration)
        else:
            slowdown, words = (base.value / now.value if higher_better else now.value / base.value), ""
        outcome.checks.append(MetricCheck(metric, now.value, base.value, slowdown, now.how, words))
    if calibrated:
        outcome.calibration = (calibration, baseline_calibration)
    if not outcome.checks:
        return GateOutcome(outcome.case_id, "skipped", max_regression=max_regression, source=source,
                           reason=f"no gated metric has a value in both rows ({'; '.join(outcome.notes)})")
    if outcome.regressions:
        outcome.status = "failed"
    return outcome


# --------------------------------------------------------------------------------------------- numbers a baseline may hold

# Every figure the gate may read from a baseline's rows: a NaN compares false against the limit, an Infinity
# gives a slowdown of 0 and a negative one a negative slowdown, so any of them would pass every case.
GATE_READS_PERFORMANCE = (FIRST, NEXT, THROUGHPUT, ITL_P50, BATCH, OUTPUT)
GATE_READS_ROUNDS = ("first_token_ms", ITL_MIN, "next_token_ms", "response_s")
GATE_READS_CALIBRATION = (CALIBRATION, CALIBRATION_MIN)


class BaselineError(ValueError):
    """A baseline file holds a figure the gate cannot compare with (not a finite number above zero)."""


def _bad_figure(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (int, float)):
        return not (math.isfinite(value) and value > 0)
    try:
        number = float(str(value))
    except ValueError:
        return True
    return not (math.isfinite(number) and number > 0)


def figure_problems(path: Path, rows: Sequence[Mapping[str, str]], calibration: bool = False) -> list[str]:
    """Each figure the gate reads from a baseline file's rows that is not a finite number above zero, as
    "FILE: line N (case): column COL is VALUE". Empty cells are not figures (a row that did not measure)."""
    columns = GATE_READS_CALIBRATION if calibration else GATE_READS_PERFORMANCE
    problems = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path}: line {line} ({_case(row)})"
        bad = [f"column {c} is {row[c]!r}" for c in columns if row.get(c) not in (None, "") and _bad_figure(row[c])]
        if not calibration:
            for i, rnd in enumerate(_rounds(row), start=1):
                bad += [f"column rounds_detail round {i} {k} is {rnd[k]!r}" for k in GATE_READS_ROUNDS
                        if rnd.get(k) is not None and _bad_figure(rnd[k])]
        problems += [f"{where}: {b}" for b in bad]
    if problems:
        problems.append(f"{path}: every figure the gate reads must be a finite number above zero; remeasure the "
                        "case(s) or remove the row(s)")
    return problems


def check_figures(path: Path, rows: Sequence[Mapping[str, str]], calibration: bool = False) -> None:
    """`figure_problems` as one BaselineError."""
    problems = figure_problems(path, rows, calibration)
    if problems:
        raise BaselineError("\n".join(problems))


# --------------------------------------------------------------------------------------------- a baseline directory


class PerformanceBaseline:
    """The performance rows and calibrations of a baseline (or results) directory, read once per file."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"--baseline {directory}: not a directory")
        self._cache: dict[Path, list[dict[str, str]]] = {}

    def _read(self, path: Path) -> list[dict[str, str]]:
        """A baseline file's rows, refused whole (BaselineError) when a figure the gate reads is not finite and
        above zero."""
        if path not in self._cache:
            rows = read_csv(path)[1]
            check_figures(path, rows, calibration=kind_of(path) == CALIBRATION_KIND)
            self._cache[path] = rows
        return self._cache[path]

    def performance_file(self, model: str, device_label: str) -> tuple[Path | None, str]:
        """The baseline's CSV for a model: the same device's, else the only one there is (with a note)."""
        exact = performance_path(self.directory, model, device_label)
        if exact.is_file():
            return exact, ""
        others = sorted(self.directory.glob(f"performance_{model}_*.csv"))
        if len(others) == 1:
            return others[0], f"no {exact.name} in {self.directory}: compared with {others[0].name}"
        if others:
            return None, (f"no {exact.name} in {self.directory}, and several other devices' files "
                          f"({', '.join(p.name for p in others)}): keep the one to compare with in a directory "
                          "of its own and pass that as --baseline")
        return None, f"no {exact.name} in {self.directory}"

    def find(self, row: Mapping[str, object], device_label: str) -> tuple[dict[str, str] | None, Path | None, str]:
        """(baseline row, its file, note or reason). The row is None when nothing comparable exists; then
        the text says why."""
        model = str(row.get("model"))
        path, note = self.performance_file(model, device_label)
        if path is None:
            return None, None, note
        same_case = [r for r in self._read(path)
                     if all(_same(r.get(c), row.get(c)) for c in (BATCH, INPUT, OUTPUT, *SERVING_CASE))]
        if not same_case:
            served = "".join(f", {c} {row.get(c)}" for c in SERVING_CASE if row.get(c) not in (None, ""))
            return None, path, (f"no row for batch {row.get(BATCH)}, input {row.get(INPUT)}, output {row.get(OUTPUT)}"
                                f"{served} in {path}")
        ok = [r for r in same_case if r.get("status", "ok") == "ok"]
        if not ok:
            return None, path, (f"the baseline row in {path} has status {same_case[-1].get('status')!r} "
                                f"({same_case[-1].get('reason') or 'no reason given'}): nothing to compare with")
        comparable = [r for r in ok if all(_same(r.get(c), row.get(c)) for c in MATCH_SETTINGS)]
        if not comparable:
            theirs = ", ".join(f"{c}={ok[-1].get(c)}" for c in MATCH_SETTINGS)
            ours = ", ".join(f"{c}={row.get(c)}" for c in MATCH_SETTINGS)
            return None, path, f"the baseline rows for this case in {path} were measured with {theirs}; this run: {ours}"
        # A baseline may hold rows of several machines of one device type (cpu models): the calibration cancels
        # a machine's speed, not a different microarchitecture's balance between it and a model's forward.
        same_machine = [r for r in comparable if _same(r.get("device_name"), row.get("device_name"))]
        if not same_machine and row.get("device_name"):
            note = "; ".join(filter(None, [note, f"no baseline row measured on {row.get('device_name')}: compared "
                                                 f"with one from {comparable[-1].get('device_name')}"]))
        latest = max(same_machine or comparable, key=lambda r: r.get("measured_at", ""))
        return latest, path, note

    def calibration(self, baseline_row: Mapping[str, str], device_label: str) -> dict[str, str] | None:
        """The calibration row measured with a baseline row: same key, the nearest in time (rows of several
        machines share keys; each case's calibration is timed right around it)."""
        model = str(baseline_row.get("model"))
        path = calibration_path(self.directory, model, str(baseline_row.get("device") or device_label))
        if not path.is_file():
            return None
        return paired_calibration(calibration_table(path), self._read(path), baseline_row)


PAIRING_WINDOW_S = 3600  # a case's calibration is timed right around it (same second in practice)


def paired_calibration(table: CsvTable, calibrations: Sequence[Mapping[str, str]], row: Mapping[str, object]
                       ) -> Mapping[str, str] | None:
    """The calibration row measured with a performance row: same key, the nearest in time and within an hour
    (rows of several machines share keys and calibration rows do not name their machine)."""
    wanted = table.key_of(row)
    at = _timestamp(row.get("measured_at"))
    near = [(abs(_timestamp(c.get("measured_at")) - at), i) for i, c in enumerate(calibrations)
            if table.key_of(c) == wanted]
    near = [(gap, i) for gap, i in near if gap <= PAIRING_WINDOW_S]
    return calibrations[min(near)[1]] if near else None


def _timestamp(text: object) -> float:
    try:
        return _dt.datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return 0.0


def gate_case(baseline: PerformanceBaseline, row: Mapping[str, object], device_label: str, *,
              calibration: Mapping[str, object] | None = None, max_regression: float = DEFAULT_MAX_REGRESSION,
              mode: str = "calibrated") -> GateOutcome:
    """Look up the case's baseline row and compare. ``calibration`` is the case's calibration row
    (npuinfer.results.calibration.calibration_row); in ``calibrated`` mode without a usable calibration
    on both sides the raw values are compared and a note says so."""
    if mode not in GATE_MODES:
        raise ValueError(f"gate mode: expected one of {', '.join(GATE_MODES)}, got {mode!r}")
    base, path, text = baseline.find(row, device_label)
    if base is None:
        return GateOutcome(_case(row), "skipped", max_regression=max_regression, reason=text,
                           source=str(path or baseline.directory))
    notes = [text] if text else []
    now_cal = base_cal = None
    estimator = default_estimator(row, base)
    if mode == "calibrated":
        base_cal_row = baseline.calibration(base, device_label)
        if estimator == "fastest" and not (calibration_value(calibration, CALIBRATION_MIN)
                                           and calibration_value(base_cal_row, CALIBRATION_MIN)):
            estimator = "typical"  # a calibration written before the fastest step was kept
        now_cal, base_cal, why = _usable_calibrations(calibration, base_cal_row, CALIBRATION_COLUMN[estimator])
        if why:
            notes.append(f"raw values compared: {why}")
    outcome = compare_row(row, base, max_regression=max_regression, calibration=now_cal,
                          baseline_calibration=base_cal, source=str(path), estimator=estimator)
    outcome.notes = notes + outcome.notes
    return outcome


def _usable_calibrations(now: Mapping[str, object] | None, base: Mapping[str, str] | None,
                         column: str = CALIBRATION) -> tuple[float | None, float | None, str]:
    if calibration_value(now, column) is None:
        return None, None, "this run has no calibration for the case"
    if calibration_value(base, column) is None:
        return None, None, "the baseline has no calibration for the case (calibration_<model>_<device>.csv)"
    for setting in ("workload", "calibration_dtype", "cpu_threads"):
        if not _same(now.get(setting), base.get(setting)):
            return None, None, (f"calibration {setting} differs: {now.get(setting)} now, "
                                f"{base.get(setting)} in the baseline")
    return calibration_value(now, column), calibration_value(base, column), ""
