"""A results directory that cannot be written: read-only from the start is one usage error before the first
case (it used to measure every case, then fail each with a raw Errno 30 / 13 traceback); a write that fails at
the end of a sweep (disk full) names the file, the cases keep their verdicts and the summary prints (a PNG
write used to end the session in a raw OSError traceback).

Both are real refusals by the kernel: a root test process gives up CAP_DAC_OVERRIDE (setpriv) so a 0555
directory is read-only to it, and RLIMIT_FSIZE makes any write past 32 KiB fail with EFBIG, as a full disk
fails with ENOSPC (the sweep's CSV, markdown and rounds log are a few KiB; its plot is ~80 KiB)."""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["bench/test_performance.py", "--model", "qwen-tiny", "--batch-sizes", "1", "--case-pairs", "16x4",
         "--rounds", "2", "--warmup", "1"]


def pytest_run(args: list[str], prefix: list[str] = (), preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def without_root_override() -> list[str]:
    """A command prefix under which this process's user is refused what the permission bits refuse."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a 0555 directory would stay writable")
    return ["setpriv", "--bounding-set=-dac_override", "--inh-caps=-dac_override", "--"]


def test_a_read_only_results_dir_is_a_usage_error_before_any_case(tmp_path, tiny_dir):
    tiny_dir("qwen-tiny")
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    try:
        proc = pytest_run([*SWEEP, "--results-dir", str(results / "run1")], prefix=without_root_override())
    finally:
        results.chmod(0o755)
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage error
    assert f"--results-dir {results / 'run1'}: {results} is not writable" in proc.stderr
    assert "passed" not in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    assert list(results.iterdir()) == []


def limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))


def test_a_report_write_that_fails_at_the_end_names_the_file_and_the_summary_prints(tmp_path, tiny_dir):
    tiny_dir("qwen-tiny")
    results = tmp_path / "results"
    proc = pytest_run([*SWEEP, "--results-dir", str(results)], preexec=limit_file_size)
    out = proc.stdout + proc.stderr
    csv_path = results / "performance_qwen-tiny_cpu.csv"
    assert proc.returncode == 1, out  # tests failed: a result file is missing
    assert "1 passed" in proc.stdout  # the case's own verdict stands, and the summary line printed
    assert (f"ERROR {csv_path}: its markdown / plot were not written: [Errno 27] cannot write "
            f"{csv_path.with_suffix('.png')}: File too large") in proc.stdout, out
    assert "Traceback" not in out and "INTERNALERROR" not in out
    assert len(csv_path.read_text().splitlines()) == 2  # the measured row is kept
    assert not list(results.glob(".*.tmp"))  # no temporary file left behind
