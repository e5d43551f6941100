"""Baichuan2 (7B with RoPE, 13B with ALiBi): Llama names with a fused W_pack, NormHead, tokenizer.model."""
from __future__ import annotations

from ..hf_config import ConfigFields
from ..model import ModelArgs
from ..registry import ModelSpec
from .base import LLAMA_NAMES, QKV_FUSED, Family, TinyLayout, TinyTokenizer, TokenizerFiles, added_token, llama_args


def read_args(f: ConfigFields, position: str | None = None) -> ModelArgs:
    # Baichuan2-13B (ALiBi) ships no max_position_embeddings; the 7B (RoPE) does.
    position = position or ("rope" if f.has("max_position_embeddings") else "alibi")
    return llama_args(f, "baichuan2", position=position, bias=False, norm_head=True)


def tiny_config(spec: ModelSpec, base: dict, ids: dict) -> dict:
    config = {"architectures": ["BaichuanForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                           "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
              "tokenizer_class": "BaichuanTokenizer", "model_type": "baichuan", **base, **ids,
              "hidden_act": "silu", "model_max_length": spec.max_seq_len, "rms_norm_eps": 1e-6,
              "z_loss_weight": 0, "gradient_checkpointing": False, "torch_dtype": "bfloat16",
              "transformers_version": "4.29.2", "_from_model_config": True}
    if spec.position == "rope":  # the 7B states it; the ALiBi 13B does not
        config["max_position_embeddings"] = spec.max_seq_len
    return config


_TOKENS = {"bos_token": added_token("<s>"), "eos_token": added_token("</s>"), "pad_token": added_token("<unk>"),
           "unk_token": added_token("<unk>")}

FAMILY = Family(
    name="baichuan2",
    title="Baichuan2",
    model_types=("baichuan",),
    architectures=("BaichuanForCausalLM",),
    read_args=read_args,
    names=LLAMA_NAMES,
    qkv=QKV_FUSED,
    tokenizer=TokenizerFiles(files=("tokenizer.json", "tokenizer.model"), add_bos=False),
    tiny=TinyLayout(
        weights="bin",
        config=tiny_config,
        # Baichuan 2 neither normalizes nor adds a dummy prefix (its technical report, section 2.2).
        tokenizer=TinyTokenizer(kind="sentencepiece", vocab_size=1000, add_dummy_prefix=False, extra_files={
            "tokenizer_config.json": {
                "add_bos_token": False,
                "add_eos_token": False,
                "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
                "bos_token": _TOKENS["bos_token"],
                "clean_up_tokenization_spaces": False,
                "eos_token": _TOKENS["eos_token"],
                "model_max_length": 4096,
                "pad_token": _TOKENS["pad_token"],
                "sp_model_kwargs": {},
                "tokenizer_class": "BaichuanTokenizer",
                "unk_token": _TOKENS["unk_token"],
            },
            "special_tokens_map.json": {key: {k: v for k, v in value.items() if k != "__type"}
                                        for key, value in _TOKENS.items()},
        }),
    ),
)
