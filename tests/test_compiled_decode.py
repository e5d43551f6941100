"""The static-shape decode step (`forward_slot`) and its compiled form give the same logits and tokens as
the ordinary cached forward: for every family on a left-padded batch, and through torch.compile for real."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from npuinfer.generate import compile_decode, generate, seq_state
from npuinfer.model import DecodeSlot

from conftest import TINY_NAMES
from test_bench_suite import rows_of, run_bench

PROMPTS = ["苹果公司的CEO是", "The capital of France is a city", "Hello"]  # different lengths: left padding


def _decode_logits(model, ids, mask, steps: int, slot: bool, step_fn=None, total: int | None = None
                   ) -> list[torch.Tensor]:
    batch, prompt_len = ids.shape
    total = total or prompt_len + steps + 1
    model.setup_caches(batch, total)
    state = seq_state(mask, total)
    positions = torch.arange(total)
    logits = [model(ids, 0, state, last_only=True)[:, -1]]
    for step in range(steps):
        token = logits[-1].argmax(-1).view(batch, 1)
        pos = prompt_len + step
        if slot:
            logits.append((step_fn or model.forward_slot)(token, DecodeSlot(positions[pos:pos + 1], total), state))
        else:
            logits.append(model(token, pos, state)[:, -1])
    return logits


@pytest.mark.parametrize("name", TINY_NAMES)
def test_static_decode_step_equals_the_cached_forward(load_tiny, name):
    loaded = load_tiny(name)
    ids, mask = loaded.tokenizer.encode_batch(PROMPTS)
    assert not bool(mask.bool().all())  # the batch really is padded
    with torch.inference_mode():
        ref = _decode_logits(loaded.model, ids, mask, 5, slot=False)
        got = _decode_logits(loaded.model, ids, mask, 5, slot=True)
    for step, (a, b) in enumerate(zip(ref, got)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"{name} step {step}: {(a - b).abs().max():.3e}"


@pytest.mark.parametrize("name,padded", [("qwen-tiny", True), ("baichuan2-13b-tiny", False)])
def test_compiled_decode_generates_what_eager_does(tiny_dir, name, padded):
    """torch.compile (inductor, C++ wrapper on cpu) of the decode step: RoPE on a padded batch, ALiBi unpadded."""
    from npuinfer.runtime import load_model

    loaded = load_model(model_path=tiny_dir(name), device="cpu", dtype="fp32")
    model = loaded.model
    ids, mask = loaded.tokenizer.encode_batch(PROMPTS if padded else PROMPTS[:1])
    total = ids.shape[1] + 12  # what generate(..., 12) attends over: one compiled shape for both
    with torch.inference_mode():
        eager_logits = _decode_logits(model, ids, mask, 4, slot=False, total=total)
        eager_tokens = generate(model, ids, 12, mask)
    compile_decode(model, loaded.device)
    with torch.inference_mode():
        compiled_logits = _decode_logits(model, ids, mask, 4, slot=True, step_fn=model.compiled_decode, total=total)
        compiled_tokens = generate(model, ids, 12, mask)
    for step, (a, b) in enumerate(zip(eager_logits, compiled_logits)):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), f"step {step}: {(a - b).abs().max():.3e}"
    assert torch.equal(eager_tokens, compiled_tokens)
    # Another shape reallocates the KV cache (and recompiles); coming back to the first shape allocates new
    # cache tensors again, which the graph compiled for that shape must write and read, not the old ones.
    other = ids[:1, -3:]
    first_cache = weakref.ref(model.layers[0].attention.kv_cache.k)
    with torch.inference_mode():
        other_compiled = generate(model, other, 20)
        gc.collect()
        assert first_cache() is None  # the graphs built for the replaced cache let it go
        again = generate(model, ids, 12, mask)
        model.compiled_decode = None
        other_eager = generate(model, other, 20)
    assert torch.equal(other_compiled, other_eager)
    assert torch.equal(again, eager_tokens)


def test_bench_compile_option_runs_compiled_and_says_so(tmp_path, npuinfer_cache):
    proc = run_bench("bench/test_performance.py", "--model", "internlm-tiny", "--batch-sizes", "2",
                     "--case-pairs", "16x8", "--compile", results=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, rows = rows_of(tmp_path / "performance_internlm-tiny_cpu.csv")
    assert [r["backend"] for r in rows] == ["npuinfer+compile"]
    assert float(rows[0]["forward_next_token_time(ms)"]) > 0


def test_compile_with_the_transformers_backend_is_a_usage_error(tmp_path):
    proc = run_bench("bench/test_performance.py", "--backend", "hf", "--compile", "--co", results=tmp_path)
    assert proc.returncode != 0
    assert "--compile" in proc.stderr + proc.stdout and "--backend hf" in proc.stderr + proc.stdout
