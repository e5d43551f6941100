"""Grouped-query attention and the Llama / Qwen2 / Qwen3 families.

Checkpoints here are written by transformers itself (``save_pretrained`` of LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM with random weights, 4 query heads over 2 K/V heads), so npuinfer's reading of their names,
layouts and config fields is checked against the library that defines them: logits within the parity tolerance
of tests/test_hf_parity.py and identical greedy continuations, Llama-3 RoPE scaling and tied embeddings included.
Then config.json refusals, the K/V cache and tensor-parallel head split at n_kv_heads, and the roofline's KV
bytes at Qwen2.5-7B's dimensions computed by hand.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from npuinfer.checkpoint import CheckpointError, args_from_config
from npuinfer.generate import generate
from test_hf_parity import _randomize, assert_close, hf_generate, hf_steps, ours_steps, padded, prompt

HEADS, KV_HEADS = 4, 2
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# name -> (transformers class, config fields beyond the common ones, tiny model whose tokenizer files it gets)
ARCHS = {
    "llama3": ("Llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False), "llama3-tiny"),
    "llama3-tied": ("Llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True), "llama3-tiny"),
    "llama2-bias": ("Llama", dict(attention_bias=True, tie_word_embeddings=False), "llama3-tiny"),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True, use_sliding_window=False), "qwen2-tiny"),
    "qwen3": ("Qwen3", dict(head_dim=32, tie_word_embeddings=False), "qwen3-tiny"),  # heads wider than 64 / 4
}
FAMILY_OF = {"Llama": "llama", "Qwen2": "qwen2", "Qwen3": "qwen3"}


def save_hf_checkpoint(arch: str, out: Path, tiny_dir, kv_heads: int = KV_HEADS, seed: int = 7):
    """A random transformers model of ``arch`` written by its own save_pretrained, with the matching tiny
    model's tokenizer files beside it; returns the model (fp32, eval)."""
    import transformers

    cls_name, fields, tokenizer_of = ARCHS[arch]
    config = getattr(transformers, f"{cls_name}Config")(
        vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=kv_heads, intermediate_size=160, max_position_embeddings=256,
        attn_implementation="eager", **fields)
    model = getattr(transformers, f"{cls_name}ForCausalLM")(config)
    _randomize(model, seed)
    model.eval()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_dir(tokenizer_of) / name).is_file():
            shutil.copy(tiny_dir(tokenizer_of) / name, out / name)
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_pretrained_checkpoint_matches_transformers(arch, tiny_dir, tmp_path):
    from npuinfer.runtime import load_model

    out = tmp_path / arch
    theirs_model = save_hf_checkpoint(arch, out, tiny_dir)
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_key_value_heads"] == KV_HEADS < saved["num_attention_heads"] == HEADS
    if "tied" in arch or arch == "qwen2":
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in set(f.keys())  # the head is the embedding table

    loaded = load_model(model_path=out, device="cpu", dtype="fp32")
    args = loaded.args
    assert loaded.family.name == FAMILY_OF[ARCHS[arch][0]]
    assert (args.n_heads, args.n_kv_heads) == (HEADS, KV_HEADS)
    assert (args.rope_scaling is not None) == arch.startswith("llama3")
    assert args.qk_norm == (arch == "qwen3") and args.head_dim == (32 if arch == "qwen3" else 16)
    assert args.qkv_bias == (arch in ("qwen2", "llama2-bias")) and args.o_bias == (arch == "llama2-bias")
    # the cache holds the K/V heads, never expanded to the query heads
    loaded.model.setup_caches(1, 8)
    assert loaded.model.layers[0].attention.kv_cache.k.shape == (1, KV_HEADS, 8, args.head_dim)

    tokens, steps = prompt(11, 60, vocab=1000), prompt(5, 61, vocab=1000)
    ours, theirs = ours_steps(loaded.model, tokens, steps), hf_steps(theirs_model, tokens, steps)
    assert theirs[0].abs().max() > 0.05
    assert_close(ours[0], theirs[0], f"{arch} prefill")
    for i, (a, b) in enumerate(zip(ours[1:], theirs[1:])):
        assert_close(a, b, f"{arch} decode step {i + 1}")

    ids = torch.tensor([tokens])
    assert generate(loaded.model, ids, 10).tolist() == hf_generate(theirs_model, ids, torch.ones_like(ids), 10,
                                                                    0).tolist()
    batch, mask = padded([prompt(5, 62, vocab=1000), tokens, prompt(8, 63, vocab=1000)], pad=3)
    assert (mask == 0).any()
    assert generate(loaded.model, batch, 8, mask).tolist() == hf_generate(theirs_model, batch, mask, 8, 3).tolist()


def test_llama3_rope_scaling_changes_the_logits(tiny_dir, tmp_path):
    """The scaling is not a no-op at these sizes: the same weights without it give other logits."""
    from npuinfer.runtime import load_model

    out = tmp_path / "llama3"
    save_hf_checkpoint("llama3", out, tiny_dir)
    config = json.loads((out / "config.json").read_text())
    scaled = load_model(model_path=out, device="cpu", dtype="fp32")
    config.pop("rope_parameters", None)
    config.pop("rope_scaling", None)
    config["rope_theta"] = 500000.0
    (out / "config.json").write_text(json.dumps(config))
    plain = load_model(model_path=out, device="cpu", dtype="fp32")
    assert plain.args.rope_scaling is None and plain.args.rope_base == scaled.args.rope_base
    tokens = prompt(40, 64, vocab=1000)
    diff = (ours_steps(scaled.model, tokens, [])[0] - ours_steps(plain.model, tokens, [])[0]).abs().max()
    assert diff > 1e-3


# ------------------------------------------------------------------ config.json fields


def _qwen2_config(**changes) -> dict:
    config = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 160, "vocab_size": 1000, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "sliding_window": None,
              "use_sliding_window": False, "max_window_layers": 2}
    return {**config, **changes}


def test_published_null_fields_are_read():
    args = args_from_config(_qwen2_config(), "qwen2")
    assert (args.n_kv_heads, args.rope_scaling, args.qkv_bias, args.o_bias) == (2, None, True, False)
    assert args_from_config(_qwen2_config(sliding_window=131072), "qwen2").n_kv_heads == 2


@pytest.mark.parametrize("changes,needle", [
    ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window is true (sliding_window=4096)"),
    ({"sliding_window": "4096"}, 'sliding_window is "4096"; expected a positive integer'),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide num_attention_heads=4"),
    ({"num_key_value_heads": 0}, "num_key_value_heads is 0"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type is \"yarn\"; expected one of "
                                                            "default, llama3"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing field rope_scaling.low_freq_factor"),
    ({"rope_scaling": [8.0]}, "rope_scaling is [8.0]; expected a JSON object or null"),
])
def test_bad_fields_are_refused_by_name(changes, needle):
    with pytest.raises(CheckpointError) as err:
        args_from_config(_qwen2_config(**changes), "qwen2", path="/m/config.json")
    assert "/m/config.json" in str(err.value) and needle in str(err.value)


def test_transformers5_rope_parameters_and_legacy_rope_scaling_read_alike():
    legacy = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    base = {k: v for k, v in _qwen2_config(model_type="llama").items() if k not in ("rope_scaling", "rope_theta")}
    old = args_from_config({**base, "rope_theta": 500000.0, "rope_scaling": legacy}, "llama")
    new = args_from_config({**base, "rope_parameters": {**legacy, "rope_theta": 500000.0}}, "llama")
    assert old.rope_scaling == new.rope_scaling and old.rope_scaling.factor == 8.0
    assert old.rope_base == new.rope_base == 500000.0


# ------------------------------------------------------------------ tensor parallel split of the K/V heads


def test_kv_heads_split_across_ranks_or_replicated():
    from npuinfer.model import ModelArgs
    from npuinfer.parallel.cut import CutError, check_tp, shard_tensor

    args = ModelArgs(family="qwen3", vocab_size=10, dim=8, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=2,
                     intermediate_size=8, max_seq_len=8)
    rows = torch.arange(4 * 2 + 2 * 2 * 2).float()[:, None]  # Q heads 0-3, K heads 0-1, V heads 0-1 (2 rows each)
    q, k, v = rows[:8], rows[8:12], rows[12:16]
    for tp, kv_of_rank in ((2, [[0], [1]]), (4, [[0], [0], [1], [1]])):  # tp 4 > 2 K/V heads: each one on 2 ranks
        check_tp(args, tp, "test")
        for rank in range(tp):
            local = args.with_(tp_size=tp, tp_rank=rank)
            got = shard_tensor("layers.0.attention.wqkv.weight", rows, args, tp, rank)
            heads = slice(rank * local.n_local_heads * 2, (rank + 1) * local.n_local_heads * 2)
            kv_rows = torch.cat([torch.arange(h * 2, h * 2 + 2) for h in kv_of_rank[rank]])
            assert torch.equal(got, torch.cat([q[heads], k[kv_rows], v[kv_rows]]))
            assert local.n_local_kv_heads == len(kv_of_rank[rank])
    with pytest.raises(ValueError, match="tensor parallel size 3"):
        ModelArgs(family="x", vocab_size=10, dim=12, n_layers=1, n_heads=6, n_kv_heads=2, head_dim=2,
                  intermediate_size=12, max_seq_len=8, tp_size=3)
    six = ModelArgs(family="x", vocab_size=10, dim=12, n_layers=1, n_heads=6, n_kv_heads=3, head_dim=2,
                    intermediate_size=12, max_seq_len=8)
    with pytest.raises(CutError, match="neither divides the 3 K/V heads nor is a multiple of them"):
        check_tp(six, 2, "/m")


# ------------------------------------------------------------------ roofline and memory at n_kv_heads


def test_roofline_kv_bytes_at_qwen25_7b_by_hand():
    from npuinfer.dummy import registry_args
    from npuinfer.memory import estimate
    from npuinfer.registry import MODELS
    from npuinfer.roofline import kv_bytes_per_step

    args = registry_args(MODELS["qwen2.5-7b-instruct"])
    assert (args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim) == (28, 28, 4, 128)
    # K and V x 28 layers x 4 K/V heads x 128 dims x 2 bytes (bf16) = 57,344 bytes per token per row
    assert kv_bytes_per_step(args, batch=1, window=1000, dtype_bytes=2) == 2 * 28 * 4 * 128 * 2 * 1000 == 57_344_000
    assert kv_bytes_per_step(args, batch=4, window=1000, dtype_bytes=2) == 229_376_000
    # tp 2: 2 K/V heads a rank; tp 8 exceeds the 4 K/V heads: one replicated head a rank
    assert kv_bytes_per_step(args.with_(tp_size=2), 1, 1000, 2) == 28_672_000
    assert kv_bytes_per_step(args.with_(tp_size=4), 1, 1000, 2) == kv_bytes_per_step(args.with_(tp_size=4, tp_rank=3),
                                                                                     1, 1000, 2) == 14_336_000
    assert estimate(args, 1, 512, 488, 2).kv_cache == 57_344_000
    # the published parameter counts (model card: 7.61B, 6.53B without the embedding and head)
    assert round(args.num_parameters() / 1e9, 2) == 7.62
    assert round((args.num_parameters() - 2 * args.vocab_size * args.dim) / 1e9, 2) == 6.53


def test_real_size_models_read_their_published_dimensions():
    from npuinfer.dummy import registry_args
    from npuinfer.registry import MODELS

    got = {name: registry_args(MODELS[name]) for name in ("qwen2.5-14b-instruct", "llama-3.1-8b-instruct",
                                                          "qwen3-8b")}
    assert (got["qwen2.5-14b-instruct"].n_kv_heads, got["qwen2.5-14b-instruct"].head_dim) == (8, 128)
    llama = got["llama-3.1-8b-instruct"]
    assert llama.rope_base == 500000.0 and llama.rope_scaling.original_max_position_embeddings == 8192
    assert round(llama.num_parameters() / 1e9, 2) == 8.03
    qwen3 = got["qwen3-8b"]
    assert qwen3.qk_norm and (qwen3.n_kv_heads, qwen3.head_dim) == (8, 128)
    assert round(qwen3.num_parameters() / 1e9, 1) == 8.2


@pytest.mark.parametrize("name,bos", [("qwen2-tiny", None), ("llama3-tiny", "<|begin_of_text|>"),
                                      ("qwen3-tiny", None)])
def test_tiny_tokenizer_json_reads_as_transformers_reads_it(name, bos, load_tiny, tiny_dir):
    from transformers import AutoTokenizer

    ours = load_tiny(name).tokenizer
    theirs = AutoTokenizer.from_pretrained(str(tiny_dir(name)))
    for text in ("苹果公司的CEO是 The capital of France is", "line one\n\n  2023年12.5%"):
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text
    assert ours.eos_id == theirs.eos_token_id and theirs.eos_token in ("<|im_end|>", "<|eot_id|>")
    assert (ours.bos_id is not None and ours.add_bos) == (bos is not None)
    if bos is not None:
        assert ours.encode("a")[0] == theirs.convert_tokens_to_ids(bos)


@pytest.mark.parametrize("native", [True, False])
def test_sdpa_reads_shared_kv_heads_natively_or_repeated(native, monkeypatch):
    """SDPA with fewer K/V heads than query heads: enable_gqa where torch has it, K/V repeated where it does not
    (the fallback forced here), both equal to the plain reference, under a causal and a padding mask."""
    from npuinfer.kernels import reference, torch_fused

    if native and not torch_fused.SDPA_GQA:
        pytest.skip("this torch's SDPA has no enable_gqa")
    monkeypatch.setattr(torch_fused, "SDPA_GQA", native)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, t, 8, generator=gen) for h, t in ((4, 5), (2, 9), (2, 9)))
    mask = torch.ones(2, 1, 5, 9, dtype=torch.bool).tril(4)
    mask[0, :, :, :3] = False
    for args in ((q, k, v, None, True), (q, k, v, mask, False)):
        torch.testing.assert_close(torch_fused.sdpa(*args), reference.attention(*args), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(reference.attention(q, k, v, None, True),
                              reference.attention(q, k.flip(1), v.flip(1), None, True))  # the head pairing matters
