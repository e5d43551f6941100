"""The bench suite's own options (the model, device and run options are npuinfer.options, shared with the
CLI) and the ``BenchOptions`` they make: the case grid, rounds, timing mode, backend and the gate's settings."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from ..latency import parse_duration_ms
from ..options import RunConfig, at_least, positive_ints
from ..gates.performance import DEFAULT_GATE_RETRIES, DEFAULT_MAX_REGRESSION, GATE_MODES, parse_regression
from ..timing import MODES
from .common import GROUP, session_run

# Default grid: finishes in about a minute for the five tiny models on 2 CPU cores.
# Long enough that the fixed report cost (~1.3 s, mostly matplotlib) stays a few percent of a sweep.
DEFAULT_BATCHES = (1, 4, 8)
DEFAULT_PAIRS = ((256, 256), (512, 512))
# The published grid: batch 1, 2, 4, 8 x input = output 256, 512, 1024, 2048.
SEED_BATCHES = (1, 2, 4, 8)
SEED_PAIRS = tuple((n, n) for n in (256, 512, 1024, 2048))


# --------------------------------------------------------------------------------------------- options


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    for part in text.split(","):
        pieces = part.strip().lower().split("x")
        try:
            pair = (int(pieces[0]), int(pieces[1])) if len(pieces) == 2 else None
        except ValueError:
            pair = None
        if pair is None or min(pair) <= 0:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated INPUTxOUTPUT pairs of positive integers such as 256x64,1024x128; got {text!r}")
        pairs.append(pair)
    return tuple(dict.fromkeys(pairs))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP)
    group.addoption("--grid", default="default", choices=["default", "seed"], dest="bench_grid",
                    help="default: batch 1,4,8 x input=output 256,512 (about a minute on 2 cores with the tiny models); "
                         "seed: the published grid, batch 1,2,4,8 x input=output 256,512,1024,2048")
    group.addoption("--batch-sizes", type=positive_ints, default=None, dest="bench_batches", metavar="1,4",
                    help="batch sizes (replaces the grid's)")
    group.addoption("--seq-lens", type=positive_ints, default=None, dest="bench_seq_lens", metavar="256,1024",
                    help="sequence lengths, input = output (replaces the grid's)")
    group.addoption("--case-pairs", type=_pairs, default=None, dest="bench_pairs", metavar="256x64,1024x128",
                    help="explicit INPUTxOUTPUT pairs (replaces the grid's)")
    group.addoption("--rounds", type=at_least(1), default=3, dest="bench_rounds",
                    help="timed runs per case; the row reports the median round (default 3)")
    group.addoption("--warmup", type=at_least(0), default=1, dest="bench_warmup",
                    help="warm-up runs per case at the case's own shape (default 1)")
    group.addoption("--timing", default="detail", choices=list(MODES), dest="bench_timing",
                    help="detail: synchronized timestamps around every forward; normal: the two-run estimate")
    group.addoption("--max-tpot", type=_duration("--max-tpot"), default=None, dest="bench_max_tpot", metavar="50ms",
                    help="bench/test_max_batch.py: also the largest batch whose measured time per output token "
                         "stays within this limit (searched up to the memory-bound batch)")
    group.addoption("--max-ttft", type=_duration("--max-ttft"), default=None, dest="bench_max_ttft", metavar="2s",
                    help="bench/test_max_batch.py: also the largest batch whose measured first-token time stays "
                         "within this limit (with --max-tpot: both)")
    group.addoption("--skip-measured", action="store_true", default=False, dest="bench_skip_measured",
                    help="skip cases whose row, with the same settings, is already in the results CSV "
                         "(to finish an interrupted sweep); without it a case is measured again and its row replaced")
    group.addoption("--bench-seed", type=at_least(0), default=0, dest="bench_seed",
                    help="seed of the random input ids (default 0)")
    group.addoption("--max-regression", type=_regression, default=DEFAULT_MAX_REGRESSION,
                    dest="bench_max_regression", metavar="10%",
                    help="bench gate: largest slowdown allowed against --baseline in first-token time, next-token "
                         f"time or E2E throughput, as a fraction or a percentage (default {DEFAULT_MAX_REGRESSION:g})")
    group.addoption("--calibrate", action="store_true", default=False, dest="bench_calibrate",
                    help="time the reference workload beside every case (calibration_<model>_<device>.csv), as "
                         "a run that will become a baseline needs; always on with --baseline")
    group.addoption("--gate-timing", default="calibrated", choices=list(GATE_MODES), dest="bench_gate_timing",
                    help="calibrated (default): compare time / calibration (a fixed workload timed beside each "
                         "case) so the machine's momentary speed cancels; raw: compare the times themselves")
    group.addoption("--gate-retries", type=at_least(0), default=DEFAULT_GATE_RETRIES, dest="bench_gate_retries",
                    metavar="N",
                    help="bench gate: a case beyond --max-regression is measured again (fresh warm-up, rounds and "
                         "calibration) up to N times and fails only if one metric is beyond the limit in every "
                         "attempt; each attempt's figures are kept in the row (gate_attempts) "
                         f"(default {DEFAULT_GATE_RETRIES})")
    group.addoption("--require-baseline", action="store_true", default=False, dest="bench_require_baseline",
                    help="with --baseline: a bench case that is not compared with a baseline row (none comparable, "
                         "or the case was skipped) fails instead of warning (CI uses it)")


def _duration(option: str):
    def parse(text: str) -> float:
        try:
            return parse_duration_ms(text, option)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _regression(text: str) -> float:
    return parse_regression(text)


@dataclass(frozen=True)
class BenchOptions:
    """The bench session's settings, read once from the options: the run's (``run``, a RunConfig shared with the
    CLI and the accuracy suite), the case grid and timing, and the gate's."""

    run: RunConfig  # model=None: the session's settings; a case's model comes from the grid
    batches: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]
    rounds: int
    warmup: int
    timing: str
    skip_measured: bool
    seed: int
    max_tpot_ms: float | None = None
    max_ttft_ms: float | None = None
    baseline: str | None = None
    calibrate: bool = False  # time the reference workload beside every case (always on with a baseline)
    max_regression: float = DEFAULT_MAX_REGRESSION
    gate_timing: str = "detail"
    gate_retries: int = DEFAULT_GATE_RETRIES
    require_baseline: bool = False
    results_dir: str = "results"

    @property
    def backend(self) -> str:
        return self.run.backend

    @property
    def compile(self) -> bool:
        return self.run.compile

    @property
    def kernels(self) -> str:
        return self.run.kernels

    @property
    def memory_limit(self) -> int | None:
        return self.run.memory_limit

    @property
    def backend_label(self) -> str:
        """The backend column of a row: compiled npuinfer rows are not comparable with eager ones, nor rows of
        plain torch ops with fused-kernel ones (the default, so its label is unchanged)."""
        return self.backend + ("+plain" if self.kernels == "plain" else "") + ("+compile" if self.compile else "")

    @classmethod
    def from_config(cls, config: pytest.Config) -> "BenchOptions":
        opt = config.getoption
        run = session_run(config)
        if run.compile and run.backend != "npuinfer":
            raise pytest.UsageError("--compile captures npuinfer's decode step; it does not apply to --backend "
                                    f"{run.backend}")
        if run.kernels != "fused" and run.backend != "npuinfer":
            raise pytest.UsageError("--kernels chooses npuinfer's own kernels; it does not apply to --backend "
                                    f"{run.backend}")
        if opt("bench_pairs") and opt("bench_seq_lens"):
            raise pytest.UsageError("--case-pairs and --seq-lens both given: --seq-lens 256,1024 means the pairs "
                                    "256x256,1024x1024, so give one of them")
        grid = opt("bench_grid")
        if opt("bench_pairs"):
            pairs = opt("bench_pairs")
        elif opt("bench_seq_lens"):
            pairs = tuple((n, n) for n in opt("bench_seq_lens"))
        else:
            pairs = SEED_PAIRS if grid == "seed" else DEFAULT_PAIRS
        batches = opt("bench_batches") or (SEED_BATCHES if grid == "seed" else DEFAULT_BATCHES)
        return cls(run=run, batches=tuple(batches), pairs=tuple(pairs), rounds=opt("bench_rounds"),
                   warmup=opt("bench_warmup"), timing=opt("bench_timing"), skip_measured=opt("bench_skip_measured"),
                   seed=opt("bench_seed"), max_tpot_ms=opt("bench_max_tpot"), max_ttft_ms=opt("bench_max_ttft"),
                   baseline=opt("npuinfer_baseline"), calibrate=bool(opt("bench_calibrate")),
                   max_regression=opt("bench_max_regression"), gate_timing=opt("bench_gate_timing"),
                   gate_retries=opt("bench_gate_retries"), require_baseline=opt("bench_require_baseline"),
                   results_dir=opt("npuinfer_results_dir"))


_OPTIONS = pytest.StashKey[BenchOptions]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_OPTIONS] = BenchOptions.from_config(config)


def bench_options(config: pytest.Config) -> BenchOptions:
    return config.stash[_OPTIONS]
