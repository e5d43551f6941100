"""The noise guard in the bench/ suite: options, the session header, each case's verdict in the terminal summary.

The guard itself is npuinfer.noise; BenchSession probes around each case's measurement, writes the verdict
into the row (``quiet``, ``quiet_reasons``, ``noise``) and, with --require-quiet, fails a case measured on a
busy machine. Here: the header that tells what the machine looks like before the first case (with the seeds'
advice on the CPU governor), and the summary line that names the rows measured on a busy machine.
"""
from __future__ import annotations

import argparse
import os

import pytest

from ..device import get_device
from ..noise import DEFAULT_THRESHOLD, NoiseGuard, Verdict, format_facts, system_facts
from .common import GROUP

_VERDICTS = pytest.StashKey[dict]()  # case id -> Verdict, in the process that measured it
_NOISE_KEY = "npuinfer_noise"  # user property: (quiet, reasons) of a case, so the xdist controller sees it
_SEEN: dict[str, tuple[bool, str]] = {}  # node id -> (quiet, reasons), as reported
_BENCH_MARKER = "npuinfer_bench"


def _share(text: str) -> float:
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share of the machine such as 10% or 0.1 (0 to 100%); got {text!r}")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP)
    group.addoption("--quiet-threshold", type=_share, default=DEFAULT_THRESHOLD, dest="noise_threshold",
                    metavar="10%",
                    help="bench: a row is quiet when other processes used at most this share of the cpus the run "
                         f"may use (and of its accelerator, where the driver tells) while it was measured "
                         f"(default {DEFAULT_THRESHOLD:.0%})".replace("%", "%%"))  # argparse formats help with %
    group.addoption("--require-quiet", action="store_true", default=False, dest="noise_require_quiet",
                    help="bench: fail a case measured on a busy machine (its row is written, quiet=False)")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_VERDICTS] = {}


def make_guard(config: pytest.Config, device) -> NoiseGuard:
    """The session's guard. Under torchrun the launcher's descendants (every rank) are the measurement."""
    own_root = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None
    return NoiseGuard(config.getoption("noise_threshold"), device, own_root=own_root)


def record_verdict(config: pytest.Config, case_id: str, verdict: Verdict) -> None:
    """A case's verdict; with --require-quiet a busy one fails the case (after its row is written)."""
    config.stash[_VERDICTS][case_id] = verdict
    if not verdict.quiet and config.getoption("noise_require_quiet"):
        pytest.fail(f"{case_id}: measured on a busy machine: {verdict.reason} (--require-quiet; the row is written "
                    "with quiet=False)", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Attaches the case's verdict to its report, so that the summary sees it under xdist too."""
    if call.when == "call" and _BENCH_MARKER in item.keywords:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        case = params.get("perf_case") or params.get("serving_case")
        verdict = item.config.stash[_VERDICTS].get(case.id) if case is not None else None
        if verdict is not None:
            item.user_properties.append((_NOISE_KEY, (verdict.quiet, verdict.reason)))
    return (yield)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    noise = dict(report.user_properties).get(_NOISE_KEY)
    if noise is not None and report.when == "call":
        _SEEN[report.nodeid] = tuple(noise)


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> list[str]:
    """The bench session header: the machine as the sweep will find it, before the first case."""
    if not any("perf_case" in getattr(item, "fixturenames", ()) for item in items):
        return []
    try:
        device = get_device(config.getoption("npuinfer_device"))
    except Exception:  # the first case reports a device that cannot be had
        device = None
    facts = system_facts(device, threshold=config.getoption("noise_threshold"))
    return [f"npuinfer noise guard: {line}" for line in format_facts(facts)]


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if not _SEEN:
        return
    tr = terminalreporter
    busy = {nodeid: reason for nodeid, (quiet, reason) in sorted(_SEEN.items()) if not quiet}
    threshold = config.getoption("noise_threshold")
    tr.write_sep("-", f"npuinfer noise guard (quiet: other processes <= {threshold:.0%} of the cpus)")
    if not busy:
        tr.write_line(f"all {len(_SEEN)} case(s) measured on a quiet machine", green=True)
        return
    tr.write_line(f"{len(busy)} of {len(_SEEN)} case(s) measured on a BUSY machine: their times include other "
                  "processes' work (rows have quiet=False)" + ("" if config.getoption("noise_require_quiet")
                                                                else "; --require-quiet fails such cases"),
                  yellow=True, bold=True)
    for nodeid, reason in busy.items():
        tr.write_line(f"BUSY {nodeid}: {reason}", yellow=True)
