"""Max batch under a latency limit (npuinfer.latency, `pytest bench/test_max_batch.py --max-tpot 50ms`)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from npuinfer.latency import LatencyBatchSearch, parse_duration_ms
from npuinfer.backends.npuinfer import NpuinferBackend

REPO = Path(__file__).resolve().parents[1]


def test_durations_parse():
    assert parse_duration_ms("50ms") == 50 and parse_duration_ms("0.5s") == 500 and parse_duration_ms("7") == 7
    with pytest.raises(ValueError, match="--max-ttft: expected a positive duration"):
        parse_duration_ms("fast", "--max-ttft")


def test_the_returned_batch_is_within_the_limit_and_the_next_one_is_not(load_tiny):
    backend = NpuinferBackend(load_tiny("qwen-tiny"))
    probe = LatencyBatchSearch(backend, "qwen-tiny", 64, 6, max_tpot_ms=1e9, rounds=1, warmup=1)
    low, high = probe.measure(1)[0], probe.measure(48)[0]
    limit = (low * high) ** 0.5 if high > low else low  # between batch 1 and batch 48, as measured here and now
    search = LatencyBatchSearch(backend, "qwen-tiny", 64, 6, max_tpot_ms=limit, rounds=1, warmup=1)
    result = search.run(cap=48)
    measured = {batch: (tpot, within) for batch, tpot, _, within in search.trials}
    assert all(within == (tpot <= limit) for tpot, within in measured.values())
    b = result.max_batch
    if b:
        assert measured[b] == (result.tpot_ms, True) and result.tpot_ms <= limit
    if b < 48:
        assert not result.capped and measured[b + 1][0] > limit and not measured[b + 1][1]
    else:
        assert result.capped
    assert len(search.trials) == len(measured) <= LatencyBatchSearch.MAX_TRIALS  # no batch measured twice


def _max_batch_rows(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    results = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
                           "bench/test_max_batch.py", "--model", "qwen-tiny", "--case-pairs", "16x4", "--rounds", "1",
                           "--memory-limit", "4MiB", "--results-dir", str(results), *options], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    path = results / "max_batch_qwen-tiny_cpu.csv"
    if not path.exists():
        return proc, []
    with open(path, newline="") as fh:
        return proc, list(csv.DictReader(fh))


def test_max_tpot_option_writes_the_latency_answer_next_to_the_memory_one(tmp_path, npuinfer_cache):
    proc, rows = _max_batch_rows(tmp_path, "--max-tpot", "10s")
    assert proc.returncode == 0, proc.stdout[-3000:]
    row = rows[0]
    memory_bound = int(row["max_batch_size"])
    assert memory_bound > 8 and row["max_tpot(ms)"] == "10000"
    # a tiny model's step is far below 10 s at every batch that fits: the memory-bound batch is the answer
    assert int(row["latency_max_batch"]) == memory_bound and row["latency_bound_by"].startswith("memory")
    trials = json.loads(row["latency_trials"])
    assert [t[0] for t in trials][:4] == [1, 2, 4, 8] and trials[-1][0] == memory_bound and all(t[3] for t in trials)
    markdown = (tmp_path / "r" / "max_batch_qwen-tiny_cpu.md").read_text()
    assert "latency_max_batch" in markdown

    proc, rows = _max_batch_rows(tmp_path, "--max-ttft", "0.001ms")  # nothing answers in a microsecond
    assert proc.returncode == 0, proc.stdout[-3000:]
    row = [r for r in rows if r["max_ttft(ms)"] == "0.001"][0]
    assert int(row["latency_max_batch"]) == 0 and json.loads(row["latency_trials"])[0][0] == 1
    assert len(rows) == 2  # the two limits are two rows
