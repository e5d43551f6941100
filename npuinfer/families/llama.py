"""Llama (Llama-2, Llama-3): separate q/k/v/o projections (with biases when attention_bias says so), grouped-query
attention, RoPE with rope_theta and rope_scaling of type llama3, tokenizer.json (Llama 3) or tokenizer.model."""
from __future__ import annotations

from ..hf_config import ConfigFields
from ..model import ModelArgs
from ..registry import ModelSpec
from .base import LLAMA_NAMES, QKV_SEPARATE, Family, TinyLayout, TinyTokenizer, TokenizerFiles, llama_args, \
    added_token

# Llama 3's pre-tokenizer pattern (its tokenizer.json): digits in groups of up to three.
LLAMA3_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
BEGIN, END, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


def read_args(f: ConfigFields, position: str | None = None) -> ModelArgs:
    return llama_args(f, "llama", position="rope", bias=f.flag("attention_bias", default=False), norm_head=False,
                      scaled_rope=True)


def tiny_config(spec: ModelSpec, base: dict, ids: dict) -> dict:
    # Llama-3.1's RoPE settings. A stand-in shorter than Llama 3's 8192 pre-training context gets a quarter of its
    # own length instead (transformers warns unless it is below max_position_embeddings): at the tiny head size
    # (16) that still leaves two frequencies unscaled, one interpolated and five divided by the factor.
    original = 8192 if spec.max_seq_len > 8192 else spec.max_seq_len // 4
    return {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, **base,
            **ids, "hidden_act": "silu", "max_position_embeddings": spec.max_seq_len, "mlp_bias": False,
            "model_type": "llama", "num_key_value_heads": spec.kv_heads, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": original, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": spec.tied_embeddings, "torch_dtype": "bfloat16",
            "transformers_version": "4.43.0.dev0"}


FAMILY = Family(
    name="llama",
    title="Llama",
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    read_args=read_args,
    names=LLAMA_NAMES,
    qkv=QKV_SEPARATE,
    # LlamaTokenizer (Llama-2's tokenizer.model) adds bos; Llama 3's tokenizer.json adds it by its post-processor.
    tokenizer=TokenizerFiles(files=("tokenizer.json", "tokenizer.model"), add_bos=True),
    tiny=TinyLayout(
        weights="safetensors",
        config=tiny_config,
        tokenizer=TinyTokenizer(kind="split-byte-level-bpe", vocab_size=1000, split_pattern=LLAMA3_PAT_STR,
                                special_tokens=(BEGIN, END, "<|start_header_id|>", "<|end_header_id|>", EOT),
                                bos_template=True, extra_files={
            # As published in meta-llama/Llama-3.1-8B-Instruct (no pad token; the chat template left out).
            "tokenizer_config.json": {"bos_token": BEGIN, "clean_up_tokenization_spaces": True, "eos_token": EOT,
                                      "model_input_names": ["input_ids", "attention_mask"],
                                      "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"},
            "special_tokens_map.json": {"bos_token": added_token(BEGIN, single_word=False, normalized=False),
                                        "eos_token": added_token(EOT, single_word=False, normalized=False)},
        }),
    ),
)
