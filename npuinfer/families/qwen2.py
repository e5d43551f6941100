"""Qwen2 / Qwen2.5: the Llama layout with q/k/v biases (no o bias), grouped-query attention, tied embeddings in
the small sizes, sliding-window fields read and refused when enabled, tokenizer.json."""
from __future__ import annotations

from ..hf_config import ConfigFields
from ..model import ModelArgs
from ..registry import ModelSpec
from .base import LLAMA_NAMES, QKV_SEPARATE, QWEN_PAT_STR, Family, TinyLayout, TinyTokenizer, TokenizerFiles, \
    llama_args, refuse_sliding_window

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def read_args(f: ConfigFields, position: str | None = None) -> ModelArgs:
    refuse_sliding_window(f)
    return llama_args(f, "qwen2", position="rope", bias=True, o_bias=False, norm_head=False, scaled_rope=True)


def tiny_config(spec: ModelSpec, base: dict, ids: dict) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, **base, **ids, "hidden_act": "silu",
            "max_position_embeddings": spec.max_seq_len, "max_window_layers": spec.num_layers, "model_type": "qwen2",
            "num_key_value_heads": spec.kv_heads, "rms_norm_eps": 1e-6, "rope_scaling": None,
            "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": spec.tied_embeddings,
            "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_sliding_window": False}


def qwen_tokenizer_config(eos: str) -> dict:
    """tokenizer_config.json as Qwen2.5 / Qwen3 publish it (without the chat template and added-token table)."""
    return {"add_bos_token": False, "add_prefix_space": False, "bos_token": None,
            "clean_up_tokenization_spaces": False, "eos_token": eos, "errors": "replace",
            "model_max_length": 131072, "pad_token": ENDOFTEXT, "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}


FAMILY = Family(
    name="qwen2",
    title="Qwen2",
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    read_args=read_args,
    names=LLAMA_NAMES,
    qkv=QKV_SEPARATE,
    tokenizer=TokenizerFiles(files=("tokenizer.json",), add_bos=False),  # Qwen2Tokenizer adds no bos
    tiny=TinyLayout(
        weights="safetensors",
        config=tiny_config,
        # Qwen2's tokenizer.json: Qwen's split pattern, byte-level, the special tokens after the learned ids.
        tokenizer=TinyTokenizer(kind="split-byte-level-bpe", vocab_size=1000, split_pattern=QWEN_PAT_STR,
                                special_tokens=(ENDOFTEXT, IM_START, IM_END),
                                extra_files={"tokenizer_config.json": qwen_tokenizer_config(IM_END)}),
    ),
)
