"""InternLM: separate q/k/v/o projections with biases (``bias``); Llama checkpoints are the llama family's."""
from __future__ import annotations

from ..hf_config import ConfigFields
from ..model import ModelArgs
from ..registry import ModelSpec
from .base import LLAMA_NAMES, QKV_SEPARATE, Family, TinyLayout, TinyTokenizer, TokenizerFiles, llama_args


def read_args(f: ConfigFields, position: str | None = None) -> ModelArgs:
    return llama_args(f, "internlm", position="rope", bias=f.flag("bias", "attention_bias", default=False),
                      norm_head=False)


def tiny_config(spec: ModelSpec, base: dict, ids: dict) -> dict:
    return {"architectures": ["InternLMForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_internlm.InternLMConfig",
                         "AutoModel": "modeling_internlm.InternLMForCausalLM",
                         "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
            "model_type": "internlm", **base, **ids, "bias": True, "hidden_act": "silu",
            "max_position_embeddings": spec.max_seq_len, "rms_norm_eps": 1e-6, "torch_dtype": "float16",
            "transformers_version": "4.33.1"}


FAMILY = Family(
    name="internlm",
    title="InternLM",
    model_types=("internlm",),
    architectures=("InternLMForCausalLM",),
    read_args=read_args,
    names=LLAMA_NAMES,
    qkv=QKV_SEPARATE,
    # InternLMTokenizer adds bos unless tokenizer_config.json says otherwise.
    tokenizer=TokenizerFiles(files=("tokenizer.json", "tokenizer.model"), add_bos=True),
    tiny=TinyLayout(
        weights="bin",
        config=tiny_config,
        tokenizer=TinyTokenizer(kind="sentencepiece", vocab_size=1000, add_dummy_prefix=True, extra_files={
            # As published in internlm/internlm-7b: no add_bos_token key, InternLMTokenizer defaults it to True.
            "tokenizer_config.json": {
                "auto_map": {"AutoTokenizer": ["tokenization_internlm.InternLMTokenizer", None]},
                "bos_token": "<s>",
                "clean_up_tokenization_spaces": False,
                "eos_token": "</s>",
                "model_max_length": 1000000000000000019884624838656,
                "pad_token": "</s>",
                "tokenizer_class": "InternLMTokenizer",
                "unk_token": "<unk>",
            },
            "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
                                        "unk_token": "<unk>"},
        }),
    ),
)
