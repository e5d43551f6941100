"""--dummy-weights: real shapes, seeded random weights made on the device, refused before allocating when
they cannot fit (npuinfer.memory's prediction)."""
from __future__ import annotations

import csv
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from npuinfer.dummy import DoesNotFit, predicted_load_bytes, registry_args
from npuinfer.memory import estimate, format_size, parse_size
from npuinfer.registry import MODELS
from npuinfer.runtime import load_model

REPO = Path(__file__).resolve().parents[1]
REAL = [name for name, spec in MODELS.items() if not spec.tiny]
# Published parameter counts (embedding and head untied), to 2 decimals of a billion.
PUBLISHED_PARAMS = {"qwen-7b": 7.72, "qwen-14b": 14.17, "baichuan2-7b": 7.51, "baichuan2-13b": 13.90,
                    "internlm-7b": 7.32, "gpt-neox-20b": 20.55,
                    # model cards: 7.61B, 14.7B, 8.03B (Llama 3.1: 8,030,261,248), 8.2B, rounded down there
                    "qwen2.5-7b-instruct": 7.62, "qwen2.5-14b-instruct": 14.77, "llama-3.1-8b-instruct": 8.03,
                    "qwen3-8b": 8.19}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@pytest.mark.parametrize("name", REAL)
def test_every_real_model_is_refused_by_the_prediction_before_allocating(name, npuinfer_cache):
    args = registry_args(MODELS[name])
    assert round(args.num_parameters() / 1e9, 2) == PUBLISHED_PARAMS[name]
    need = predicted_load_bytes(args, torch.bfloat16)
    assert need == estimate(args, 0, 1, 0, 2).total and need > 14 * 10**9
    before = _peak_rss()
    with pytest.raises(DoesNotFit) as err:
        load_model(name, device="cpu", dtype="bf16", dummy_weights=True, memory_limit=parse_size("256MiB"))
    message = str(err.value)
    assert name in message and format_size(need) in message and "--memory-limit 256MiB" in message
    assert "nothing was allocated" in message
    # the weights were never made: the process's peak resident memory did not grow by a fraction of them
    assert _peak_rss() - before < 256 * 2**20


def test_a_tiny_model_with_dummy_weights_runs_seeded_on_its_own_shapes(npuinfer_cache):
    a = load_model("qwen-tiny", device="cpu", dtype="fp32", dummy_weights=True, dummy_seed=3)
    b = load_model("qwen-tiny", device="cpu", dtype="fp32", dummy_weights=True, dummy_seed=3)
    real = load_model("qwen-tiny", device="cpu", dtype="fp32")
    assert a.weights == "dummy(seed 3)" and real.weights == "checkpoint"
    assert a.args == real.args and a.checkpoint_id != real.checkpoint_id and a.checkpoint_id.startswith("dummy-s3-")
    for (name, pa), pb, pr in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                                  real.model.state_dict().values()):
        assert pa.shape == pr.shape and pa.dtype == torch.float32, name
        assert torch.equal(pa, pb) and not torch.equal(pa, pr), name
    ids = torch.tensor([[5, 6, 7, 8]])
    a.model.setup_caches(1, 8)
    with torch.inference_mode():
        logits = a.model(ids, 0)
    assert torch.isfinite(logits).all()


def test_infer_and_bench_say_the_weights_were_dummy(tmp_path, npuinfer_cache):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    res = subprocess.run([sys.executable, "-m", "npuinfer", "infer", "--model", "internlm-tiny", "--dummy-weights",
                          "--max-new-tokens", "4", "hello"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    timing = res.stderr.strip().splitlines()[-6:]
    assert res.stdout.startswith("hello") and timing[0].startswith("timing (internlm-tiny on cpu")
    assert timing[5].startswith("  weights:     dummy at real size (seeded random, seed 0")
    assert timing[4].startswith("  MBU:") and "GB/s measured (probe: " in timing[4]
    res = subprocess.run([sys.executable, "-m", "npuinfer", "infer", "--model", "gpt-neox-20b", "--dummy-weights",
                          "--memory-limit", "1GiB", "hi"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1 and "more than --memory-limit 1GiB" in res.stderr and "Traceback" not in res.stderr
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "bench/test_performance.py",
                           "--model", "qwen-tiny", "--model", "qwen-7b", "--dummy-weights", "--memory-limit", "2GiB",
                           "--batch-sizes", "1", "--case-pairs", "8x4", "--rounds", "1", "--results-dir",
                           str(results)], cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:]  # qwen-7b's case fails with the refusal
    assert "qwen-7b" in proc.stdout and "more than --memory-limit 2GiB" in proc.stdout
    with open(results / "performance_qwen-tiny_cpu.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["weights"] == "dummy(seed 0)" and rows[0]["checkpoint"].startswith("dummy-s0-")
    assert not (results / "performance_qwen-7b_cpu.csv").exists()


def test_backend_hf_runs_on_the_same_dummy_tensors(npuinfer_cache):
    from npuinfer.backends.hf_model import HFBackend
    from npuinfer.backends.npuinfer import NpuinferBackend

    loaded = load_model("internlm-tiny", device="cpu", dtype="fp32", dummy_weights=True, dummy_seed=1)
    hf = HFBackend.sharing(loaded)
    ours = {t.untyped_storage().data_ptr() for t in loaded.model.state_dict().values()}
    # views of npuinfer's tensors (q, k, v are row blocks of the fused wqkv), no copy
    assert all(p.untyped_storage().data_ptr() in ours for p in hf.model.parameters())
    assert hf.weights == "dummy(seed 1)" and hf.checkpoint == loaded.checkpoint_id
    ids = torch.randint(0, loaded.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    assert torch.equal(hf.generate(ids, mask, 5), NpuinferBackend(loaded).generate(ids, mask, 5))


def test_bench_refuses_each_dummy_case_whose_prediction_exceeds_the_memory_limit(tmp_path, npuinfer_cache):
    """qwen-tiny with dummy fp32 weights under --memory-limit 2MiB: its weights (1.47 MiB predicted) load; batch 1
    x 16+8 (1.55 MiB) runs; batch 16 x 16+8 (2.69 MiB: its KV cache and activations) is skipped before it
    allocates, with a does_not_fit row naming the prediction and the option."""
    args = registry_args(MODELS["qwen-tiny"])
    limit = parse_size("2MiB")
    assert predicted_load_bytes(args, torch.float32) < estimate(args, 1, 16, 8, 4).total <= limit \
        < estimate(args, 16, 16, 8, 4).total
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
                           "bench/test_performance.py", "--model", "qwen-tiny", "--dummy-weights", "--memory-limit",
                           "2MiB", "--batch-sizes", "1,16", "--case-pairs", "16x8", "--rounds", "1", "--warmup", "0",
                           "--results-dir", str(results)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 passed, 1 skipped" in proc.stdout, proc.stdout[-3000:]
    need = format_size(estimate(args, 16, 16, 8, 4).total)
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1 and "qwen-tiny-bs16-in16-out8" in skipped[0]
    assert f"needs about {need}" in skipped[0] and "more than --memory-limit 2MiB" in skipped[0]
    with open(results / "performance_qwen-tiny_cpu.csv", newline="") as fh:
        rows = {int(r["batch_size"]): r for r in csv.DictReader(fh)}
    assert rows[1]["status"] == "ok" and float(rows[1]["ResponseTime(s)"]) > 0
    assert rows[16]["status"] == "does_not_fit" and f"needs about {need}" in rows[16]["reason"]
    assert rows[16]["ResponseTime(s)"] == ""  # never run


def test_a_case_beyond_the_free_memory_is_refused_without_a_limit():
    """No --memory-limit: the case's KV cache and activations are compared with the memory free now, to which the
    cache the previous case holds (replaced by this one) is added."""
    from npuinfer.device import get_device
    from npuinfer.dummy import check_case_fits

    cpu, args = get_device("cpu"), registry_args(MODELS["qwen-7b"])
    free = cpu.free_memory_bytes()
    assert free is not None and free > 0
    check_case_fits(args, torch.bfloat16, cpu, None, 1, 16, 8, 0, "qwen-7b")  # 8 MiB of cache: fits
    big = estimate(args, 64, 2048, 2048, 2)  # 128 GiB of KV cache
    assert big.kv_cache > free
    with pytest.raises(DoesNotFit) as err:
        check_case_fits(args, torch.bfloat16, cpu, None, 64, 2048, 2048, 0, "qwen-7b")
    assert "free on cpu now" in str(err.value) and f"KV cache {format_size(big.kv_cache)}" in str(err.value)
    # the same case, when the previous one holds at least that much cache, replaces it: no refusal
    check_case_fits(args, torch.bfloat16, cpu, None, 64, 2048, 2048, big.kv_cache + big.activations, "qwen-7b")


def held_bytes(*modules) -> int:
    """Bytes of the distinct tensors a set of models holds (parameters and buffers): memory shared between them
    counts once; a oneDNN-prepacked weight (no storage to compare) counts as its own."""
    seen, total = set(), 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_mkldnn:
                total += t.numel() * t.element_size()
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


@pytest.mark.parametrize("name", ["qwen-tiny", "internlm-tiny", "gpt-neox-tiny"])
def test_backend_hf_over_prepacked_dummy_weights_holds_what_the_prediction_counts(name, npuinfer_cache):
    """bf16 on cpu: npuinfer's linears are oneDNN-prepacked. transformers used to get dense copies beside them,
    two copies of the weights (qwen-7b: 2 x 15 GB, OOM-killed on a 24 GiB machine) where the prediction that
    refuses a model before allocating counts one. Now both models hold one set of tensors, within the prediction."""
    from npuinfer.backends.hf_model import HFBackend, copied_bytes

    loaded = load_model(name, device="cpu", dtype="bf16", dummy_weights=True)
    assert loaded.model.packed_linears > 0  # the case of the issue: weights prepacked for npuinfer's linear
    predicted, copies = predicted_load_bytes(loaded.args, torch.bfloat16), copied_bytes(loaded.args, torch.bfloat16)
    ours = held_bytes(loaded.model)
    assert ours <= predicted
    hf = HFBackend.sharing(loaded)
    hf_buffers = sum(b.untyped_storage().nbytes() for b in hf.model.buffers())  # rotary tables: its own
    added = held_bytes(loaded.model, hf.model) - ours
    assert copies <= added <= copies + hf_buffers, (added, copies, hf_buffers)  # exactly the copies counted
    assert held_bytes(loaded.model, hf.model) <= predicted + copies
    assert copies == (0 if name != "gpt-neox-tiny" else 74880)  # GPT-NeoX's per-head q/k/v: 3 layers x (192 x 64 + 192) x 2 B


def test_bench_hf_over_dummy_weights_refuses_before_allocating_what_its_copies_do_not_fit(tmp_path, npuinfer_cache):
    """gpt-neox-tiny bf16: the weights (581.1 KiB predicted) fit --memory-limit 600KiB, the weights plus the per-head
    q/k/v copy transformers' GPT-NeoX needs (73.12 KiB) do not: refused before anything is built."""
    from npuinfer.backends.hf_model import copied_bytes

    args = registry_args(MODELS["gpt-neox-tiny"])
    need = predicted_load_bytes(args, torch.bfloat16)
    assert need < parse_size("600KiB") < need + copied_bytes(args, torch.bfloat16)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
                           "bench/test_performance.py", "--model", "gpt-neox-tiny", "--dummy-weights", "--backend", "hf",
                           "--dtype", "bf16", "--memory-limit", "600KiB", "--batch-sizes", "1", "--case-pairs", "8x2",
                           "--rounds", "1", "--warmup", "0", "--results-dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert (f"needs about {format_size(need + copied_bytes(args, torch.bfloat16))}: {format_size(need)} for its "
            "weights alone") in proc.stdout, proc.stdout[-3000:]
    assert "for transformers' re-laid copy of each layer's q/k/v, more than --memory-limit 600KiB" in proc.stdout
    assert "nothing was allocated" in proc.stdout
