"""The kernel table: fused = plain for every family on cpu (prefill, decode, padded batches, a shared prefix),
and a wrong fused kernel registered through the table's real plugin path is caught by the self-check, by
`npuinfer infer` and `npuinfer doctor` alike. (tp 2: tests/test_parallel.py runs both kernel sets per rank.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from npuinfer.generate import generate, seq_state
from npuinfer.kernels import PLUGIN_ENV, KernelCheckError, KernelShapes, check_kernels, select_kernels

REPO = Path(__file__).resolve().parents[1]
TINY = ["qwen-tiny", "baichuan2-7b-tiny", "baichuan2-13b-tiny", "internlm-tiny", "gpt-neox-tiny",
        "qwen2-tiny", "llama3-tiny", "qwen3-tiny"]
PROMPT, STEPS, NEW = 7, 3, 6


@torch.inference_mode()
def run_scenario(model) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (3, PROMPT), generator=gen)
    mask = torch.ones(3, PROMPT, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    out: dict = {}
    for name, m in (("padded", mask), ("unpadded", None)):
        total = PROMPT + STEPS + 1
        model.setup_caches(3, total)
        state = seq_state(m, total) if m is not None else None
        logits = [model(ids, 0, state)]
        for step in range(STEPS):
            logits.append(model(logits[-1][:, -1].argmax(-1, keepdim=True), PROMPT + step, state))
        out[f"{name} logits"] = [t.clone() for t in logits]
    out["padded tokens"] = generate(model, ids, NEW, mask)
    out["tokens"] = generate(model, ids[:1], NEW)
    # rows continuing a shared prefix: split attention (fused, cpu flash) vs concatenated (plain)
    kv = model.prefix_kv(ids[:1, :4])
    out["prefix logits"] = model(ids[:, 4:], 4, prefix=kv).clone()
    return out


@pytest.mark.parametrize("name", TINY)
def test_fused_equals_plain(name, load_tiny):
    loaded = load_tiny(name)
    model, fused = loaded.model, loaded.kernels
    assert fused.label == "fused" and fused.is_fused("prefill_attention") and fused.checks
    try:
        with_fused = run_scenario(model)
        model.use_kernels(select_kernels("cpu", "plain"))
        assert all(layer.attention.eager for layer in model.layers)  # plain attention materialises scores
        with_plain = run_scenario(model)
    finally:
        model.use_kernels(fused)
    assert not any(layer.attention.eager for layer in model.layers)
    for key, got in with_fused.items():
        want = with_plain[key]
        if "tokens" in key:
            assert torch.equal(got, want), key
        else:
            for step, (a, b) in enumerate(zip(got if isinstance(got, list) else [got],
                                              want if isinstance(want, list) else [want])):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m: f"{key} step {step}: {m}")


def test_check_reports_kernel_shapes_dtype_and_differences():
    shapes = KernelShapes(dim=64, heads=4, head_dim=16, rot_dim=8, intermediate=96, alibi=True)
    kernels = check_kernels(select_kernels("cpu"), shapes, "cpu", torch.float32)
    cases = {(c.op, c.case) for c in kernels.checks}
    assert ("decode_attention", "alibi, left-padded") in cases and ("prefill_attention", "causal") in cases
    assert all(c.ok and c.max_abs < 1e-5 for c in kernels.checks)
    # a kernel that is wrong only where queries are fewer than keys: SDPA's own is_causal (top-left diagonal)
    from npuinfer.kernels.table import Kernel

    top_left = Kernel("prefill_attention", "sdpa is_causal", lambda q, k, v, mask, causal:
                      torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal),
                      True, "tests")
    wrong = select_kernels("cpu")
    wrong = type(wrong)(wrong.mode, wrong.device_type, {**wrong.kernels, "prefill_attention": top_left})
    with pytest.raises(KernelCheckError) as err:
        check_kernels(wrong, shapes, "cpu", torch.float32)
    text = str(err.value)
    assert "prefill_attention (causal) = sdpa is_causal" in text and "[2, 4, 5, 16], [2, 4, 9, 16]" in text
    assert "float32" in text and "max abs diff" in text and "--kernels plain" in text


WRONG_PLUGIN = '''
import torch.nn.functional as F
from npuinfer.kernels import register


def rms_norm(x, weight, eps):  # off by 0.1%: the kind of error a wrong epsilon or cast gives
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype) * 1.001


register("rms_norm", "cpu", "wrong rms_norm", rms_norm)
'''


def npuinfer_cli(*args: str, plugin_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if plugin_dir is not None:
        env[PLUGIN_ENV] = "wrong_kernels"
        env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "npuinfer", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin")
    (path / "wrong_kernels.py").write_text(WRONG_PLUGIN)
    return path


def test_wrong_registered_kernel_stops_infer_and_plain_still_runs(plugin_dir, tiny_dir):
    tiny_dir("qwen-tiny")
    proc = npuinfer_cli("infer", "--model", "qwen-tiny", "--device", "cpu", "--max-new-tokens", "2", "hello",
                        plugin_dir=plugin_dir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr
    assert "fused kernel check failed on cpu (float32)" in err
    assert "rms_norm (tokens) = wrong rms_norm (wrong_kernels), shapes [2, 5, 64], [64], float32" in err
    assert "max abs diff" in err and "--kernels plain" in err
    proc = npuinfer_cli("infer", "--model", "qwen-tiny", "--device", "cpu", "--max-new-tokens", "2", "hello",
                        "--kernels", "plain", plugin_dir=plugin_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hello")


def test_doctor_passes_and_fails_on_a_wrong_registered_kernel(plugin_dir, tiny_dir):
    tiny_dir("baichuan2-13b-tiny")  # ALiBi: the bias cases are checked too
    proc = npuinfer_cli("doctor", "--device", "cpu", "--model", "baichuan2-13b-tiny", "--repeats", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "  collective backend: gloo" in proc.stdout
    for line in ("rms_norm           F.rms_norm", "decode_attention   sdpa", "ok abs", "rope  "):
        assert line in proc.stdout, line
    # prefill: causal, left-padded, alibi; decode: unmasked, left-padded, alibi, and both over a cache slice
    prefill = next(line for line in proc.stdout.splitlines() if line.strip().startswith("prefill_attention"))
    decode = next(line for line in proc.stdout.splitlines() if line.strip().startswith("decode_attention"))
    assert "(3 cases)" in prefill and "(5 cases)" in decode
    proc = npuinfer_cli("doctor", "--device", "cpu", "--model", "baichuan2-13b-tiny", "--repeats", "2",
                        plugin_dir=plugin_dir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "rms_norm           wrong rms_norm (wrong_kernels)" in proc.stdout and "FAILED" in proc.stdout
    assert "--kernels plain" in proc.stderr and "float32" in proc.stderr


def run_pytest(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bench_rows_record_the_kernels(tmp_path, tiny_dir):
    import csv

    tiny_dir("qwen-tiny")
    common = ["bench/test_performance.py", "--model", "qwen-tiny", "--device", "cpu", "--batch-sizes", "2",
              "--case-pairs", "8x2", "--rounds", "1", "--warmup", "0", "--results-dir", str(tmp_path)]
    for kernels in ("fused", "plain"):
        proc = run_pytest(*common, "--kernels", kernels)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(tmp_path / "performance_qwen-tiny_cpu.csv", newline="") as fh:
        rows = {r["backend"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"npuinfer", "npuinfer+plain"}  # a plain row never replaces a fused one
    assert rows["npuinfer+plain"]["kernels"] == "plain"
    assert rows["npuinfer"]["kernels"].startswith("fused (check ok: ")


def test_accuracy_plain_equals_fused_and_cache_meta_records_the_kernels(tmp_path, tiny_dir):
    import json

    from npuinfer.ceval.synth import write_synthetic_ceval

    tiny_dir("qwen-tiny")
    data = write_synthetic_ceval(tmp_path / "ceval", subjects=["law"], val_per_subject=6, test_per_subject=1)
    runs = {}
    for kernels in ("fused", "plain"):
        results = tmp_path / kernels
        proc = run_pytest("accuracy", "--model", "qwen-tiny", "--device", "cpu", "--ceval-dir", str(data),
                          "--results-dir", str(results), "--kernels", kernels)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs[kernels] = results / "ceval_qwen-tiny_cpu"
    from accuracy_runs import assert_same_rows

    assert_same_rows(runs["fused"] / "cache.csv", runs["plain"] / "cache.csv")  # log-likelihoods to 1e-4
    fused_meta = json.loads((runs["fused"] / "cache_meta.json").read_text())
    plain_meta = json.loads((runs["plain"] / "cache_meta.json").read_text())
    assert "kernels" not in fused_meta["extra"] and plain_meta["extra"]["kernels"] == "plain"
    assert fused_meta["provenance"]["kernel_check"].startswith("ok: ")
    assert fused_meta["provenance"]["kernels"]["prefill_attention"] == "sdpa"
    assert plain_meta["provenance"]["kernel_check"] == "not needed (plain)"
    # plain rows are never added to a fused run's cache
    proc = run_pytest("accuracy", "--model", "qwen-tiny", "--device", "cpu", "--ceval-dir", str(data),
                      "--results-dir", str(tmp_path / "fused"), "--kernels", "plain")
    assert proc.returncode != 0 and "extra.kernels: None in the cache, 'plain' now" in proc.stdout + proc.stderr
