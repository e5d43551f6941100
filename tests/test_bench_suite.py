"""The bench/ suite end to end: `pytest bench/ ...` in a subprocess on tiny models with a temporary
--results-dir; plus the pieces it is built from (keyed CSV, memory prediction, max-batch search,
the transformers backend)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from npuinfer.memory import estimate, parse_size, predict_max_batch
from npuinfer.model import ModelArgs
from npuinfer.results.performance import (NEXT, PUBLISHED_COLUMNS, THROUGHPUT, performance_panels,
                                         performance_plot, plot_rows)
from npuinfer.results.table import CsvTable

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = ["batch_size", "input_seq_len(Encoding)", "output_seq_len(Decoding)", "ResponseTime(s)",
             "forward_first_token_time(ms)", "forward_next_token_time(ms)", "pre_next_token_time(ms)",
             "post_next_token_time_post(ms)"]


def run_bench(*args: str, results: Path, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--results-dir", str(results), "-q", "-rs",
           "--rounds", "2", "--warmup", "1", *args]  # the caller's options last, so they win
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def rows_of(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def case_keys(rows) -> list[tuple[int, int, int]]:
    return sorted((int(r["batch_size"]), int(r["input_seq_len(Encoding)"]), int(r["output_seq_len(Decoding)"]))
                  for r in rows)


# ------------------------------------------------------------------ a small sweep, once for the module


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, npuinfer_cache):
    results = tmp_path_factory.mktemp("sweep")
    proc = run_bench("bench/", "--model", "qwen-tiny", "--model", "gpt-neox-tiny", "--batch-sizes", "1,8",
                     "--case-pairs", "16x8,32x4", "--benchmark-json", str(results / "bench.json"), results=results)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return results, proc


def test_one_row_per_case_with_the_published_columns_first(sweep):
    results, _ = sweep
    assert PUBLISHED_COLUMNS == PUBLISHED
    for model in ("qwen-tiny", "gpt-neox-tiny"):
        header, rows = rows_of(results / f"performance_{model}_cpu.csv")
        assert header[:8] == PUBLISHED and header[8] == THROUGHPUT == "E2E throughput (token/s)"
        assert case_keys(rows) == [(1, 16, 8), (1, 32, 4), (8, 16, 8), (8, 32, 4)]
        assert {r["model"] for r in rows} == {model} and {r["status"] for r in rows} == {"ok"}
        for r in rows:
            assert r["case_id"] == f"{model}-bs{r['batch_size']}-in{r['input_seq_len(Encoding)']}-out" \
                                   f"{r['output_seq_len(Decoding)']}"
            for column in PUBLISHED + ["TTFT(ms)", "TPOT(ms)", "ITL_p99(ms)"]:
                assert float(r[column]) > 0, column
            assert len(json.loads(r["rounds_detail"])) == 2  # the raw rounds are kept


def test_throughput_is_batch_times_output_over_response_time(sweep):
    results, _ = sweep
    _, rows = rows_of(results / "performance_qwen-tiny_cpu.csv")
    for r in rows:
        expected = int(r["batch_size"]) * int(r["output_seq_len(Decoding)"]) / float(r["ResponseTime(s)"])
        assert float(r[THROUGHPUT]) == pytest.approx(expected, rel=1e-6)


def test_markdown_plot_and_summary_line(sweep):
    results, proc = sweep
    for model in ("qwen-tiny", "gpt-neox-tiny"):
        md = (results / f"performance_{model}_cpu.md").read_text()
        assert "| batch_size" in md and "E2E throughput (token/s)" in md and md.count("\n| ") >= 5
        png = results / f"performance_{model}_cpu.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len((results / f"performance_{model}_cpu.rounds.jsonl").read_text().splitlines()) == 4
    assert "npuinfer bench results" in proc.stdout
    assert "performance_qwen-tiny_cpu.csv (+ performance_qwen-tiny_cpu.md, performance_qwen-tiny_cpu.png)" \
           in proc.stdout


def test_plot_draws_throughput_latency_mbu_and_mfu_from_the_rows(sweep, tmp_path):
    """The PNG's data: every measured row is a point of each panel, MBU and MFU against batch per sequence
    length, with the peak they are measured against in the title."""
    results, _ = sweep
    csv_path = results / "performance_qwen-tiny_cpu.csv"
    _, rows = rows_of(csv_path)
    panels = performance_panels(plot_rows(csv_path))
    by_y = {p.ylabel: p for p in panels}
    assert list(by_y) == [THROUGHPUT, NEXT, "MBU", "MFU"]
    assert sorted(by_y["MBU"].series) == ["in16/out8", "in32/out4"]  # a line per sequence length
    for r in rows:
        b, seq = int(r["batch_size"]), f"in{r['input_seq_len(Encoding)']}/out{r['output_seq_len(Decoding)']}"
        assert (b, float(r["MBU"])) in by_y["MBU"].series[seq]
        assert (b, float(r["MFU"])) in by_y["MFU"].series[seq]
        assert (b, float(r[THROUGHPUT])) in by_y[THROUGHPUT].series[seq]
        assert (int(r["input_seq_len(Encoding)"]), float(r[NEXT])) in by_y[NEXT].series[f"bs{b}"]
        assert f"{float(r['peak_bandwidth(GB/s)']):.3g} GB/s" in by_y["MBU"].title
        assert f"{float(r['peak_TFLOP/s']):.3g} TFLOP/s" in by_y["MFU"].title
    assert [x for x, _ in by_y["MBU"].series["in16/out8"]] == [1, 8]  # sorted by batch
    png = tmp_path / "p.png"
    assert performance_plot(csv_path, png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_rows_without_the_roofline_columns_has_no_mbu_panel(tmp_path):
    """Rows written before the roofline columns (committed baselines) still plot, with the two old panels."""
    rows = [{"batch_size": str(b), "input_seq_len(Encoding)": "16", "output_seq_len(Decoding)": "8", "status": "ok",
             "ResponseTime(s)": "0.5", THROUGHPUT: str(16 * b), NEXT: str(2.0 + b), "dtype": "fp32"}
            for b in (1, 2, 16)]
    panels = performance_panels(rows)
    assert [p.ylabel for p in panels] == [THROUGHPUT, NEXT]
    assert panels[0].series == {"in16/out8": [(1, 16.0), (2, 32.0), (16, 256.0)]}
    assert panels[1].series == {"bs1": [(16, 3.0)], "bs2": [(16, 4.0)], "bs16": [(16, 18.0)]}
    assert list(panels[1].series) == ["bs1", "bs2", "bs16"]  # numeric order, not text order


def test_benchmark_json_carries_the_token_metrics(sweep):
    results, _ = sweep
    report = json.loads((results / "bench.json").read_text())
    benches = {b["param"]: b for b in report["benchmarks"]}
    assert len(benches) == 8
    info = benches["qwen-tiny-bs8-in16-out8"]["extra_info"]
    assert info["batch_size"] == 8 and info["forward_first_token_time(ms)"] > 0 and info[THROUGHPUT] > 0
    assert benches["qwen-tiny-bs8-in16-out8"]["stats"]["rounds"] == 2


def test_max_batch_without_a_limit_skips_on_cpu(sweep):
    _, proc = sweep
    # -rs groups equal reasons: one line for the 4 cases (2 models x 2 pairs)
    assert any(line.startswith("SKIPPED [4]") and "on cpu the max batch needs --memory-limit" in line
               for line in proc.stdout.splitlines()), proc.stdout[-2000:]


def test_k_selects_exactly_the_qwen_batch_8_cases(tmp_path, npuinfer_cache):
    proc = run_bench("bench/test_performance.py", "-k", "qwen and bs8", "--model", "qwen-tiny", "--model",
                     "internlm-tiny", "--batch-sizes", "1,8", "--case-pairs", "16x4,24x4", "-rA", results=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ran = sorted(line.split("[")[1].split("]")[0] for line in proc.stdout.splitlines() if line.startswith("PASSED"))
    assert ran == ["qwen-tiny-bs8-in16-out4", "qwen-tiny-bs8-in24-out4"]
    assert "2 passed, 6 deselected" in proc.stdout
    assert [p.name for p in tmp_path.glob("performance_*.csv")] == ["performance_qwen-tiny_cpu.csv"]
    assert case_keys(rows_of(tmp_path / "performance_qwen-tiny_cpu.csv")[1]) == [(8, 16, 4), (8, 24, 4)]


PAUSE_PLUGIN = """
import os, time
finished = 0
def pytest_runtest_logfinish(nodeid, location):
    global finished
    finished += 1
    if finished == int(os.environ["PAUSE_AFTER"]):
        open(os.environ["PAUSE_MARKER"], "w").close()
        time.sleep(600)
"""


@pytest.mark.e2e
def test_a_killed_sweep_keeps_its_rows_and_a_rerun_does_not_duplicate(tmp_path, npuinfer_cache):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "pause_after.py").write_text(PAUSE_PLUGIN)
    results = tmp_path / "results"
    marker = tmp_path / "paused"
    grid = ["bench/test_performance.py", "--model", "qwen-tiny", "--batch-sizes", "1,2,4", "--case-pairs", "16x4,24x4",
            "--rounds", "1", "--warmup", "0"]
    cmd = [sys.executable, "-m", "pytest", *grid, "-p", "no:cacheprovider", "-p", "pause_after", "--results-dir",
           str(results), "-q"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")]),
           "PAUSE_AFTER": "3", "PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "the sweep never reached its third case"
            time.sleep(0.1)
    finally:
        proc.kill()  # SIGKILL: no session end, no cleanup
        proc.wait()
    csv_path = results / "performance_qwen-tiny_cpu.csv"
    _, rows = rows_of(csv_path)
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)  # every row measured before the kill
    first = {r["case_id"]: r["measured_at"] for r in rows}

    # Finish the sweep: the three measured cases are skipped, the other three measured.
    done = run_bench(*grid, "--skip-measured", results=results, env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert done.returncode == 0, done.stdout[-3000:]
    assert "3 passed, 3 skipped" in done.stdout and "(--skip-measured)" in done.stdout
    _, rows = rows_of(csv_path)
    assert case_keys(rows) == [(1, 16, 4), (1, 24, 4), (2, 16, 4), (2, 24, 4), (4, 16, 4), (4, 24, 4)]
    assert {r["case_id"]: r["measured_at"] for r in rows if r["case_id"] in first} == first  # kept as measured

    # Measuring a case again (no --skip-measured) replaces its row rather than adding one.
    again = run_bench(*grid, "-k", "bs1-in16", results=results)
    assert again.returncode == 0 and "1 passed" in again.stdout, again.stdout[-3000:]
    _, rows = rows_of(csv_path)
    assert len(rows) == 6 and len({r["case_id"] for r in rows}) == 6


OOM_PLUGIN = """
import os, weakref
import torch
from npuinfer.backends import npuinfer as local
from npuinfer.device import Device
_generate = local.NpuinferBackend.generate
_failed = []  # the failed call's tensor: gone by the time memory is released, if released outside the handler
def generate(self, input_ids, attention_mask, max_new_tokens, observer=None):
    if input_ids.shape[0] >= 8:
        activations = torch.empty(1 << 20)
        _failed.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
    return _generate(self, input_ids, attention_mask, max_new_tokens, observer)
local.NpuinferBackend.generate = generate
_empty_cache = Device.empty_cache
def empty_cache(self):
    if _failed:
        with open(os.environ["OOM_FREED_LOG"], "a") as log:
            log.write(f"{_failed.pop()() is None}\\n")
    _empty_cache(self)
Device.empty_cache = empty_cache
"""


def test_oom_rows_too_long_skips_and_max_batch(tmp_path, npuinfer_cache):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "oom_inject.py").write_text(OOM_PLUGIN)
    results = tmp_path / "results"
    freed_log = tmp_path / "oom_freed.log"
    proc = run_bench("bench/", "-p", "oom_inject", "--model", "qwen-tiny", "--batch-sizes", "1,8", "--case-pairs",
                     "16x8,2040x16", "--memory-limit", "64MiB", results=results,
                     env={"PYTHONPATH": os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")]),
                          "OOM_FREED_LOG": str(freed_log)})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert freed_log.read_text().split() == ["True"]  # memory released after the failed call's tensors went
    assert "2 passed, 4 skipped" in proc.stdout  # perf bs1 16x8 and max-batch 16x8 pass
    assert "2056 tokens exceeds the 2048 the model allows" in proc.stdout  # 2 perf cases + 1 max-batch case
    _, rows = rows_of(results / "performance_qwen-tiny_cpu.csv")
    by_batch = {int(r["batch_size"]): r for r in rows}
    assert sorted(by_batch) == [1, 8]  # no rows for the too-long cases
    assert by_batch[1]["status"] == "ok"
    assert by_batch[8]["status"] == "OOM" and "out of memory" in by_batch[8]["reason"]
    assert by_batch[8]["ResponseTime(s)"] == ""
    assert "OOM" in (results / "performance_qwen-tiny_cpu.md").read_text()

    _, mb = rows_of(results / "max_batch_qwen-tiny_cpu.csv")
    assert len(mb) == 1
    row = mb[0]
    assert (row["input_seq_len(Encoding)"], row["output_seq_len(Decoding)"], row["status"]) == ("16", "8", "ok")
    assert int(row["max_batch_size"]) == int(row["predicted_max_batch"]) > 8
    assert float(row["predicted_peak(MiB)"]) <= 64 and row["memory_limit"] == "64MiB"
    assert "cpu peak memory is not measured" in row["confirmed_by"]
    trials = json.loads(row["trial_runs"])
    assert trials[0] == [int(row["max_batch_size"]), True, None, "run"]
    assert trials[1][:2] == [int(row["max_batch_size"]) + 1, False]
    assert (results / "max_batch_qwen-tiny_cpu.md").is_file()


def test_malformed_options_are_usage_errors():
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--co", "-q", "--batch-sizes", "1,x"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr  # pytest's usage-error exit code
    assert "argument --batch-sizes: expected comma-separated positive integers such as 1,4; got '1,x'" in proc.stderr
    from argparse import ArgumentTypeError

    from npuinfer.options import at_least as _count, memory_limit as _size, positive_ints as _positive_ints
    from npuinfer.pytest_plugin.bench_options import _pairs

    assert _pairs("256x64, 1024X128") == ((256, 64), (1024, 128)) and _positive_ints("1,4,4") == (1, 4)
    for parse, text, expected in ((_pairs, "256x", "INPUTxOUTPUT pairs"), (_pairs, "0x4", "INPUTxOUTPUT pairs"),
                                  (_positive_ints, "", "positive integers"), (_size, "16XB", "a size such as 16GiB"),
                                  (_count(1), "0", "an integer >= 1")):
        with pytest.raises(ArgumentTypeError, match=expected):
            parse(text)


# ------------------------------------------------------------------ pieces


def test_keyed_csv_replaces_rows_and_keeps_unknown_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,old\n1,x,keep\n")
    table = CsvTable(path, ["a", "b", "v"], key=["a", "b"])
    table.upsert({"a": 2, "b": "y", "v": 0.5})
    table.upsert({"a": 1, "b": "x", "v": 1.25})
    table.upsert({"a": 2, "b": "y", "v": float("nan")})
    header, rows = rows_of(path)
    assert header == ["a", "b", "v", "old"]
    assert rows == [{"a": "1", "b": "x", "v": "1.25", "old": ""}, {"a": "2", "b": "y", "v": "", "old": ""}]
    assert table.find({"a": 1, "b": "x"})["v"] == "1.25"
    with pytest.raises(ValueError, match="unknown columns"):
        table.upsert({"a": 3, "b": "z", "nope": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]  # no temporary or lock files left


def test_parse_size():
    assert parse_size("16GiB") == 16 * 1024**3
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size("8GB") == 8 * 10**9
    assert parse_size("1.5gib") == int(1.5 * 1024**3)
    for bad in ("", "GiB", "-1GiB", "16XB", "0"):
        with pytest.raises(ValueError, match="--memory-limit"):
            parse_size(bad)


QWEN_7B = ModelArgs(family="qwen", vocab_size=151936, dim=4096, n_layers=32, n_heads=32, head_dim=128,
                    intermediate_size=11008, max_seq_len=8192, qkv_bias=True)


def test_memory_estimate_of_qwen_7b_in_fp16():
    est = estimate(QWEN_7B, batch=1, input_len=256, output_len=256, dtype_bytes=2)
    assert est.weights == pytest.approx(2 * 7.72e9, rel=0.02)  # 7.7B parameters
    assert est.kv_cache == 2 * 32 * 512 * 4096 * 2  # K and V, 32 layers, 512 positions, fp16
    # Batch 8 x 2048: the prefill projects only the last position, so its activations are one layer's
    # temporaries (the 8 x 2048 x 11008 MLP), far below full-sequence logits (8 x 2048 x 151936 x 2 bytes).
    big = estimate(QWEN_7B, batch=8, input_len=2048, output_len=2048, dtype_bytes=2)
    assert 8 * 2048 * 11008 * 2 * 3 <= big.activations < 8 * 2048 * 151936 * 2
    limit = 64 * 1024**3
    best = predict_max_batch(QWEN_7B, 1024, 1024, 2, limit)
    assert estimate(QWEN_7B, best, 1024, 1024, 2).total <= limit < estimate(QWEN_7B, best + 1, 1024, 1024, 2).total
    assert predict_max_batch(QWEN_7B, 1024, 1024, 2, 10 * 1024**3) == 0  # the weights alone are 15 GB


@pytest.mark.parametrize("capacity,prediction", [(37, 20), (37, 37), (37, 100), (1, 5), (0, 3), (500, 1)])
def test_max_batch_search_finds_the_real_capacity_from_any_prediction(capacity, prediction):
    from npuinfer.memory import MaxBatchSearch

    search = object.__new__(MaxBatchSearch)
    search.trials, search._peaks = [], {}
    search.trial = lambda b: (b <= capacity, None, "run")
    assert search.search(max(1, prediction)) == capacity
    assert len(search.trials) <= MaxBatchSearch.MAX_TRIALS
    if prediction == capacity:
        assert len(search.trials) == 2  # an exact prediction costs two runs: it, and one more that fails


# ------------------------------------------------------------------ the transformers backend


@pytest.mark.parametrize("name", ["qwen-tiny", "baichuan2-7b-tiny", "internlm-tiny", "gpt-neox-tiny", "qwen2-tiny",
                                  "llama3-tiny", "qwen3-tiny"])
def test_hf_backend_runs_the_same_function_and_is_timed_per_step(name, load_tiny):
    from npuinfer.backends.hf_model import HFBackend
    from npuinfer.backends.npuinfer import NpuinferBackend
    from npuinfer.timing import make_inputs, time_run

    loaded = load_tiny(name)
    hf = HFBackend.load(loaded.model_dir, loaded.device, torch.float32)
    ids, mask = make_inputs(loaded.device, loaded.args.vocab_size, 2, 12)
    with torch.inference_mode():
        loaded.model.setup_caches(2, 12)
        ours = loaded.model(ids, 0)
        theirs = hf.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert torch.equal(hf.generate(ids, mask, 6), NpuinferBackend(loaded).generate(ids, mask, 6))
    run = time_run(hf, ids, mask, 6, "detail")
    assert run.output_len == 6 and len(run.forward_ns) == 6 and all(t > 0 for t in run.forward_ns)
    assert run.other_ms >= 0 and math.isfinite(run.tpot_ms)


def test_hf_backend_refuses_alibi_clearly(tiny_dir):
    from npuinfer.device import Device
    from npuinfer.backends.hf_model import HFBackend, HFUnsupported

    with pytest.raises(HFUnsupported, match="ALiBi attention .* has no native transformers model"):
        HFBackend.load(tiny_dir("baichuan2-13b-tiny"), Device("cpu"), torch.float32)
