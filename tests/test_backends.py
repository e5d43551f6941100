"""The backend interface: both suites run through it, and the backends agree.

`pytest accuracy/ --backend hf` (transformers' model classes on the same weights, scored the plain lm-eval way)
predicts what `--backend npuinfer` (prefix reuse, gathered head) predicts on every question, in real suite runs;
unknown backends and backend plugins go through the one table.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from npuinfer.backends import BUILTIN, BackendSource, backend_names, make_backend
from npuinfer.backends.base import Backend, BackendUnsupported, LoglikelihoodRequest
from npuinfer.backends.openai import api_fit
from npuinfer.ceval.synth import write_synthetic_ceval
from npuinfer.device import get_device
from npuinfer.options import RunConfig

from accuracy_runs import predictions, run_accuracy

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ["law", "logic", "college_physics", "high_school_chemistry", "computer_network"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_ceval(tmp_path_factory.mktemp("ceval"), subjects=SUBJECTS, val_per_subject=9, seed=11)


@pytest.mark.parametrize("model", ["qwen-tiny", "gpt-neox-tiny"])
def test_accuracy_suite_through_hf_predicts_what_npuinfer_predicts(model, data, tmp_path, npuinfer_cache):
    runs = {}
    for backend in ("npuinfer", "hf"):
        results = tmp_path / backend
        proc = run_accuracy(results, data, "--model", model, "--backend", backend)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"{len(SUBJECTS)} passed" in proc.stdout
        runs[backend] = predictions(results)
    assert len(runs["npuinfer"]) == 9 * len(SUBJECTS)
    assert runs["hf"] == runs["npuinfer"]
    meta = json.loads((next((tmp_path / "hf").glob("ceval_*")) / "cache_meta.json").read_text(encoding="utf-8"))
    assert meta["extra"]["backend"] == "hf"  # an hf cache is never mixed with npuinfer's rows


def test_loglikelihoods_of_hf_and_npuinfer_agree_on_the_same_weights(load_tiny):
    """The two implementations of lm-eval's computation, truncation included, on one set of requests."""
    loaded = load_tiny("internlm-tiny")
    source = BackendSource(RunConfig(model="internlm-tiny", device="cpu", dtype="fp32"), get_device("cpu"),
                           lambda: loaded)
    npu, hf = make_backend("npuinfer", source), make_backend("hf", source)
    assert isinstance(npu, Backend) and isinstance(hf, Backend)
    shared = list(range(30, 90))
    requests = [LoglikelihoodRequest(tuple(shared + [100 + i, 7]), (5 + i % 3, 9)) for i in range(6)]
    requests.append(LoglikelihoodRequest(tuple(range(20, 220)), (3,)))  # cut to max_length below
    got = {name: dict(b.loglikelihood(requests, max_length=120, batch_size=4)) for name, b in
           (("npuinfer", npu), ("hf", hf))}
    for i in range(len(requests)):
        assert abs(got["npuinfer"][i].logprob - got["hf"][i].logprob) < 1e-4, i
        assert got["npuinfer"][i].is_greedy == got["hf"][i].is_greedy
    assert npu.identity().backend == "npuinfer" and hf.identity().backend == "hf"
    assert npu.identity().model == hf.identity().model == "internlm-tiny"


def test_unknown_backend_is_a_usage_error_naming_the_known_ones(tmp_path, data):
    proc = run_accuracy(tmp_path, data, "--model", "qwen-tiny", "--backend", "nosuch")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "--backend nosuch: unknown backend; known: npuinfer, hf, openai" in proc.stderr
    with pytest.raises(BackendUnsupported, match="unknown backend"):
        make_backend("nosuch", BackendSource(RunConfig(), get_device("cpu"), lambda: None))


def test_the_table_holds_the_builtins_first():
    assert list(BUILTIN) == ["npuinfer", "hf", "openai"] and backend_names()[:3] == ["npuinfer", "hf", "openai"]


def test_api_fit_is_lm_evals_left_truncation():
    assert api_fit([1, 2, 3], [4, 5], 10) == ([1, 2, 3, 4, 5], 3)
    assert api_fit(list(range(10)), [20, 21], 8) == ([5, 6, 7, 8, 9, 20, 21], 5)  # L - 1 = 7 tokens kept


def test_an_unreachable_server_is_one_usage_error(data, tmp_path, tiny_dir):
    proc = run_accuracy(tmp_path, data, "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
                        "--served-model", "x", "--tokenizer", str(tiny_dir("gpt-neox-tiny")))
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "--base-url http://127.0.0.1:9/v1: no server answers there" in proc.stderr


def test_what_a_backend_cannot_run_is_said_before_any_case(data, tmp_path, npuinfer_cache):
    """hf has no ALiBi model: naming baichuan2-13b-tiny is one usage error before anything is measured; in a
    sweep over the tiny models its cases are skipped at collection with the reason, the others run."""
    named = run_accuracy(tmp_path / "named", data, "--backend", "hf", "--model", "baichuan2-13b-tiny")
    assert named.returncode == 4, named.stdout[-2000:] + named.stderr[-2000:]
    assert "--backend hf --model baichuan2-13b-tiny:" in named.stderr and "ALiBi" in named.stderr
    assert not (tmp_path / "named").exists() or not any((tmp_path / "named").glob("ceval_*"))
    cmd = [sys.executable, "-m", "pytest", "bench/test_performance.py", "-p", "no:cacheprovider", "-q", "-rs",
           "--backend", "hf", "--batch-sizes", "1", "--case-pairs", "8x2", "--rounds", "1", "--warmup", "0",
           "--results-dir", str(tmp_path / "sweep"), "-k", "baichuan2-13b or (qwen and not qwen2 and not qwen3)"]
    sweep = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-2000:]
    assert "1 passed, 1 skipped" in sweep.stdout and "--backend hf: " in sweep.stdout and "ALiBi" in sweep.stdout
