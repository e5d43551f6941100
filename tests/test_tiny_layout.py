"""Tiny checkpoints are laid out like the real downloads (REFERENCE.md §1, typed in here independently of
npuinfer's own name tables), and are a pure function of the seed."""
from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from npuinfer.registry import MODELS, get_spec
from npuinfer.tiny import make_tiny


def qwen_names(n_layers: int) -> set[str]:
    per_layer = ["ln_1.weight", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "ln_2.weight",
                 "mlp.w1.weight", "mlp.w2.weight", "mlp.c_proj.weight"]
    return {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"} | {
        f"transformer.h.{i}.{s}" for i in range(n_layers) for s in per_layer}


def baichuan2_names(n_layers: int) -> set[str]:
    per_layer = ["input_layernorm.weight", "self_attn.W_pack.weight", "self_attn.o_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                 "post_attention_layernorm.weight"]
    return {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{s}" for i in range(n_layers) for s in per_layer}


def internlm_names(n_layers: int) -> set[str]:
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    per_layer += [f"self_attn.{p}_proj.{k}" for p in "qkvo" for k in ("weight", "bias")]
    return {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{s}" for i in range(n_layers) for s in per_layer}


def neox_names(n_layers: int) -> set[str]:
    modules = ["input_layernorm", "post_attention_layernorm", "attention.query_key_value", "attention.dense",
               "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
    return {"gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias",
            "embed_out.weight"} | {
        f"gpt_neox.layers.{i}.{m}.{k}" for i in range(n_layers) for m in modules for k in ("weight", "bias")}


def gqa_names(per_layer_extra: list[str], head: bool):
    """Llama / Qwen2 / Qwen3 names: separate q/k/v/o projections plus the family's extras; no lm_head when tied."""
    def names(n_layers: int) -> set[str]:
        per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                     "mlp.up_proj.weight", "mlp.down_proj.weight"]
        per_layer += [f"self_attn.{p}_proj.weight" for p in "qkvo"] + per_layer_extra
        top = {"model.embed_tokens.weight", "model.norm.weight"} | ({"lm_head.weight"} if head else set())
        return top | {f"model.layers.{i}.{s}" for i in range(n_layers) for s in per_layer}
    return names


# name -> (tensor names, weight file kind, tokenizer file, model_type, modules named by auto_map)
LAYOUT = {
    "qwen-tiny": (qwen_names, "safetensors", "qwen.tiktoken", "qwen", {"modeling_qwen", "configuration_qwen"}),
    "baichuan2-7b-tiny": (baichuan2_names, "bin", "tokenizer.model", "baichuan",
                          {"modeling_baichuan", "configuration_baichuan"}),
    "baichuan2-13b-tiny": (baichuan2_names, "bin", "tokenizer.model", "baichuan",
                           {"modeling_baichuan", "configuration_baichuan"}),
    "internlm-tiny": (internlm_names, "bin", "tokenizer.model", "internlm",
                      {"modeling_internlm", "configuration_internlm"}),
    "gpt-neox-tiny": (neox_names, "safetensors", "tokenizer.json", "gpt_neox", set()),
    "qwen2-tiny": (gqa_names([f"self_attn.{p}_proj.bias" for p in "qkv"], head=False), "safetensors",
                   "tokenizer.json", "qwen2", set()),
    "llama3-tiny": (gqa_names([], head=True), "safetensors", "tokenizer.json", "llama", set()),
    "qwen3-tiny": (gqa_names(["self_attn.q_norm.weight", "self_attn.k_norm.weight"], head=True), "safetensors",
                   "tokenizer.json", "qwen3", set()),
}


def safetensors_header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    header.pop("__metadata__", None)
    return header


def tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.iterdir()):
        if f.suffix == ".safetensors":
            out.update(load_file(str(f)))
        elif f.suffix == ".bin":
            out.update(torch.load(f, weights_only=True))
    return out


@pytest.mark.parametrize("name", list(LAYOUT))
def test_files_and_tensor_names_are_the_real_ones(name, tiny_dir):
    names_of, kind, tok_file, model_type, modules = LAYOUT[name]
    d = tiny_dir(name)
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == model_type
    n_layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    assert n_layers >= 2 and heads >= 2  # several layers and heads, or the tests prove little

    index_name = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    index = json.loads((d / index_name).read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    stem = "model" if kind == "safetensors" else "pytorch_model"
    assert shards == [f"{stem}-{i:05d}-of-{len(shards):05d}.{kind}" for i in range(1, len(shards) + 1)]
    assert len(shards) >= 2
    on_disk = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".safetensors"))
    assert on_disk == shards  # no single-file weights next to the shards
    assert (d / tok_file).is_file()
    assert {p.stem for p in d.glob("*.py")} == modules
    assert {ref.split(".")[0] for ref in config.get("auto_map", {}).values()} == modules

    expected = names_of(n_layers)
    assert set(weight_map) == expected
    total = 0
    for shard in shards:
        path = d / shard
        if kind == "bin":
            assert zipfile.is_zipfile(path)  # torch.save's zip format, which torch.load can mmap
            tensors = torch.load(path, weights_only=True)
        else:
            tensors = tensors_of_one_safetensors(path)
        assert set(tensors) == {n for n, f in weight_map.items() if f == shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total


def tensors_of_one_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    assert set(safetensors_header(path)) == set(load_file(str(path)))
    return load_file(str(path))


@pytest.mark.parametrize("name", list(LAYOUT))
def test_tensor_shapes_follow_the_config(name, tiny_dir):
    d = tiny_dir(name)
    c = json.loads((d / "config.json").read_text())
    t = tensors_of(d)
    D, V, I, L = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["num_hidden_layers"]
    if "num_key_value_heads" in c:  # Llama / Qwen2 / Qwen3: grouped-query attention, K/V narrower than Q
        H, KV = c["num_attention_heads"], c["num_key_value_heads"]
        hd = c.get("head_dim", D // H)
        assert KV < H and H % KV == 0
        assert t["model.embed_tokens.weight"].shape == (V, D)
        assert ("lm_head.weight" in t) != c["tie_word_embeddings"]
        assert t["model.layers.0.self_attn.q_proj.weight"].shape == (H * hd, D)
        assert t["model.layers.0.self_attn.k_proj.weight"].shape == t["model.layers.0.self_attn.v_proj.weight"].shape \
            == (KV * hd, D)
        assert t["model.layers.0.self_attn.o_proj.weight"].shape == (D, H * hd)
        if c["model_type"] == "qwen2":
            assert t["model.layers.0.self_attn.k_proj.bias"].shape == (KV * hd,)
        if c["model_type"] == "qwen3":
            assert hd != D // H  # as Qwen3-0.6B: heads wider than hidden_size / heads
            assert t["model.layers.0.self_attn.q_norm.weight"].shape == t["model.layers.0.self_attn.k_norm.weight"] \
                .shape == (hd,)
        assert t["model.layers.0.mlp.gate_proj.weight"].shape == (I, D)
    elif name.startswith("qwen"):
        assert t["transformer.wte.weight"].shape == t["lm_head.weight"].shape == (V, D)
        assert t[f"transformer.h.{L - 1}.attn.c_attn.weight"].shape == (3 * D, D)
        assert t[f"transformer.h.{L - 1}.attn.c_attn.bias"].shape == (3 * D,)
        # config's intermediate_size counts both branches: w1 and w2 are half of it each
        assert t["transformer.h.0.mlp.w1.weight"].shape == t["transformer.h.0.mlp.w2.weight"].shape == (I // 2, D)
        assert t["transformer.h.0.mlp.c_proj.weight"].shape == (D, I // 2)
    elif name.startswith("baichuan2"):
        assert t["model.embed_tokens.weight"].shape == t["lm_head.weight"].shape == (V, D)
        assert t["model.layers.0.self_attn.W_pack.weight"].shape == (3 * D, D)
        assert t["model.layers.0.mlp.gate_proj.weight"].shape == (I, D)
        assert t["model.layers.0.mlp.down_proj.weight"].shape == (D, I)
    elif name.startswith("internlm"):
        for p in "qkvo":
            assert t[f"model.layers.0.self_attn.{p}_proj.weight"].shape == (D, D)
            assert t[f"model.layers.0.self_attn.{p}_proj.bias"].shape == (D,)
    else:
        assert t["gpt_neox.embed_in.weight"].shape == t["embed_out.weight"].shape == (V, D)
        assert t["gpt_neox.layers.0.attention.query_key_value.weight"].shape == (3 * D, D)
        assert t["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].shape == (I, D)
    # biases and norm scales are random (never all 0 or 1), so a dropped bias or norm shows in the logits
    for n, x in t.items():
        if n.endswith("bias") or "norm" in n or "ln_" in n:
            assert not torch.all(x == 0) and not torch.all(x == 1), n


def test_config_fields_are_the_real_ones(tiny_dir):
    qwen = json.loads((tiny_dir("qwen-tiny") / "config.json").read_text())
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels", "intermediate_size",
                  "vocab_size", "layer_norm_epsilon", "rotary_emb_base", "rotary_pct", "seq_length", "no_bias",
                  "use_dynamic_ntk", "use_logn_attn"):
        assert field in qwen, field
    assert qwen["no_bias"] is True and qwen["kv_channels"] * qwen["num_attention_heads"] == qwen["hidden_size"]
    assert qwen["architectures"] == ["QWenLMHeadModel"]

    b7 = json.loads((tiny_dir("baichuan2-7b-tiny") / "config.json").read_text())
    b13 = json.loads((tiny_dir("baichuan2-13b-tiny") / "config.json").read_text())
    assert "max_position_embeddings" in b7 and "max_position_embeddings" not in b13  # as the real 13B (ALiBi)
    assert "model_max_length" in b13 and b7["architectures"] == b13["architectures"] == ["BaichuanForCausalLM"]

    internlm = json.loads((tiny_dir("internlm-tiny") / "config.json").read_text())
    assert internlm["bias"] is True and internlm["architectures"] == ["InternLMForCausalLM"]

    neox = json.loads((tiny_dir("gpt-neox-tiny") / "config.json").read_text())
    assert neox["rotary_pct"] == 0.25 and neox["use_parallel_residual"] is True and "rotary_emb_base" in neox
    assert neox["architectures"] == ["GPTNeoXForCausalLM"]
    assert (neox["hidden_size"] // neox["num_attention_heads"]) * neox["rotary_pct"] >= 2  # some dims do rotate


def test_grouped_query_config_fields_are_the_real_ones(tiny_dir):
    qwen2 = json.loads((tiny_dir("qwen2-tiny") / "config.json").read_text())
    assert qwen2["architectures"] == ["Qwen2ForCausalLM"] and qwen2["use_sliding_window"] is False
    assert qwen2["tie_word_embeddings"] is True and qwen2["rope_scaling"] is None and "sliding_window" in qwen2
    llama = json.loads((tiny_dir("llama3-tiny") / "config.json").read_text())
    assert llama["architectures"] == ["LlamaForCausalLM"] and llama["rope_theta"] == 500000.0
    assert llama["rope_scaling"]["rope_type"] == "llama3" and llama["rope_scaling"]["factor"] == 8.0
    qwen3 = json.loads((tiny_dir("qwen3-tiny") / "config.json").read_text())
    assert qwen3["architectures"] == ["Qwen3ForCausalLM"] and qwen3["attention_bias"] is False
    for config in (qwen2, llama, qwen3):
        assert config["num_key_value_heads"] * 2 == config["num_attention_heads"]


@pytest.mark.parametrize("name", list(LAYOUT))
def test_tokenizer_fits_the_embedding(name, tiny_dir):
    from npuinfer.tokenizer import load_tokenizer

    d = tiny_dir(name)
    tok = load_tokenizer(d, get_spec(name).family)
    assert 100 < tok.vocab_size <= json.loads((d / "config.json").read_text())["vocab_size"]
    ids = tok.encode("苹果公司的CEO是 The capital of France")
    assert ids and max(ids) < tok.vocab_size


@pytest.mark.parametrize("name", ["qwen-tiny", "internlm-tiny"])
def test_same_seed_same_checkpoint_other_seed_other_weights(name, tiny_dir, tmp_path):
    cached = tiny_dir(name)  # built with seed 0
    again = make_tiny(name, tmp_path / "seed0", seed=0)
    other = make_tiny(name, tmp_path / "seed1", seed=1)
    for f in cached.iterdir():
        if f.suffix in (".json", ".tiktoken", ".model", ".py") and f.name != "npuinfer_tiny.json":
            assert (again / f.name).read_bytes() == f.read_bytes(), f.name
    a, b, c = tensors_of(cached), tensors_of(again), tensors_of(other)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a)


def test_registry_real_sizes():
    # REFERENCE.md §1: hidden, layers, heads, intermediate, vocab
    table = {"qwen-7b": (4096, 32, 32, 22016, 151936), "qwen-14b": (5120, 40, 40, 27392, 152064),
             "baichuan2-7b": (4096, 32, 32, 11008, 125696), "baichuan2-13b": (5120, 40, 40, 13696, 125696),
             "internlm-7b": (4096, 32, 32, 11008, 103168), "gpt-neox-20b": (6144, 44, 64, 24576, 50432)}
    for name, sizes in table.items():
        s = MODELS[name]
        assert (s.hidden_size, s.num_layers, s.num_heads, s.intermediate_size, s.vocab_size) == sizes, name
        assert not s.tiny and MODELS[s.stand_in].tiny and MODELS[s.stand_in].family == s.family
        assert MODELS[s.stand_in].position == s.position
    assert MODELS["baichuan2-13b"].position == "alibi" and MODELS["baichuan2-7b"].position == "rope"
