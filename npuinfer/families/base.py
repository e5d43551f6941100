"""What a family record holds, and the pieces several families share (the Llama layout, RoPE fields)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..hf_config import ConfigFields
from ..model import Llama3RopeScaling, ModelArgs
from ..registry import ModelSpec

# Qwen's pre-tokenizer pattern (qwen.tiktoken's, and the Split of Qwen2 / Qwen3's tokenizer.json)
QWEN_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# qkv layouts on disk; canonical (npuinfer.model) is one fused [Q; K; V] tensor
QKV_FUSED = "fused"        # one tensor, rows [Q; K; V] (Qwen c_attn, Baichuan2 W_pack)
QKV_SEPARATE = "separate"  # q_proj, k_proj, v_proj (InternLM, Llama)
QKV_PER_HEAD = "per_head"  # one tensor, rows [h0: q k v][h1: q k v]... (GPT-NeoX)


@dataclass(frozen=True)
class NameTable:
    """A family's tensor names: whole-model names, and per-layer suffixes under ``layer_prefix``N."""

    top: dict[str, str]
    layer_prefix: str
    layer: dict[str, str]

    def canonical(self, name: str) -> str | None:
        if name in self.top:
            return self.top[name]
        if name.startswith(self.layer_prefix):
            index, _, suffix = name[len(self.layer_prefix):].partition(".")
            if index.isdigit() and suffix in self.layer:
                return f"layers.{index}.{self.layer[suffix]}"
        return None

    def original(self, canonical: str) -> str | None:
        for name, target in self.top.items():  # the first listed name is the family's own
            if target == canonical:
                return name
        _, index, suffix = canonical.split(".", 2) if canonical.startswith("layers.") else ("", "", "")
        layer = {v: k for k, v in self.layer.items()}
        return f"{self.layer_prefix}{index}.{layer[suffix]}" if suffix in layer else None


def weight_and_bias(pairs: dict[str, str], kinds: tuple[str, ...] = ("weight", "bias")) -> dict[str, str]:
    return {f"{src}.{k}": f"{dst}.{k}" for src, dst in pairs.items() for k in kinds}


@dataclass(frozen=True)
class TokenizerFiles:
    """The tokenizer files a family's checkpoint may hold, in the order transformers prefers them."""

    files: tuple[str, ...]
    add_bos: bool  # the family's tokenizer class default, when tokenizer_config.json does not say
    specials: dict[str, str] = field(default_factory=dict)  # bos/eos/pad token when the configs name none


@dataclass(frozen=True)
class TinyTokenizer:
    """How tiny checkpoints train the family's tokenizer (npuinfer.tokenizer_training) and what else they write."""

    kind: str  # "qwen.tiktoken" | "sentencepiece" | "byte-level-bpe" | "split-byte-level-bpe"
    vocab_size: int  # target ids; the config's vocab_size pads above it
    extra_files: dict[str, dict]  # tokenizer_config.json, special_tokens_map.json, as the real download has them
    add_dummy_prefix: bool = False  # sentencepiece only
    # byte-level-bpe: ids 0, 1, ...; split-byte-level-bpe: the ids after the learned ones (Qwen2, Llama 3)
    special_tokens: tuple[str, ...] = ()
    split_pattern: str = ""  # split-byte-level-bpe: the pre-tokenizer's regex
    bos_template: bool = False  # split-byte-level-bpe: a post-processor puts the first special token first


@dataclass(frozen=True)
class TinyLayout:
    weights: str  # "safetensors" | "bin": the real download's weight file format
    config: Callable[[ModelSpec, dict, dict], dict]  # (spec, common fields, token ids) -> config.json
    tokenizer: TinyTokenizer


@dataclass(frozen=True)
class Family:
    name: str
    title: str  # as people write it, for messages
    model_types: tuple[str, ...]  # config.json model_type values read as this family
    architectures: tuple[str, ...]  # config.json architectures, used when model_type is absent
    read_args: Callable[[ConfigFields, str | None], ModelArgs]  # (config fields, position override) -> ModelArgs
    names: NameTable
    qkv: str  # QKV_FUSED | QKV_SEPARATE | QKV_PER_HEAD
    tokenizer: TokenizerFiles
    tiny: TinyLayout


def rope_base(f: ConfigFields) -> float:
    return f.number("rope_parameters.rope_theta", "rope_theta", "rotary_emb_base", "rotary.base", default=10000.0,
                    positive=True)


def rotary_dim(f: ConfigFields, head_dim: int) -> int | None:
    pct = f.number("rope_parameters.partial_rotary_factor", "partial_rotary_factor", "rotary_pct", default=1.0,
                   positive=True)
    return None if pct == 1.0 else int(head_dim * pct)


def sizes(f: ConfigFields, family: str) -> dict[str, Any]:
    """The ModelArgs fields every family reads the same way."""
    return dict(family=family, vocab_size=f.integer("vocab_size"), dim=f.integer("hidden_size"),
                n_layers=f.integer("num_hidden_layers"), n_heads=f.integer("num_attention_heads"))


def kv_heads(f: ConfigFields, heads: int) -> int:
    """num_key_value_heads (grouped-query attention when fewer than the query heads), which must divide them."""
    kv = f.integer("num_key_value_heads", default=heads)
    if heads % kv:
        raise f.error(f"num_key_value_heads={kv} does not divide num_attention_heads={heads}; each K/V head "
                      f"serves num_attention_heads / num_key_value_heads query heads")
    return kv


ROPE_TYPES = ("default", "llama3")


def rope_scaling(f: ConfigFields) -> Llama3RopeScaling | None:
    """``rope_scaling`` (transformers 4) or ``rope_parameters`` (5): none, default, or llama3; any other type
    (linear, dynamic, yarn, ...) is refused rather than run unscaled."""
    for name in ("rope_parameters", "rope_scaling"):
        node = f.optional_object(name)
        if node is None:
            continue
        kind = f.text(f"{name}.rope_type", f"{name}.type", default="default", choices=ROPE_TYPES)
        if kind == "default":
            return None
        return Llama3RopeScaling(
            factor=f.number(f"{name}.factor", positive=True),
            low_freq_factor=f.number(f"{name}.low_freq_factor", positive=True),
            high_freq_factor=f.number(f"{name}.high_freq_factor", positive=True),
            original_max_position_embeddings=f.integer(f"{name}.original_max_position_embeddings"))
    return None


def refuse_sliding_window(f: ConfigFields) -> None:
    """Qwen2 / Qwen3 sliding-window fields: read with their types checked, and refused when enabled (the dense
    Qwen2.5 and Qwen3 models ship it off; sliding_window may be null)."""
    window = f.optional_value("sliding_window")
    if window is not None:
        f.integer("sliding_window")
    if f.has("max_window_layers"):
        f.integer("max_window_layers", minimum=0)
    if f.flag("use_sliding_window", default=False):
        raise f.error(f"use_sliding_window is true (sliding_window={window}); sliding-window attention is not "
                      f"supported: expected use_sliding_window false, as the published dense models have it")


def llama_args(f: ConfigFields, family: str, *, position: str, bias: bool, norm_head: bool,
               o_bias: bool | None = None, qk_norm: bool = False, scaled_rope: bool = False) -> ModelArgs:
    """The Llama layout (Baichuan2, InternLM, Llama, Qwen2, Qwen3): RMSNorm, SwiGLU, grouped-query attention
    where num_key_value_heads says so, an explicit head_dim where the config has one. ``scaled_rope``: the
    family's transformers class applies ``rope_scaling`` (Llama, Qwen2, Qwen3), so it is read (and refused where
    npuinfer does not compute it); Baichuan2's and InternLM's remote code never read that field."""
    common = sizes(f, family)
    heads = common["n_heads"]
    f.text("hidden_act", default="silu", choices=("silu",))
    if f.flag("mlp_bias", default=False):
        raise f.error("mlp_bias is true; biases on gate/up/down projections are not supported")
    return ModelArgs(**common, head_dim=f.head_dim(common["dim"], heads, "head_dim"),
                     intermediate_size=f.integer("intermediate_size"),
                     max_seq_len=f.integer("max_position_embeddings", "model_max_length"),
                     norm_eps=f.number("rms_norm_eps", default=1e-6, positive=True), position=position,
                     rope_base=rope_base(f), qkv_bias=bias, o_bias=bias if o_bias is None else o_bias,
                     norm_head=norm_head, n_kv_heads=kv_heads(f, heads), qk_norm=qk_norm,
                     rope_scaling=rope_scaling(f) if scaled_rope and position == "rope" else None)


LLAMA_NAMES = NameTable(
    top={"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
         "lm_head.weight": "output.weight"},
    layer_prefix="model.layers.",
    layer={"input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
           "self_attn.W_pack.weight": "attention.wqkv.weight",
           **weight_and_bias({f"self_attn.{p}_proj": f"attention.w{p}" for p in "qkvo"}),
           "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
           "mlp.down_proj.weight": "feed_forward.w2.weight"},
)


QK_NORM_NAMES = {"self_attn.q_norm.weight": "attention.q_norm.weight",
                 "self_attn.k_norm.weight": "attention.k_norm.weight"}


def added_token(content: str, **flags: Any) -> dict:
    """A special token as transformers' slow tokenizers write it in tokenizer_config.json."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": True, **flags}
