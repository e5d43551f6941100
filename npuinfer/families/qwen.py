"""Qwen v1 (Qwen-7B, Qwen-14B): fused c_attn with bias, w2-gated SwiGLU, qwen.tiktoken."""
from __future__ import annotations

from ..hf_config import ConfigFields
from ..model import ModelArgs
from ..registry import ModelSpec
from .base import QKV_FUSED, Family, NameTable, TinyLayout, TinyTokenizer, TokenizerFiles, rope_base, rotary_dim, \
    sizes, weight_and_bias


def read_args(f: ConfigFields, position: str | None = None) -> ModelArgs:
    common = sizes(f, "qwen")
    # Qwen's attention splits c_attn's output by hidden_size / heads: kv_channels must equal that.
    head_dim = f.head_dim(common["dim"], common["n_heads"])
    kv_channels = f.integer("kv_channels", default=head_dim)
    if kv_channels != head_dim:
        raise f.error(f"kv_channels={kv_channels}, expected hidden_size / num_attention_heads = {head_dim}")
    # intermediate_size counts both MLP branches. Dynamic NTK and logn scaling act only beyond seq_length,
    # so the cache stops there.
    return ModelArgs(**common, head_dim=head_dim, intermediate_size=f.integer("intermediate_size") // 2,
                     max_seq_len=f.integer("seq_length"),
                     norm_eps=f.number("layer_norm_epsilon", default=1e-6, positive=True), rope_base=rope_base(f),
                     qkv_bias=True, o_bias=not f.flag("no_bias", default=True), rotary_dim=rotary_dim(f, head_dim))


def tiny_config(spec: ModelSpec, base: dict, ids: dict) -> dict:
    return {"architectures": ["QWenLMHeadModel"],
            "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                         "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
            "model_type": "qwen", **base, "kv_channels": spec.head_dim, "layer_norm_epsilon": 1e-6,
            "max_position_embeddings": spec.max_seq_len, "seq_length": spec.max_seq_len,
            "rotary_emb_base": 10000, "rotary_pct": 1.0, "no_bias": True, "scale_attn_weights": True,
            "use_dynamic_ntk": True, "use_logn_attn": True, "use_flash_attn": "auto",
            "attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0, "bf16": False, "fp16": False, "fp32": False,
            "onnx_safe": None, "tokenizer_class": "QWenTokenizer", "transformers_version": "4.32.0"}


FAMILY = Family(
    name="qwen",
    title="Qwen",
    model_types=("qwen",),
    architectures=("QWenLMHeadModel",),
    read_args=read_args,
    names=NameTable(
        top={"transformer.wte.weight": "tok_embeddings.weight", "transformer.ln_f.weight": "norm.weight",
             "lm_head.weight": "output.weight"},
        layer_prefix="transformer.h.",
        layer={"ln_1.weight": "attention_norm.weight", "ln_2.weight": "ffn_norm.weight",
               **weight_and_bias({"attn.c_attn": "attention.wqkv", "attn.c_proj": "attention.wo"}),
               # Qwen's MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate.
               "mlp.w2.weight": "feed_forward.w1.weight", "mlp.w1.weight": "feed_forward.w3.weight",
               "mlp.c_proj.weight": "feed_forward.w2.weight"},
    ),
    qkv=QKV_FUSED,
    tokenizer=TokenizerFiles(files=("tokenizer.json", "qwen.tiktoken"), add_bos=False),  # Qwen has no bos
    tiny=TinyLayout(
        weights="safetensors",
        config=tiny_config,
        tokenizer=TinyTokenizer(kind="qwen.tiktoken", vocab_size=1200, extra_files={
            # As published in Qwen/Qwen-7B (no special_tokens_map.json there).
            "tokenizer_config.json": {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
                                      "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}},
        }),
    ),
)
