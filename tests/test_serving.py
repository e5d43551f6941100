"""bench/ against a real vLLM server (its CPU build) on 127.0.0.1: the serving cases' rows, the client spread over
processes, the gate, the largest concurrency within limits, and every fault of the issue (unreachable, model not
served, 4xx, time-outs, a server that dies mid-sweep, Ctrl-C), each a real pytest run in a subprocess. Marked e2e:
the server takes a minute to start."""
from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vllm_server import free_port

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-npuinfer-test-4f1c9e"
pytestmark = pytest.mark.e2e


def bench_cmd(server_url: str, served: str, tokenizer: Path, results: Path, *extra: str, suite: str = "bench/"
              ) -> list[str]:
    return [sys.executable, "-m", "pytest", suite, "-p", "no:cacheprovider", "-q", "-rA", "--backend", "openai",
            "--base-url", server_url, "--served-model", served, "--tokenizer", str(tokenizer),
            "--results-dir", str(results), *extra]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)


def rows(results: Path, served: str) -> list[dict]:
    path = results / f"performance_{served}_openai.csv"
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_sweep_writes_one_complete_row_per_case_and_the_key_reaches_no_file(served_vllm, tmp_path):
    srv = served_vllm
    env = {**os.environ, "NPUINFER_TEST_KEY": SECRET}
    proc = run(bench_cmd(srv.base_url, srv.served_name, srv.model_dir, tmp_path, "--case-pairs", "32x16",
                         "--concurrency", "1,2", "--request-rates", "inf", "--num-prompts", "8",
                         "--api-key-env", "NPUINFER_TEST_KEY", "--max-ttft", "10s", "--max-tpot", "1s"), env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    got = {r["case_id"]: r for r in rows(tmp_path, srv.served_name)}
    assert set(got) == {f"{srv.served_name}-c1-in32-out16", f"{srv.served_name}-c2-in32-out16",
                        f"{srv.served_name}-rinf-in32-out16"}
    for r in got.values():
        assert (r["status"], r["completed"], r["failed_requests"]) == ("ok", "8", "0")
        assert float(r["prompt_tokens_mean"]) == 32 and float(r["output_tokens_mean"]) == 16
        # the server's own counters over the case (the warm-up is before the first scrape): exactly the case's work
        assert float(r["server_generation_tokens"]) == 8 * 16 and float(r["server_prompt_tokens"]) == 8 * 32
        assert r["server_metrics"] == "scraped" and float(r["server_ttft_mean(ms)"]) > 0
        assert 0 < float(r["TTFT_median(ms)"]) <= float(r["E2EL_median(ms)"])
        assert float(r["E2E throughput (token/s)"]) == pytest.approx(float(r["output_throughput(tok/s)"]))
        assert float(r["goodput(req/s)"]) <= float(r["request_throughput(req/s)"])
        assert r["endpoint"] == srv.base_url and r["server_version"] and r["backend"] == "openai"
        assert float(r["client_cpu_us_per_token"]) > 0
    assert got[f"{srv.served_name}-c2-in32-out16"]["batch_size"] == "2"
    assert got[f"{srv.served_name}-rinf-in32-out16"]["request_rate"] == "inf"
    assert len({r["prompt_salt"] for r in got.values()}) == 1
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_bytes().decode("utf-8", "replace"), path
    assert SECRET not in proc.stdout + proc.stderr
    assert (tmp_path / f"performance_{srv.served_name}_openai.png").is_file()
    assert "Serving performance" in (tmp_path / f"performance_{srv.served_name}_openai.md").read_text()
    listed = run(bench_cmd(srv.base_url, srv.served_name, srv.model_dir, tmp_path / "k", "--case-pairs", "32x16",
                           "--concurrency", "1,2,4", "--collect-only", "-k", "c2"))
    assert "test_serving[neox-tiny-served-c2-in32-out16]" in listed.stdout
    assert "c1-" not in listed.stdout and "c4-" not in listed.stdout and "test_performance" not in listed.stdout


def test_client_processes_merge_into_one_row(served_vllm, tmp_path):
    srv = served_vllm
    proc = run(bench_cmd(srv.base_url, srv.served_name, srv.model_dir, tmp_path, "--case-pairs", "32x16",
                         "--concurrency", "4", "--num-prompts", "12", "--client-procs", "2"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    (r,) = rows(tmp_path, srv.served_name)
    assert (r["completed"], r["client_procs"]) == ("12", "2")
    assert float(r["server_generation_tokens"]) == 12 * 16


def _set_baseline_figures(path: Path, first_ms: float, next_ms: float, throughput: float) -> None:
    """The baseline's gated figures set by hand: the test decides which side is faster, whatever the server did."""
    text = path.read_text(encoding="utf-8").splitlines()
    header = next(csv.reader([text[0]]))
    row = next(csv.reader([text[1]]))
    for column, value in (("forward_first_token_time(ms)", first_ms), ("forward_next_token_time(ms)", next_ms),
                          ("E2E throughput (token/s)", throughput)):
        row[header.index(column)] = str(value)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, row])


def test_the_gate_compares_with_a_baseline_and_confirms_a_regression_before_failing(served_vllm, tmp_path):
    srv = served_vllm
    args = ("--case-pairs", "32x16", "--concurrency", "2", "--num-prompts", "8")
    first = run(bench_cmd(srv.base_url, srv.served_name, srv.model_dir, tmp_path / "base", *args))
    assert first.returncode == 0, first.stdout[-3000:]
    path = tmp_path / "base" / f"performance_{srv.served_name}_openai.csv"
    _set_baseline_figures(path, 1e6, 1e6, 1e-3)  # a baseline far slower: any run is within the limit
    passed = run(bench_cmd(srv.base_url, srv.served_name, srv.model_dir, tmp_path / "now", *args,
                           "--baseline", str(tmp_path / "base"), "--require-baseline"))
    assert passed.returncode == 0, passed.stdout[-3000:]
    assert "1 case(s) within the limit, 0 regressed" in passed.stdout
    compared = run([sys.executable, "-m", "npuinfer", "compare", str(tmp_path / "base"), str(tmp_path / "now")])
    assert compared.returncode == 0 and "forward_first_token_time(ms)" in compared.stdout, compared.stderr
    _set_baseline_figures(path, 1e-6, 1e-6, 1e9)  # a baseline far faster: a regression every time
    failed = run(bench_cmd(srv.base_url, srv.served_name, srv.model_dir, tmp_path / "now", *args,
                           "--baseline", str(tmp_path / "base"), "--gate-retries", "1"))
    assert failed.returncode == 1, failed.stdout[-3000:]
    assert "REGRESSED" in failed.stdout and "0 case(s) within the limit, 1 regressed" in failed.stdout
    (r,) = rows(tmp_path / "now", srv.served_name)
    assert r["gate_retries"] == "1" and len(json.loads(r["gate_attempts"])) == 2  # measured, then once again


def test_the_largest_concurrency_within_the_limits(served_vllm, tmp_path):
    srv = served_vllm
    base = ("--case-pairs", "16x8", "--num-prompts", "4")
    roomy = run(bench_cmd(srv.base_url, srv.served_name, srv.model_dir, tmp_path, *base, "--max-ttft", "60s",
                          "--max-tpot", "10s", "--request-rates", "2", suite="bench/test_max_batch.py"))
    assert roomy.returncode == 0, roomy.stdout[-3000:]
    with open(tmp_path / f"max_load_{srv.served_name}_openai.csv", newline="") as f:
        by_load = {r["load"]: r for r in csv.DictReader(f)}
    concurrency, rate = by_load["concurrency"], by_load["request_rate"]
    assert concurrency["largest_within"] == "4" and "every load up to c4" in concurrency["bound_by"]
    assert [t.split(":")[0] for t in concurrency["trials"].split("; ")] == ["c1", "c2", "c4"]
    assert rate["largest_within"] == "2" and [t.split(":")[0] for t in rate["trials"].split("; ")] == ["r1", "r2"]
    tight = run(bench_cmd(srv.base_url, srv.served_name, srv.model_dir, tmp_path, *base, "--max-ttft", "0.001ms",
                          suite="bench/test_max_batch.py"))
    assert tight.returncode == 1 and "even concurrency 1 is beyond the limits" in tight.stdout


def test_refused_and_timed_out_requests_are_counted_and_the_case_fails_with_the_first_error(served_vllm, tmp_path):
    srv = served_vllm
    too_long = run(bench_cmd(srv.base_url, srv.served_name, srv.model_dir, tmp_path / "long", "--case-pairs",
                             "3000x8", "--concurrency", "2", "--num-prompts", "4"))
    assert too_long.returncode == 1
    assert "4 of 4 requests failed; first: HTTP 400" in too_long.stdout, too_long.stdout[-3000:]
    (r,) = rows(tmp_path / "long", srv.served_name)
    assert (r["status"], r["failed_requests"]) == ("failed", "4") and "HTTP 400" in r["first_error"]
    slow = run(bench_cmd(srv.base_url, srv.served_name, srv.model_dir, tmp_path / "slow", "--case-pairs", "32x64",
                         "--concurrency", "2", "--num-prompts", "4", "--request-timeout", "0.001"))
    assert slow.returncode == 1 and "no answer within the request timeout" in slow.stdout, slow.stdout[-3000:]


def test_bad_endpoints_are_one_usage_error_before_any_case(served_vllm, tmp_path):
    srv = served_vllm
    nothing = run(bench_cmd(f"http://127.0.0.1:{free_port()}/v1", "x", srv.model_dir, tmp_path))
    assert nothing.returncode == 4 and "no server answers there" in nothing.stderr
    other = run(bench_cmd(srv.base_url, "not-this-one", srv.model_dir, tmp_path))
    assert other.returncode == 4 and f"it serves {srv.served_name}" in other.stderr
    assert not list(tmp_path.glob("performance_*"))


class Forwarder:
    """Bytes from a local port to the real server and back (no HTTP of its own): stopping it is the server dying."""

    def __init__(self, port: int):
        self.target_port, self.port = port, free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def handle(client_r, client_w):
            try:
                server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
                await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:  # stopped while connecting upstream: the client must still see its connection end
                client_w.close()

        async def main():
            self.server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            self.ready.set()
            await self.server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    def stop(self) -> None:
        def close():
            self.server.close()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()

        self.loop.call_soon_threadsafe(close)
        self.thread.join(10)


def _wait_for_rows(results: Path, served: str, n: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        path = results / f"performance_{served}_openai.csv"
        if path.is_file() and len(rows(results, served)) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} row(s) in {results} (exit {proc.poll()})")


def test_a_server_that_dies_mid_sweep_fails_the_remaining_cases_at_once(served_vllm, tmp_path):
    srv = served_vllm
    proxy = Forwarder(int(srv.base_url.split(":")[2].split("/")[0]))
    url = f"http://127.0.0.1:{proxy.port}/v1"
    proc = subprocess.Popen(bench_cmd(url, srv.served_name, srv.model_dir, tmp_path, "--case-pairs", "32x16",
                                      "--concurrency", "1,2,3,4", "--num-prompts", "6"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_rows(tmp_path, srv.served_name, 1, proc)
    finally:
        proxy.stop()
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, out[-3000:]
    assert out.count("stopped answering") >= 2 and "3 failed" in out or "2 failed" in out, out[-3000:]
    assert all(r["status"] in ("ok", "failed") for r in rows(tmp_path, srv.served_name))


def test_ctrl_c_leaves_only_complete_rows(served_vllm, tmp_path):
    srv = served_vllm
    # the second case streams 24 x 128 tokens two at a time: seconds, so the signal lands inside it (at 32 tokens
    # a quiet machine finished it within the half second)
    proc = subprocess.Popen(bench_cmd(srv.base_url, srv.served_name, srv.model_dir, tmp_path, "--case-pairs",
                                      "32x128", "--concurrency", "1,2", "--num-prompts", "24"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_rows(tmp_path, srv.served_name, 1, proc)
    time.sleep(1.5)  # inside the second case's streaming (its prompts made, its warm-up done)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "KeyboardInterrupt" in out, out[-2000:]
    got = rows(tmp_path, srv.served_name)
    assert len(got) == 1 and got[0]["completed"] == "24" and got[0]["status"] == "ok"
