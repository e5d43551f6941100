"""npuinfer's decoder against transformers' implementations and a plain reference, fp32, on the tiny checkpoints.

The transformers side is built here from config.json values, and its weights are read from the checkpoint
files here with safetensors / torch.load and renamed by hand (not through npuinfer.checkpoint), so a wrong
name table or fused layout in npuinfer shows up as a logits mismatch.

  gpt-neox       GPTNeoXForCausalLM              (embed_out -> lm_head)
  internlm       LlamaForCausalLM(attention_bias=True)
  qwen           Qwen2ForCausalLM                (c_attn split into q/k/v, w2 -> gate, w1 -> up)
  baichuan2-7b   LlamaForCausalLM                (W_pack split, head rows L2-normalised)
  baichuan2-13b  plain reference below (ALiBi + NormHead); baichuan2-7b is checked against it as well
  qwen2, llama3, qwen3   their tiny checkpoints are in transformers' own layout: read by from_pretrained itself
                         (Qwen2ForCausalLM, LlamaForCausalLM with llama3 RoPE scaling, Qwen3ForCausalLM)
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from npuinfer.generate import generate
from npuinfer.model import SeqState, alibi_slopes

ATOL = 1e-4
GQA_TINY = ["qwen2-tiny", "llama3-tiny", "qwen3-tiny"]  # 4 query heads, 2 K/V heads
HF_FAMILIES = ["qwen-tiny", "baichuan2-7b-tiny", "internlm-tiny", "gpt-neox-tiny", *GQA_TINY]
ALL = HF_FAMILIES + ["baichuan2-13b-tiny"]


# ------------------------------------------------------------------ reading the checkpoint independently


def raw_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for index, loader in (("model.safetensors.index.json", lambda p: load_file(str(p))),
                          ("pytorch_model.bin.index.json", lambda p: torch.load(p, weights_only=True))):
        if (model_dir / index).is_file():
            files = sorted(set(json.loads((model_dir / index).read_text())["weight_map"].values()))
            state = {}
            for name in files:
                state.update(loader(model_dir / name))
            return {k: v.float() for k, v in state.items()}
    raise AssertionError(f"no index in {model_dir}")


def config_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


# ------------------------------------------------------------------ transformers models built from config.json


def hf_model(name: str, model_dir: Path):
    from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    if name in GQA_TINY:  # transformers' own classes and reader, from config.json and the safetensors files
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
        assert type(model).__name__ == {"qwen2-tiny": "Qwen2ForCausalLM", "llama3-tiny": "LlamaForCausalLM",
                                        "qwen3-tiny": "Qwen3ForCausalLM"}[name]
        return model.eval()
    c, raw = config_of(model_dir), raw_state(model_dir)
    common = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
                  num_attention_heads=c["num_attention_heads"], tie_word_embeddings=False,
                  attn_implementation="eager")
    if name.startswith("gpt-neox"):
        cfg = GPTNeoXConfig(**common, intermediate_size=c["intermediate_size"], hidden_act=c["hidden_act"],
                            layer_norm_eps=c["layer_norm_eps"], max_position_embeddings=c["max_position_embeddings"],
                            rope_parameters={"rope_type": "default", "rope_theta": float(c["rotary_emb_base"]),
                                             "partial_rotary_factor": c["rotary_pct"]},
                            use_parallel_residual=c["use_parallel_residual"], attention_bias=True)
        model_cls = GPTNeoXForCausalLM
        state = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in raw.items()}
    elif name.startswith("internlm"):
        cfg = LlamaConfig(**common, intermediate_size=c["intermediate_size"],
                          num_key_value_heads=c["num_attention_heads"],
                          rms_norm_eps=c["rms_norm_eps"], max_position_embeddings=c["max_position_embeddings"],
                          attention_bias=True, mlp_bias=False, hidden_act="silu")
        model_cls, state = LlamaForCausalLM, raw
    elif name.startswith("baichuan2-7b"):
        cfg = LlamaConfig(**common, intermediate_size=c["intermediate_size"],
                          num_key_value_heads=c["num_attention_heads"],
                          rms_norm_eps=c["rms_norm_eps"], max_position_embeddings=c["max_position_embeddings"],
                          attention_bias=False, mlp_bias=False, hidden_act="silu")
        model_cls, state = LlamaForCausalLM, {}
        for k, v in raw.items():
            if k.endswith("self_attn.W_pack.weight"):
                for p, part in zip("qkv", v.split(c["hidden_size"], dim=0)):
                    state[k.replace("W_pack", f"{p}_proj")] = part
            elif k == "lm_head.weight":
                state[k] = v / v.norm(dim=-1, keepdim=True)  # NormHead
            else:
                state[k] = v
    elif name.startswith("qwen"):
        heads = c["num_attention_heads"]
        assert c["kv_channels"] * heads == c["hidden_size"]
        cfg = Qwen2Config(**common, intermediate_size=c["intermediate_size"] // 2, num_key_value_heads=heads,
                          rms_norm_eps=c["layer_norm_epsilon"], max_position_embeddings=c["seq_length"],
                          rope_parameters={"rope_type": "default", "rope_theta": float(c["rotary_emb_base"])},
                          use_sliding_window=False, hidden_act="silu")
        model_cls = Qwen2ForCausalLM
        rename = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
                  "mlp.w2": "mlp.gate_proj", "mlp.w1": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
        state = {"model.embed_tokens.weight": raw["transformer.wte.weight"],
                 "model.norm.weight": raw["transformer.ln_f.weight"], "lm_head.weight": raw["lm_head.weight"]}
        for k, v in raw.items():
            if not k.startswith("transformer.h."):
                continue
            _, _, n, rest = k.split(".", 3)
            prefix = f"model.layers.{n}."
            if rest.startswith("attn.c_attn."):
                kind = rest.rsplit(".", 1)[1]
                for p, part in zip("qkv", v.split(c["hidden_size"], dim=0)):  # contiguous [Q | K | V]
                    state[f"{prefix}self_attn.{p}_proj.{kind}"] = part
                continue
            module, kind = rest.rsplit(".", 1)
            state[f"{prefix}{rename[module]}.{kind}"] = v
    else:
        raise AssertionError(name)
    torch.manual_seed(0)
    model = model_cls(cfg).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if "rotary" not in m], missing
    return model


_HF_CACHE: dict[str, object] = {}


@pytest.fixture(scope="module")
def hf(tiny_dir):
    def get(name: str):
        if name not in _HF_CACHE:
            _HF_CACHE[name] = hf_model(name, tiny_dir(name))
        return _HF_CACHE[name]

    yield get
    _HF_CACHE.clear()


# ------------------------------------------------------------------ plain Baichuan2 reference (RoPE/ALiBi, NormHead)


def interleave_slopes(n: int) -> list[float]:
    """Baichuan2-13B's _get_interleave, retyped: 2^(-8i/n) for powers of two, interleaved otherwise."""
    if math.log2(n).is_integer():
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]
    closest = 2 ** math.floor(math.log2(n))
    return interleave_slopes(closest) + interleave_slopes(2 * closest)[0::2][: n - closest]


def baichuan_reference(c: dict, raw: dict[str, torch.Tensor], tokens: list[int], alibi: bool) -> torch.Tensor:
    """Logits [T, vocab] for one sequence, recomputed from scratch: no cache, explicit positions and masks."""
    d, heads = c["hidden_size"], c["num_attention_heads"]
    hd, eps, T = d // heads, c["rms_norm_eps"], len(tokens)

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    def rope(x):  # x [T, H, hd]; pair dims (i, i + hd/2) rotated by angle pos * 10000^(-2i/hd)
        out = x.clone()
        for pos in range(T):
            for i in range(hd // 2):
                theta = pos * 10000.0 ** (-2 * i / hd)
                a, b = x[pos, :, i], x[pos, :, i + hd // 2]
                out[pos, :, i] = a * math.cos(theta) - b * math.sin(theta)
                out[pos, :, i + hd // 2] = b * math.cos(theta) + a * math.sin(theta)
        return out

    slopes = interleave_slopes(heads)
    x = raw["model.embed_tokens.weight"][tokens]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        h = rms(x, raw[p + "input_layernorm.weight"])
        q, k, v = (h @ raw[p + "self_attn.W_pack.weight"].T).split(d, dim=-1)
        q, k, v = (t.reshape(T, heads, hd) for t in (q, k, v))
        if not alibi:
            q, k = rope(q), rope(k)
        att = torch.zeros(T, heads, hd)
        for head in range(heads):
            for i in range(T):
                scores = torch.stack([q[i, head] @ k[j, head] / math.sqrt(hd)
                                      + (slopes[head] * (j - i) if alibi else 0.0) for j in range(i + 1)])
                probs = torch.softmax(scores, dim=0)
                att[i, head] = sum(probs[j] * v[j, head] for j in range(i + 1))
        x = x + att.reshape(T, d) @ raw[p + "self_attn.o_proj.weight"].T
        h = rms(x, raw[p + "post_attention_layernorm.weight"])
        gate, up = h @ raw[p + "mlp.gate_proj.weight"].T, h @ raw[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ raw[p + "mlp.down_proj.weight"].T
    head = raw["lm_head.weight"]
    head = head / head.norm(dim=-1, keepdim=True)
    return rms(x, raw["model.norm.weight"]) @ head.T


# ------------------------------------------------------------------ helpers


def prompt(n: int, seed: int, vocab: int = 1000) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def ours_steps(model, tokens: list[int], steps: list[int]) -> list[torch.Tensor]:
    """[prefill logits [T, V], then one [V] per decode step], feeding ``steps`` one at a time through the cache."""
    model.setup_caches(1, len(tokens) + len(steps))
    with torch.inference_mode():
        out = [model(torch.tensor([tokens]), 0)[0]]
        for i, tok in enumerate(steps):
            out.append(model(torch.tensor([[tok]]), len(tokens) + i)[0, -1])
    return out


def hf_steps(hf_model, tokens: list[int], steps: list[int]) -> list[torch.Tensor]:
    with torch.no_grad():
        res = hf_model(torch.tensor([tokens]), use_cache=True)
        out, past = [res.logits[0]], res.past_key_values
        for tok in steps:
            res = hf_model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            out.append(res.logits[0, -1])
            past = res.past_key_values
    return out


def assert_close(ours, theirs, what):
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"{what}: max |diff| {diff:.3g} > {ATOL}"


# ------------------------------------------------------------------ 1. logits: prefill and KV-cached decode steps


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_logits_match_transformers(name, load_tiny, hf):
    model = load_tiny(name).model
    tokens, steps = prompt(11, 1), prompt(5, 2)
    ours, theirs = ours_steps(model, tokens, steps), hf_steps(hf(name), tokens, steps)
    assert ours[0].shape == theirs[0].shape == (11, model.args.vocab_size)
    assert theirs[0].abs().max() > 0.05  # the comparison is not between two near-zero tensors
    assert_close(ours[0], theirs[0], f"{name} prefill")
    for i, (a, b) in enumerate(zip(ours[1:], theirs[1:])):
        assert_close(a, b, f"{name} decode step {i + 1}")


@pytest.mark.parametrize("name", ["baichuan2-13b-tiny", "baichuan2-7b-tiny"])
def test_baichuan2_matches_plain_reference(name, load_tiny, tiny_dir):
    model_dir = tiny_dir(name)
    c, raw = config_of(model_dir), raw_state(model_dir)
    alibi = "max_position_embeddings" not in c
    assert alibi == (name == "baichuan2-13b-tiny") == (load_tiny(name).args.position == "alibi")
    tokens, steps = prompt(9, 3), prompt(4, 4)
    ref = baichuan_reference(c, raw, tokens + steps, alibi)
    ours = ours_steps(load_tiny(name).model, tokens, steps)
    assert_close(ours[0], ref[: len(tokens)], f"{name} prefill")
    for i, logits in enumerate(ours[1:]):
        assert_close(logits, ref[len(tokens) + i], f"{name} decode step {i + 1}")


@pytest.mark.parametrize("heads", [6, 12, 40])
def test_alibi_slopes_non_power_of_two(heads):
    # Baichuan2-13B has 40 heads: the interleaved branch is the one the real model uses.
    assert torch.allclose(alibi_slopes(heads).double(), torch.tensor(interleave_slopes(heads), dtype=torch.double),
                          rtol=1e-6, atol=0)


def test_alibi_with_six_heads_matches_reference(tmp_path):
    """A non-power-of-two head count end to end (the real 13B has 40 heads; the tiny one has 4)."""
    from npuinfer.checkpoint import args_from_config, from_canonical, to_canonical
    from npuinfer.model import Transformer
    from npuinfer.tiny import random_canonical_state

    c = {"model_type": "baichuan", "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 6,
         "intermediate_size": 80, "vocab_size": 97, "model_max_length": 64, "rms_norm_eps": 1e-6, "hidden_act": "silu"}
    args = args_from_config(c, "baichuan2")
    assert args.position == "alibi" and args.norm_head
    model = Transformer(args)
    raw = from_canonical("baichuan2", random_canonical_state(model, 5), args)
    canonical, _ = to_canonical("baichuan2", raw, args)
    model.load_state_dict(canonical, strict=True)
    model.eval()
    tokens, steps = prompt(7, 5, vocab=97), prompt(3, 6, vocab=97)
    ref = baichuan_reference(c, raw, tokens + steps, alibi=True)
    ours = ours_steps(model, tokens, steps)
    assert_close(ours[0], ref[:7], "6-head alibi prefill")
    for i, logits in enumerate(ours[1:]):
        assert_close(logits, ref[7 + i], f"6-head alibi decode step {i + 1}")


# ------------------------------------------------------------------ left-padded batch == each row alone


@pytest.mark.parametrize("name", ALL)
def test_left_padded_batch_rows_equal_single_runs(name, load_tiny):
    model = load_tiny(name).model
    rows = [prompt(n, 10 + n) for n in (6, 10, 3)]
    steps = [prompt(4, 20 + b) for b in range(len(rows))]
    single = [ours_steps(model, r, s) for r, s in zip(rows, steps)]

    width, pad = max(map(len, rows)), 7  # a real token id as padding: the mask alone must hide it
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    total = width + len(steps[0])
    state = SeqState.from_attention_mask(mask, total)
    model.setup_caches(len(rows), total)
    with torch.inference_mode():
        prefill = model(ids, 0, state)
        decoded = []
        for i in range(len(steps[0])):
            tok = torch.tensor([[s[i]] for s in steps])
            decoded.append(model(tok, width + i, state)[:, -1])
    for b, r in enumerate(rows):
        assert torch.isfinite(prefill[b]).all()
        assert_close(prefill[b, width - len(r):], single[b][0], f"{name} row {b} prefill")
        for i in range(len(steps[0])):
            assert_close(decoded[i][b], single[b][1 + i], f"{name} row {b} decode step {i + 1}")


# ------------------------------------------------------------------ 2. greedy generation == transformers generate


def hf_generate(hf_model, ids: torch.Tensor, mask: torch.Tensor, n: int, pad: int) -> torch.Tensor:
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                           pad_token_id=pad, bos_token_id=None)
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    return out[:, ids.shape[1]:]


def padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_greedy_equals_transformers_generate_batch1(name, load_tiny, hf):
    loaded = load_tiny(name)
    ids = torch.tensor([loaded.tokenizer.encode("苹果公司的CEO是 The capital of France is")])
    mask = torch.ones_like(ids)
    ours = generate(loaded.model, ids, 12, mask)
    theirs = hf_generate(hf(name), ids, mask, 12, loaded.tokenizer.pad_id)
    assert ours.shape == (1, 12)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("name", ["internlm-tiny", "gpt-neox-tiny", "baichuan2-7b-tiny", *GQA_TINY])
def test_greedy_equals_transformers_generate_left_padded(name, load_tiny, hf):
    loaded = load_tiny(name)
    tok = loaded.tokenizer
    ids, mask = tok.encode_batch(["苹果公司的CEO是", "The capital of France is Paris, and the capital of",
                                  "天气"])
    assert (mask == 0).any()  # the batch really is padded
    ours = generate(loaded.model, ids, 10, mask)
    theirs = hf_generate(hf(name), ids, mask, 10, tok.pad_id)
    assert ours.shape == (3, 10)
    assert ours.tolist() == theirs.tolist()
    # and each row equals its own unpadded run
    for b in range(3):
        row = ids[b, mask[b].bool()].unsqueeze(0)
        assert generate(loaded.model, row, 10).tolist() == ours[b: b + 1].tolist()


def test_greedy_alibi_equals_reference_greedy(load_tiny, tiny_dir):
    name = "baichuan2-13b-tiny"
    c, raw = config_of(tiny_dir(name)), raw_state(tiny_dir(name))
    loaded = load_tiny(name)
    tokens = loaded.tokenizer.encode("苹果公司的CEO是")
    seq = list(tokens)
    for _ in range(6):
        seq.append(int(baichuan_reference(c, raw, seq, alibi=True)[-1].argmax()))
    ours = generate(loaded.model, torch.tensor([tokens]), 6)
    assert ours[0].tolist() == seq[len(tokens):]
    ids, mask = loaded.tokenizer.encode_batch(["The capital of France is", "苹果公司的CEO是"])
    both = generate(loaded.model, ids, 6, mask)
    assert both[1].tolist() == seq[len(tokens):]


# ------------------------------------------------------------------ 3. checkpoints written by transformers itself


def _randomize(model, seed: int) -> None:
    """Random biases and norm scales too (transformers initialises them to 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            else:
                p.copy_(0.05 * noise)


def _hf_for_saving(arch: str):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, tie_word_embeddings=False, attn_implementation="eager")
    if arch == "gpt-neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, intermediate_size=256, hidden_act="gelu"))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=160, attention_bias=True,
                                             num_key_value_heads=4))
    _randomize(model, 7)
    return model.eval()


@pytest.mark.parametrize("arch,variant", [
    ("gpt-neox", "safetensors"), ("gpt-neox", "sharded"), ("gpt-neox", "bin"), ("gpt-neox", "lm_head"),
    ("internlm", "safetensors"), ("internlm", "sharded"), ("internlm", "bin"),
])
def test_transformers_save_pretrained_loads_and_matches(arch, variant, tiny_dir, tmp_path):
    from npuinfer.runtime import load_model

    hf_model_ = _hf_for_saving(arch)
    out = tmp_path / "ckpt"
    if variant == "bin":
        hf_model_.config.save_pretrained(out)
        torch.save(hf_model_.state_dict(), out / "pytorch_model.bin")
    else:
        kw = {"max_shard_size": "100KB"} if variant == "sharded" else {}
        if variant == "lm_head":
            kw["save_original_format"] = False  # transformers 5's own name for the head
        hf_model_.save_pretrained(out, **kw)
    files = {p.name for p in out.iterdir()}
    expected_files = {"safetensors": {"model.safetensors"}, "bin": {"pytorch_model.bin"},
                      "lm_head": {"model.safetensors"}, "sharded": {"model.safetensors.index.json"}}[variant]
    assert expected_files <= files
    tok_file = "tokenizer.json" if arch == "gpt-neox" else "tokenizer.model"
    shutil.copy(tiny_dir(f"{arch}-tiny") / tok_file, out / tok_file)

    loaded = load_model(model_path=out, device="cpu", dtype="fp32")
    assert loaded.family.name == {"gpt-neox": "gpt-neox", "internlm": "llama"}[arch]  # LlamaForCausalLM: the llama family
    tokens, steps = prompt(9, 30), prompt(4, 31)
    ours, theirs = ours_steps(loaded.model, tokens, steps), hf_steps(hf_model_, tokens, steps)
    assert_close(ours[0], theirs[0], f"{arch}/{variant} prefill")
    for i, (a, b) in enumerate(zip(ours[1:], theirs[1:])):
        assert_close(a, b, f"{arch}/{variant} decode step {i + 1}")
    if variant == "safetensors":
        ids = torch.tensor([tokens])
        ours_gen = generate(loaded.model, ids, 8)
        assert ours_gen.tolist() == hf_generate(hf_model_, ids, torch.ones_like(ids), 8, 0).tolist()


# ------------------------------------------------------------------ other paths through the same decoder


@pytest.mark.parametrize("name", ALL)
def test_chunked_prefill_and_eager_attention_agree(name, load_tiny):
    """A prompt fed in two chunks, and the eager attention path ("FA off"), give the sdpa single-shot logits."""
    model = load_tiny(name).model
    tokens = prompt(12, 40)
    whole = ours_steps(model, tokens, [])[0]
    model.setup_caches(1, 12)
    with torch.inference_mode():
        chunked = torch.cat([model(torch.tensor([tokens[:7]]), 0), model(torch.tensor([tokens[7:]]), 7)], dim=1)[0]
    assert_close(chunked, whole, f"{name} chunked prefill")
    model.set_attention("eager")
    try:
        steps = prompt(3, 41)
        eager, sdpa = ours_steps(model, tokens, steps), None
        model.set_attention("sdpa")
        sdpa = ours_steps(model, tokens, steps)
        for a, b in zip(eager, sdpa):
            assert_close(a, b, f"{name} eager vs sdpa")
        # and with a left-padded batch (the eager path's masks)
        ids, mask = padded([prompt(5, 42), tokens], pad=3)
        for impl in ("eager", "sdpa"):
            model.set_attention(impl)
            out = generate(model, ids, 4, mask)
            assert out[1].tolist() == generate(model, torch.tensor([tokens]), 4)[0].tolist()
    finally:
        model.set_attention("sdpa")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_fp32(dtype, tiny_dir, load_tiny):
    from npuinfer.runtime import load_model

    name = "internlm-tiny"
    half = load_model(name, device="cpu", dtype=dtype)
    assert half.model.dtype == dtype and half.model.output.weight.dtype == dtype
    tokens = prompt(10, 50)
    a = ours_steps(half.model, tokens, prompt(2, 51))
    b = ours_steps(load_tiny(name).model, tokens, prompt(2, 51))
    for x, y in zip(a, b):
        assert x.dtype == dtype and torch.isfinite(x).all()
        assert (x.float() - y).abs().max() < 0.1


def _write_tokenizer_json_only(out: Path) -> None:
    """A small byte-level BPE with a bos-adding post-processor, saved as transformers saves a fast tokenizer
    (tokenizer.json + tokenizer_config.json + special_tokens_map.json; no tokenizer.model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from npuinfer.tokenizer_training import corpus_lines

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(out)


def test_llama_checkpoint_with_only_tokenizer_json_loads_as_llama(tmp_path):
    """transformers' LlamaForCausalLM.save_pretrained (attention_bias) + a tokenizer.json alone: the tokenizer is
    chosen by the files present, and greedy tokens equal transformers' generate from its own tokenizer."""
    from transformers import AutoTokenizer

    from npuinfer.runtime import load_model

    out = tmp_path / "llama-bias"
    hf_model_ = _hf_for_saving("internlm")
    hf_model_.save_pretrained(out)
    _write_tokenizer_json_only(out)
    assert "tokenizer.json" in {p.name for p in out.iterdir()} and not (out / "tokenizer.model").exists()

    loaded = load_model(model_path=out, device="cpu", dtype="fp32")
    assert loaded.family.name == "llama" and loaded.args.qkv_bias and loaded.args.o_bias
    reference = AutoTokenizer.from_pretrained(str(out))
    text = "苹果公司的CEO是 The capital of France is"
    ids = loaded.tokenizer.encode(text)
    assert ids == reference(text)["input_ids"] and ids[0] == loaded.tokenizer.bos_id  # bos from the post-processor
    assert loaded.tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert loaded.tokenizer.eos_id == reference.eos_token_id

    ids_t = torch.tensor([ids])
    ours = generate(loaded.model, ids_t, 10, stop_at_eos=False)
    theirs = hf_generate(hf_model_, ids_t, torch.ones_like(ids_t), 10, 0)
    assert ours.tolist() == theirs.tolist()
