"""The static-shape decode step (`forward_slot`) and its compiled form give the same logits and tokens as
the ordinary cached forward: for every family on a left-padded batch, and through the real build (on cpu an
AOTInductor library, exported with the window as a dynamic dimension and the KV cache as its inputs)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from npuinfer.decode_graph import compile_decode
from npuinfer.generate import generate, seq_state
from npuinfer.model import LAST_POSITION, DecodeSlot

from conftest import TINY_NAMES
from test_bench_suite import rows_of, run_bench

PROMPTS = ["苹果公司的CEO是", "The capital of France is a city", "Hello"]  # different lengths: left padding


def _decode_logits(model, ids, mask, steps: int, mode: str, total: int | None = None) -> list[torch.Tensor]:
    """Prefill, then ``steps`` greedy steps through the cached forward ("cached"), the static step
    ("slot") or the model's compiled step ("compiled")."""
    batch, prompt_len = ids.shape
    total = total or prompt_len + steps + 1
    model.setup_caches(batch, total)
    state = seq_state(mask, total)
    positions = torch.arange(total)
    compiled = model.compiled_decode.prepare(model, batch, total, state) if mode == "compiled" else None
    logits = [model(ids, 0, state, logits_at=LAST_POSITION)[:, -1]]
    for step in range(steps):
        token = logits[-1].argmax(-1).view(batch, 1)
        pos = prompt_len + step
        if mode == "slot":
            logits.append(model.forward_slot(token, DecodeSlot(positions[pos:pos + 1], total), state))
        elif mode == "compiled":
            chosen, step_logits = compiled(token, pos)
            assert torch.equal(chosen, step_logits.argmax(-1))  # the greedy choice made inside the step
            logits.append(step_logits)
        else:
            logits.append(model(token, pos, state)[:, -1])
    return logits


def _written_cache(model, upto: int) -> list[torch.Tensor]:
    return [t[:, :, :upto].clone() for layer in model.layers for t in (layer.attention.kv_cache.k,
                                                                        layer.attention.kv_cache.v)]


@pytest.mark.parametrize("name", TINY_NAMES)
def test_static_decode_step_equals_the_cached_forward(load_tiny, name):
    loaded = load_tiny(name)
    ids, mask = loaded.tokenizer.encode_batch(PROMPTS)
    assert not bool(mask.bool().all())  # the batch really is padded
    with torch.inference_mode():
        ref = _decode_logits(loaded.model, ids, mask, 5, "cached")
        got = _decode_logits(loaded.model, ids, mask, 5, "slot")
    for step, (a, b) in enumerate(zip(ref, got)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"{name} step {step}: {(a - b).abs().max():.3e}"


# A build takes half a minute on 2 cores: the other-shape part (one more build, a RoPE model unpadded) runs
# once; what it checks (the cache a step reads, libraries kept per shape) does not depend on the family.
@pytest.mark.e2e
@pytest.mark.parametrize("name,padded,other_shape", [("qwen-tiny", True, True), ("baichuan2-13b-tiny", False, False),
                                                    ("qwen3-tiny", True, False)])  # grouped-query, q/k norms
def test_compiled_decode_generates_what_eager_does(tiny_dir, name, padded, other_shape):
    """The compiled step (built for real, on cpu an AOTInductor library): RoPE on a padded batch, ALiBi
    unpadded. It reads the cache the eager prefill wrote and writes what the eager step writes."""
    from npuinfer.runtime import load_model

    loaded = load_model(model_path=tiny_dir(name), device="cpu", dtype="fp32")
    model = loaded.model
    ids, mask = loaded.tokenizer.encode_batch(PROMPTS if padded else PROMPTS[:1])
    prompt_len = ids.shape[1]
    total = prompt_len + 12  # what generate(..., 12) sets up: the compiled shape both use
    with torch.inference_mode():
        eager_logits = _decode_logits(model, ids, mask, 4, "cached", total=total)
        eager_cache = _written_cache(model, prompt_len + 4)
        eager_tokens = generate(model, ids, 12, mask)
        eager_short = generate(model, ids, 5, mask)
    compile_decode(model, loaded.device)
    with torch.inference_mode():
        generate(model, ids, 1, mask)  # no decode step: nothing is built
        assert model.compiled_decode.builds == 0
        compiled_logits = _decode_logits(model, ids, mask, 4, "compiled", total=total)
        compiled_cache = _written_cache(model, prompt_len + 4)
        compiled_tokens = generate(model, ids, 12, mask)
        compiled_short = generate(model, ids, 5, mask)  # another run length, same cache: the same build
    for step, (a, b) in enumerate(zip(eager_logits, compiled_logits)):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), f"step {step}: {(a - b).abs().max():.3e}"
    for a, b in zip(eager_cache, compiled_cache):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"KV cache: {(a - b).abs().max():.3e}"
    assert torch.equal(eager_tokens, compiled_tokens) and torch.equal(eager_short, compiled_short)
    assert model.compiled_decode.builds == 1  # one library for every position and run length of the shape
    if not other_shape:
        return
    # Another shape reallocates the KV cache; coming back to the first shape allocates new cache tensors
    # again, which the step built for that shape must write and read, not the old ones.
    other = ids[:1, -3:]
    first_cache = weakref.ref(model.layers[0].attention.kv_cache.k)
    with torch.inference_mode():
        other_compiled = generate(model, other, 20)
        gc.collect()
        assert first_cache() is None  # no compiled step keeps a replaced cache alive
        again = generate(model, ids, 12, mask)
        assert model.compiled_decode.builds == 2  # the other shape's; the first shape's library is reused
        model.compiled_decode = None
        other_eager = generate(model, other, 20)
    assert torch.equal(other_compiled, other_eager)
    assert torch.equal(again, eager_tokens)


@pytest.mark.e2e
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
