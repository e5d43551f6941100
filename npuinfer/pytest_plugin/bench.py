"""The bench/ suite's parametrization, recorder and session reports (its options: bench_options.py).

Cases are model x batch x (input, output), with ids like ``qwen-tiny-bs8-in256-out256`` so that
``-k "qwen and bs8"`` selects them (pytest's -k matches substrings: ``bs1`` also matches ``bs16``).
Each case is timed through pytest-benchmark's ``pedantic`` (so --benchmark-json / -autosave /
-compare see the same runs, token metrics in ``extra_info``) and writes its row the moment it is
measured. When the session ends, every results CSV written in it gets its markdown table (and
for performance a PNG) beside it, and the terminal summary names them.

The measurement itself is npuinfer.timing (no pytest there); this module wires options and fixtures.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from ..device import Device, dtype_name
from ..dummy import DoesNotFit, check_case_fits
from ..backends import BackendUnsupported
from ..latency import LatencyBatchSearch
from ..memory import MaxBatchSearch, format_size
from ..parallel import dist as tp_dist
from ..results.performance import (
    INPUT,
    LATENCY_MAX_BATCH,
    MAX_BATCH,
    MAX_BATCH_SETTINGS,
    MIB,
    OUTPUT,
    max_batch_path,
    max_batch_table,
    noise_columns,
    performance_path,
    performance_row,
    performance_table,
    case_columns,
    raw_rounds_path,
    now_iso,
    rounds_record,
    write_reports,
)
from ..atomic import write_atomic
from ..generate import NonFiniteLogits
from ..gates.performance import GATE_ATTEMPTS, GateOutcome
from ..calibration_workload import INTERLEAVED_STEPS, Calibrator
from ..results.calibration import CALIBRATION, CALIBRATION_FIGURES, CALIBRATION_MIN, calibration_path, \
    calibration_row, \
    calibration_table
from ..results.table import append_jsonl
from ..roofline import PeaksFileError, roofline_figures, session_peaks
from ..timing import BenchCase, measure_case, plain_repeat
from .bench_options import bench_options
from .common import DEFAULT_TINY_MODELS, SERVED_BACKENDS, run_config, selected_models, \
    xdist_worker_id
from .noise import make_guard, record_verdict
from .perf_gate import PerformanceGate

STATS_ENV = "NPUINFER_BENCH_STATS"  # a path: the session's time accounting is written there as JSON

_SESSION = pytest.StashKey["BenchSession"]()
_STARTED = pytest.StashKey[float]()
_REPORTS = pytest.StashKey[list]()
_UNWRITTEN = pytest.StashKey[list]()  # reports that could not be written, each naming its file
_NOTHING_COMPARED = pytest.StashKey[str]()  # why a gated run fails although no case did
_RAN_BENCH: set[str] = set()  # node ids of bench cases reported in this process's session
_GATE_KEY = "npuinfer_perf_gate"  # user property: (status, message, worst slowdown, where, attempts) of a case's gate
_GATED: dict[str, tuple] = {}  # node id -> (status, message, worst slowdown, where, attempts), as reported (xdist too)
_OUTCOMES = pytest.StashKey[dict]()  # case id -> the gate's verdict (GateOutcome), in the process that measured it


def _kernels_cell(backend) -> str:
    """A row's ``kernels`` cell: the kernel set and its self-check ("" for backends other than npuinfer's)."""
    loaded = getattr(backend, "loaded", None)
    if loaded is None:
        return ""
    kernels = loaded.kernels
    return kernels.label if kernels.label == "plain" else f"{kernels.label} (check {kernels.check_summary()})"


class RooflineWarning(UserWarning):
    """A row beat the session's bandwidth probe (MBU > 1): the probe, not the row, needs fixing."""


class PerformanceBaselineWarning(UserWarning):
    """A bench case was not gated against --baseline (no comparable row), or was gated with a caveat."""


MARKER = "npuinfer_bench"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: a bench/ case (its session writes the results reports)")
    config.stash[_OUTCOMES] = {}


# --------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class MaxBatchCase:
    model: str
    input_len: int
    output_len: int

    @property
    def id(self) -> str:
        return f"{self.model}-in{self.input_len}-out{self.output_len}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    if "perf_case" not in names and "max_batch_case" not in names:
        return
    opts = bench_options(metafunc.config)
    models = selected_models(metafunc.config, DEFAULT_TINY_MODELS)
    if "perf_case" in names:
        cases = [BenchCase(m, b, i, o) for m in models for i, o in opts.pairs for b in opts.batches]
        metafunc.parametrize("perf_case", cases, ids=[c.id for c in cases])
    if "max_batch_case" in names:
        mcases = [MaxBatchCase(m, i, o) for m in models for i, o in opts.pairs]
        metafunc.parametrize("max_batch_case", mcases, ids=[c.id for c in mcases])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if {"perf_case", "max_batch_case", "serving_case", "serving_search_case"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(MARKER)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Notes that this session ran bench cases (under xdist the reports arrive from the workers)."""
    if MARKER in report.keywords:
        _RAN_BENCH.add(report.nodeid)
        gate = dict(report.user_properties).get(_GATE_KEY)
        if gate is not None:
            _GATED[report.nodeid] = tuple(gate)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Attaches the case's gate verdict to its report, so the controller's summary sees it under xdist. In a
    gated run (--baseline) a performance case that was skipped was compared with nothing: it is NOT GATED,
    and under --require-baseline it fails."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    case = params.get("perf_case") or params.get("serving_case")
    if call.when == "call" and case is not None:
        outcome = item.config.stash[_OUTCOMES].get(case.id)
        if outcome is not None:
            worst = max(outcome.checks, key=lambda c: c.slowdown, default=None)
            item.user_properties.append((_GATE_KEY, (outcome.status, outcome.message(),
                                                     worst.slowdown if worst else None,
                                                     f"{outcome.case_id} {worst.metric}" if worst else "",
                                                     len(outcome.attempts))))
    report = yield
    opts = bench_options(item.config)
    if case is not None and report.skipped and opts.baseline:
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        message = f"{case.id}: not measured, so not compared with the baseline ({why})"
        report.user_properties.append((_GATE_KEY, ("skipped", message, None, "", 0)))
        if opts.require_baseline:
            report.outcome = "failed"
            report.longrepr = f"{message}\nNOT GATED, and --require-baseline asks every case to be compared with " \
                              "a baseline row"
    return report


# --------------------------------------------------------------------------------------------- the session


class BenchSession:
    """Per pytest session: loaded backends, the results files, the time accounting."""

    def __init__(self, config: pytest.Config, backend_cache, results_dir: Path):
        self.config = config
        self.options = bench_options(config)
        self.backend_cache = backend_cache  # common.BackendCache: --backend's backend per model
        self.device: Device = backend_cache.device
        self.results_dir = Path(results_dir)
        self._backends: dict[str, object] = {}
        self._failed: dict[str, BaseException] = {}
        self._settings: dict[str, dict[str, object]] = {}
        self._calibrators: dict[object, Calibrator] = {}
        self.stats = {"generate_s": 0.0, "load_s": 0.0, "calibration_s": 0.0, "cases": 0}
        self.baseline_dir: str | None = self.options.baseline
        # The reference workload costs ~25 ms a case: paid when a gate needs it or a baseline is being made.
        self.calibrating: bool = self.options.calibrate or bool(self.baseline_dir)
        self.gate = PerformanceGate(self.baseline_dir, self.options.max_regression, self.options.gate_retries)
        self.gate_timing: str = self.options.gate_timing
        self.require_baseline: bool = self.options.require_baseline
        self.noise_guard = make_guard(config, self.device)  # was the machine quiet while each case ran
        self.stats["noise_s"] = 0.0

    # -- models
    def backend(self, model: str):
        """The model's backend, loaded once per session; a model that cannot load fails each of its cases
        with the same message (or skips them, when the backend cannot run that family)."""
        if model not in self._backends and model not in self._failed:
            start = time.perf_counter()
            try:
                self._backends[model] = self._load(model)
            except (LookupError, ValueError, OSError, RuntimeError) as exc:
                self._failed[model] = exc
            finally:
                self.stats["load_s"] += time.perf_counter() - start
        if model in self._failed:
            exc = self._failed[model]
            # A sweep over every model skips the one this backend cannot run; naming it with --model is an error.
            if isinstance(exc, BackendUnsupported) and model not in (self.config.getoption("npuinfer_models") or ()):
                pytest.skip(str(exc))
            pytest.fail(f"{model}: {exc}", pytrace=False)
        return self._backends[model]

    def _load(self, model: str):
        return self.backend_cache.get(model)

    # -- tensor parallelism: every rank measures; rank 0 writes rows holding the max over ranks
    @staticmethod
    def _tp_size() -> int:
        world = tp_dist.tp_world()
        return world[0] if world else 1

    @staticmethod
    def _writes_rows() -> bool:
        return tp_dist.is_rank0()

    @staticmethod
    def _over_ranks(summary: dict) -> dict:
        # Every rank has the same keys and the same None entries (same case, same mode).
        return {k: (None if v is None else tp_dist.max_over_ranks(v)) for k, v in summary.items()}

    # -- rows
    def settings(self, model: str, backend) -> dict[str, object]:
        """The settings columns of a model's rows (computed once per model: device.name() can be slow)."""
        if model not in self._settings:
            self._settings[model] = self._make_settings(model, backend)
        return dict(self._settings[model])

    def _make_settings(self, model: str, backend) -> dict[str, object]:
        return {"model": model, "device": self.device.label, "device_name": self.device.name(),
                "dtype": dtype_name(backend.dtype), "backend": self.options.backend_label, "timing": self.options.timing,
                "rounds": self.options.rounds, "warmup": self.options.warmup, "tp": self._tp_size(),
                "checkpoint": backend.checkpoint, "torch": torch.__version__, "kernels": _kernels_cell(backend),
                # W8 checkpoints: the scheme and the matmul kernel its layers ran (npuinfer.quant); "none" for float
                **_quant_columns(backend), "weights": getattr(backend, "weights", "checkpoint")}

    @staticmethod
    def _check_length(backend, model: str, input_len: int, output_len: int) -> None:
        total = input_len + output_len
        if total > backend.max_seq_len:
            pytest.skip(f"{model}: input {input_len} + output {output_len} = {total} tokens exceeds the "
                        f"{backend.max_seq_len} the model allows (its maximum length, or --max-seq-len / MAX_SEQ_LEN)")

    def performance(self, case: BenchCase, benchmark) -> None:
        """Measure a case, write its row, and gate it against --baseline. A case beyond --max-regression is
        measured again (fresh warm-up, rounds and calibration) up to --gate-retries times and fails only when
        one metric is beyond the limit in every attempt; each attempt's figures go into the row
        (``gate_attempts``)."""
        opts = self.options
        backend = self.backend(case.model)
        self._check_length(backend, case.model, case.input_len, case.output_len)
        settings = self.settings(case.model, backend)
        csv_path = performance_path(self.results_dir, case.model, self.device.label)
        table = performance_table(csv_path)
        key = {**settings, **case_columns(case.batch, case.input_len, case.output_len)}
        self._check_case_memory(case, backend, settings, table, csv_path)
        if opts.skip_measured:
            old = table.find(key)
            if old is not None and old.get("status") == "ok":
                pytest.skip(f"already measured in {csv_path} at {old.get('measured_at')} (--skip-measured)")
        attempts: list[dict] = []
        while True:
            # pytest-benchmark's pedantic runs once per test: a re-measurement times its rounds directly
            row, cal_row, timing = self._measure(case, benchmark if not attempts else None, backend, settings, key,
                                                 table, csv_path)
            outcome = self.gate.judge(row, self.device.label, calibration=cal_row, mode=self.gate_timing)
            again = self.gate.settle(outcome, attempts, row)
            self._write(case, key, row, cal_row, timing, table, csv_path, attempt=len(attempts) or None)
            if not again:
                break
        benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("rounds_detail", GATE_ATTEMPTS)})
        if cal_row is not None:
            benchmark.extra_info["calibration_ms"] = cal_row[CALIBRATION]
        record_verdict(self.config, case.id, self._last_noise)  # --require-quiet: a busy machine's case fails here
        self._verdict(case, outcome)

    def _check_case_memory(self, case: BenchCase, backend, settings: dict, table, csv_path: Path) -> None:
        """--dummy-weights: a case whose predicted memory (npuinfer.memory) exceeds --memory-limit, or whose KV cache
        and activations exceed the device's free memory, is skipped before it allocates anything, with a
        ``does_not_fit`` row saying why (the model's own fit was checked when it was built)."""
        if not run_config(self.config, case.model).dummy_weights:
            return
        loaded = getattr(backend, "loaded", None)
        args = loaded.args if loaded is not None else backend.args
        held = 0  # the KV cache npuinfer's static cache holds from the previous case: replaced or reused by this one
        if loaded is not None and loaded.model.cache_shape[0]:
            held = args.kv_cache_bytes(*loaded.model.cache_shape, backend.dtype.itemsize)
        try:
            check_case_fits(args, backend.dtype, self.device, self.options.memory_limit, case.batch, case.input_len,
                            case.output_len, held, case.model)
        except DoesNotFit as exc:
            if self._writes_rows():
                table.upsert(performance_row(case.batch, case.input_len, case.output_len, settings,
                                             status="does_not_fit", reason=str(exc), case_id=case.id))
            pytest.skip(f"{case.id}: {exc} (row written to {csv_path})")

    def _measure(self, case: BenchCase, benchmark, backend, settings: dict, key: dict, table, csv_path: Path):
        """One measurement of a case with its calibration: (row, calibration row or None, timing)."""
        opts = self.options
        try:
            session_peaks(self.device, backend.dtype)  # probed once, before the first case is timed
        except PeaksFileError as exc:
            pytest.fail(str(exc), pytrace=False)
        calibrate_before = self._calibrate(backend, case) if self.calibrating else None
        # A few reference steps before every run as well: a slow spell of the machine in the middle of the case
        # then shows in the calibration's fastest step as it shows in the case's (the gate's readings).
        between: list[float] = []
        interleave = (lambda: between.extend(self._calibrate(backend, case, INTERLEAVED_STEPS))) \
            if self.calibrating else None
        self.device.reset_peak_memory()
        guard_start = self.noise_guard.start()
        oom = None
        try:
            timing = measure_case(backend, case, rounds=opts.rounds, warmup=opts.warmup, mode=opts.timing,
                                  seed=opts.seed, repeat=_repeat_with(benchmark, interleave))
        except NonFiniteLogits as exc:
            if self._writes_rows():
                table.upsert(performance_row(case.batch, case.input_len, case.output_len, settings,
                                             status="nonfinite", reason=str(exc), case_id=case.id))
            if benchmark is not None:
                benchmark.extra_info.update({"status": "nonfinite", "reason": str(exc)})
            pytest.fail(f"{case.id}: {exc} (nonfinite row written to {csv_path})", pytrace=False)
        except Exception as exc:
            if not self.device.is_out_of_memory(exc):
                raise
            oom = f"out of memory: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}"
        if oom is not None:  # handled here, not in the handler, where the traceback keeps the failed frames' tensors
            reason = oom
            self.device.empty_cache()
            if self._writes_rows():
                table.upsert(performance_row(case.batch, case.input_len, case.output_len, settings, status="OOM",
                                             reason=reason, case_id=case.id))
            if benchmark is not None:
                benchmark.extra_info.update({"status": "OOM", "reason": reason})
            pytest.skip(f"{case.id}: {reason} (OOM row written to {csv_path})")
        noise = self.noise_guard.stop(guard_start)
        self.stats["noise_s"] += noise.cost_s
        self.stats["generate_s"] += timing.generate_s
        self.stats["cases"] += 1
        peak = self.device.peak_memory_bytes()
        calibrate_after = self._calibrate(backend, case) if self.calibrating else None
        summary = self._over_ranks(timing.summary())
        row = performance_row(case.batch, case.input_len, case.output_len, settings, summary=summary,
                              rounds_detail=timing.rounds_brief(), peak_bytes=peak, case_id=case.id)
        row.update(noise_columns(noise.quiet, noise.reason, noise.facts))
        row.update(self._roofline(backend, case, summary, settings))
        cal_row = None
        if self.calibrating:
            cal_row = calibration_row(key, case.id, calibrate_before, calibrate_after, dtype_name(backend.dtype),
                                      between)
            cal_row.update(self._over_ranks({k: cal_row[k] for k in (*CALIBRATION_FIGURES, CALIBRATION_MIN)}))
        self._last_noise = noise
        return row, cal_row, timing

    def _write(self, case: BenchCase, key: dict, row: dict, cal_row: dict | None, timing, table, csv_path: Path, *,
               attempt: int | None) -> None:
        """The row (replacing an earlier attempt's), every round of this attempt, and the calibration."""
        if not self._writes_rows():
            return
        table.upsert(row)
        record = rounds_record(case.id, key, timing.mode, [r.raw() for r in timing.rounds],
                               [w.raw() for w in timing.warmups])
        if attempt is not None:
            record["gate_attempt"] = attempt
        append_jsonl(raw_rounds_path(csv_path), record)
        if cal_row is not None:
            calibration_table(calibration_path(self.results_dir, case.model, self.device.label)).upsert(cal_row)

    def _roofline(self, backend, case: BenchCase, summary: dict, settings: dict) -> dict:
        """Bytes, FLOPs, MBU and MFU of a row (npuinfer.roofline), against this session's probed peaks."""
        bandwidth, flops = session_peaks(self.device, backend.dtype)
        args = backend.loaded.args if hasattr(backend, "loaded") else backend.args
        figures = roofline_figures(args, case.batch, case.input_len, case.output_len, backend.dtype,
                                   summary.get("first_token_ms"), summary.get("next_token_ms"), bandwidth, flops,
                                   str(settings.get("device_name", "")))
        if (figures["MBU"] or 0) > 1:
            warnings.warn(RooflineWarning(
                f"{case.id}: MBU {figures['MBU']:.2f} > 1: the decode read memory faster than the bandwidth probe "
                f"({bandwidth.source}); the probe is missing a faster way to read memory (npuinfer/roofline.py)"))
        if (figures["MFU"] or 0) > 1:
            warnings.warn(RooflineWarning(
                f"{case.id}: MFU {figures['MFU']:.2f} > 1: the prefill computed faster than the FLOP/s probe "
                f"({flops.source}); the probe is missing a faster kernel or read a slow moment (npuinfer/roofline.py)"))
        return figures

    # -- calibration and the baseline gate
    def _calibrate(self, backend, case: BenchCase, steps: int | None = None) -> list[float]:
        """The reference workload's step times now (``steps``, default the calibrator's), at the case's shape,
        on its device and dtype (npuinfer.calibration_workload)."""
        start = time.perf_counter()
        calibrator = self._calibrators.get(backend.dtype)
        if calibrator is None:
            calibrator = self._calibrators[backend.dtype] = Calibrator(self.device, backend.dtype)
        value = calibrator.measure(case.batch, case.input_len, steps)
        self.stats["calibration_s"] += time.perf_counter() - start
        return value

    def _verdict(self, case: BenchCase, outcome: GateOutcome | None) -> None:
        if outcome is not None:
            bench_gate_verdict(self.config, case.id, outcome)

    # -- max batch
    def max_batch(self, case: MaxBatchCase) -> None:
        opts = self.options
        if opts.backend != "npuinfer":
            pytest.skip("the max-batch search plans npuinfer's static KV cache; run it with --backend npuinfer")
        device = self.device
        latency = opts.max_tpot_ms is not None or opts.max_ttft_ms is not None
        if not device.is_accelerator and opts.memory_limit is None:
            pytest.skip("on cpu the max batch needs --memory-limit (e.g. --memory-limit 16GiB): "
                        "there is no device memory to fill (--max-tpot / --max-ttft search up to that batch)")
        backend = self.backend(case.model)
        self._check_length(backend, case.model, case.input_len, case.output_len)
        loaded = backend.loaded
        limit = min(x for x in (opts.memory_limit, device.total_memory_bytes()) if x is not None)
        search = MaxBatchSearch(loaded, device, case.input_len, case.output_len, limit, seed=opts.seed)
        start = time.perf_counter()
        result = search.run()
        self.stats["generate_s"] += time.perf_counter() - start  # the search is real generate runs
        settings = self.settings(case.model, backend)
        row = {**{k: settings[k] for k in MAX_BATCH_SETTINGS}, INPUT: case.input_len, OUTPUT: case.output_len,
               MAX_BATCH: result.max_batch, "predicted_max_batch": result.predicted,
               "predicted_peak(MiB)": result.predicted_peak / MIB if result.predicted_peak else None,
               "measured_peak(MiB)": result.measured_peak / MIB if result.measured_peak is not None else None,
               "confirmed_by": result.confirmed_by, "trial_runs": result.trials, "status": result.status,
               "reason": result.reason, "memory_limit": format_size(limit), "measured_at": now_iso()}
        if latency:
            row.update(self._latency_max_batch(backend, case, result))
        if self._writes_rows():
            max_batch_table(max_batch_path(self.results_dir, case.model, device.label)).upsert(row)
        if result.status not in ("ok", "unconfirmed") or (result.status != "ok" and not latency):
            pytest.skip(f"{case.id}: {result.reason}")

    def _latency_max_batch(self, backend, case: MaxBatchCase, memory) -> dict:
        """The largest batch within --max-tpot / --max-ttft, searched up to the memory-bound batch (measured)."""
        opts = self.options
        cap = memory.max_batch if memory.status == "ok" else memory.predicted
        search = LatencyBatchSearch(backend, case.model, case.input_len, case.output_len, max_tpot_ms=opts.max_tpot_ms,
                                    max_ttft_ms=opts.max_ttft_ms, rounds=opts.rounds, warmup=opts.warmup,
                                    mode=opts.timing, seed=opts.seed)
        start = time.perf_counter()
        try:
            result = search.run(cap)
        finally:
            backend.loaded.model.setup_caches(1, 1)
            self.device.empty_cache()
            self.stats["generate_s"] += time.perf_counter() - start
        return {"max_tpot(ms)": opts.max_tpot_ms, "max_ttft(ms)": opts.max_ttft_ms,
                LATENCY_MAX_BATCH: result.max_batch, "latency_batch_tpot(ms)": result.tpot_ms,
                "latency_batch_ttft(ms)": result.ttft_ms,
                "latency_bound_by": "memory (every batch up to the memory-bound one was within)" if result.capped
                else "latency", "latency_trials": result.trials}


def bench_gate_verdict(config: pytest.Config, case_id: str, outcome: GateOutcome) -> None:
    """A case's gate verdict (in-process or served): kept for its report, warned where NOT GATED or re-measured,
    the case failed where the regression was confirmed."""
    config.stash[_OUTCOMES][case_id] = outcome
    if outcome.status == "skipped":
        if bench_options(config).require_baseline:
            pytest.fail(f"{outcome.message()}\nNOT GATED, and --require-baseline asks every case to be compared "
                        "with a baseline row", pytrace=False)
        warnings.warn(PerformanceBaselineWarning(outcome.message()), stacklevel=1)
    for note in outcome.notes:
        warnings.warn(PerformanceBaselineWarning(f"{case_id}: {note}"), stacklevel=1)
    if outcome.status == "failed":
        pytest.fail(outcome.message(), pytrace=False)
    if len(outcome.attempts) > 1:  # passed on a re-measurement: worth knowing, never silent
        warnings.warn(PerformanceBaselineWarning(outcome.message()), stacklevel=1)


def _repeat_with(benchmark, before_each: Callable[[], None] | None = None):
    """Runs go through pytest-benchmark's pedantic, so its statistics see the timed runs. When it is
    disabled (--benchmark-disable, or under xdist where it turns itself off) pedantic calls its target
    once: that target is then the whole plain loop. ``before_each`` runs before every run, outside the
    run's timing (pedantic's ``setup``; each run times itself, npuinfer.timing.time_run)."""

    def plain(target, rounds: int, warmup: int) -> None:
        def run() -> None:
            before_each()
            target()

        plain_repeat(run if before_each else target, rounds, warmup)

    if benchmark is None:
        return plain

    def repeat(target, rounds: int, warmup: int) -> None:
        if getattr(benchmark, "disabled", False):
            benchmark.pedantic(plain, args=(target, rounds, warmup))
        else:
            benchmark.pedantic(target, setup=before_each, rounds=rounds, warmup_rounds=warmup, iterations=1)

    return repeat


# --------------------------------------------------------------------------------------------- fixtures, hooks


@pytest.fixture(scope="session")
def bench(pytestconfig: pytest.Config, backend_cache, results_dir: Path) -> BenchSession:
    """The bench session: backends loaded once, results recorder, time accounting."""
    session = BenchSession(pytestconfig, backend_cache, results_dir)
    pytestconfig.stash[_SESSION] = session
    return session


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_STARTED] = time.time()


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    started = config.stash.get(_STARTED, None)
    if started is None or xdist_worker_id(config) is not None or not _RAN_BENCH:
        return
    _fail_a_gate_that_compared_nothing(session)
    results = Path(bench_options(config).results_dir)
    report_start = time.perf_counter()
    written: list[tuple[Path, list[Path]]] = []
    unwritten: list[str] = []
    if results.is_dir():
        for csv_path in sorted(list(results.glob("performance_*.csv")) + list(results.glob("max_batch_*.csv"))):
            if csv_path.stat().st_mtime >= started - 1:  # written during this session (by us or xdist workers)
                try:
                    written.append((csv_path, write_reports(csv_path)))
                except OSError as exc:  # disk full, read-only: the cases' verdicts and the summary still print
                    unwritten.append(f"{csv_path}: its markdown / plot were not written: {exc}")
    config.stash[_REPORTS] = written
    config.stash[_UNWRITTEN] = unwritten
    if unwritten and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    stats_path = os.environ.get(STATS_ENV)
    bench_session = config.stash.get(_SESSION, None)
    if stats_path and bench_session is not None:
        stats = {**bench_session.stats, "report_s": time.perf_counter() - report_start,
                 "session_s": time.time() - started}
        write_atomic(stats_path, json.dumps(stats, indent=2) + "\n")


def _fail_a_gate_that_compared_nothing(session: pytest.Session) -> None:
    """A gated run (--baseline) whose performance cases were all NOT GATED proves nothing: it fails."""
    baseline = bench_options(session.config).baseline
    if not baseline or not _GATED:
        return
    compared = [g for g in _GATED.values() if g[0] in ("passed", "failed")]
    if compared:
        return
    session.config.stash[_NOTHING_COMPARED] = (
        f"no performance case was compared with --baseline {baseline}: {len(_GATED)} NOT GATED (listed above); a "
        "gated run that compared nothing fails")
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    _gate_summary(terminalreporter, config)
    for line in config.stash.get(_UNWRITTEN, []):
        terminalreporter.write_line(f"ERROR {line}", red=True)
    written = config.stash.get(_REPORTS, None)
    if not written:
        return
    terminalreporter.write_sep("-", "npuinfer bench results")
    for csv_path, reports in written:
        extra = ", ".join(p.name for p in reports)
        terminalreporter.write_line(f"{csv_path}" + (f" (+ {extra})" if extra else ""))


def _gate_summary(tr, config: pytest.Config) -> None:
    opts = bench_options(config)
    baseline = opts.baseline
    if not baseline or not _GATED:
        return
    by_status: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    retried: list[str] = []
    worst: tuple[float, str] | None = None
    for nodeid, (status, message, slowdown, where, attempts) in sorted(_GATED.items()):
        by_status.setdefault(status, []).append(message)
        if status == "passed" and attempts > 1:
            retried.append(message)
        if slowdown is not None and (worst is None or slowdown > worst[0]):
            worst = (slowdown, where)
    timing = "raw timing (a served deployment)" if opts.backend in SERVED_BACKENDS else f"{opts.gate_timing} timing"
    tr.write_sep("-", f"npuinfer performance gate: --baseline {baseline}, --max-regression "
                      f"{100 * opts.max_regression:g}%, {timing}, --gate-retries {opts.gate_retries}")
    tr.write_line(f"{len(by_status['passed'])} case(s) within the limit, {len(by_status['failed'])} regressed, "
                  f"{len(by_status['skipped'])} NOT GATED (no comparable baseline row, or not measured)"
                  + (f"; {len(retried)} within the limit only when re-measured" if retried else ""))
    if worst is not None:
        change = 100 * (worst[0] - 1)
        tr.write_line(f"largest change against the baseline: {abs(change):.1f}% {'slower' if change >= 0 else 'faster'}"
                      f" ({worst[1]})")
    for message in by_status["failed"]:
        tr.write_line("REGRESSED " + message)
    for message in retried:
        tr.write_line("RE-MEASURED " + message)
    for message in by_status["skipped"]:
        tr.write_line("NOT GATED " + message)
    nothing = config.stash.get(_NOTHING_COMPARED, None)
    if nothing:
        tr.write_line("FAILED " + nothing, red=True)


def _quant_columns(backend) -> dict[str, str]:
    quant = getattr(backend, "quantization", None) or {}
    return {"quantization": quant.get("quantization", "none"), "quant_kernel": quant.get("quant_kernel", "")}
