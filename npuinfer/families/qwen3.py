"""Qwen3 dense: the Llama layout with per-head q/k RMSNorm before RoPE, no qkv bias, an explicit head_dim that
may differ from hidden_size / heads, grouped-query attention, tokenizer.json."""
from __future__ import annotations

from ..hf_config import ConfigFields
from ..model import ModelArgs
from ..registry import ModelSpec
from .base import LLAMA_NAMES, QK_NORM_NAMES, QKV_SEPARATE, QWEN_PAT_STR, Family, NameTable, TinyLayout, \
    TinyTokenizer, TokenizerFiles, llama_args, refuse_sliding_window
from .qwen2 import ENDOFTEXT, IM_END, IM_START, qwen_tokenizer_config


def read_args(f: ConfigFields, position: str | None = None) -> ModelArgs:
    refuse_sliding_window(f)
    return llama_args(f, "qwen3", position="rope", bias=f.flag("attention_bias", default=False), norm_head=False,
                      qk_norm=True, scaled_rope=True)


def tiny_config(spec: ModelSpec, base: dict, ids: dict) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, **base,
            **ids, "head_dim": spec.head_dim, "hidden_act": "silu", "max_position_embeddings": spec.max_seq_len,
            "max_window_layers": spec.num_layers, "model_type": "qwen3", "num_key_value_heads": spec.kv_heads,
            "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
            "tie_word_embeddings": spec.tied_embeddings, "torch_dtype": "bfloat16",
            "transformers_version": "4.51.0", "use_sliding_window": False}


FAMILY = Family(
    name="qwen3",
    title="Qwen3",
    model_types=("qwen3",),
    architectures=("Qwen3ForCausalLM",),
    read_args=read_args,
    names=NameTable(top=LLAMA_NAMES.top, layer_prefix=LLAMA_NAMES.layer_prefix,
                    layer={**LLAMA_NAMES.layer, **QK_NORM_NAMES}),
    qkv=QKV_SEPARATE,
    tokenizer=TokenizerFiles(files=("tokenizer.json",), add_bos=False),
    tiny=TinyLayout(
        weights="safetensors",
        config=tiny_config,
        tokenizer=TinyTokenizer(kind="split-byte-level-bpe", vocab_size=1000, split_pattern=QWEN_PAT_STR,
                                special_tokens=(ENDOFTEXT, IM_START, IM_END, "<think>", "</think>"),
                                extra_files={"tokenizer_config.json": qwen_tokenizer_config(IM_END)}),
    ),
)
