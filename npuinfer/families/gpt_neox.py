"""GPT-NeoX (gpt-neox-20b): per-head fused qkv, partial rotary, parallel residual, LayerNorm, tokenizer.json."""
from __future__ import annotations

from ..hf_config import ConfigFields
from ..model import ModelArgs
from ..registry import ModelSpec
from .base import QKV_PER_HEAD, Family, NameTable, TinyLayout, TinyTokenizer, TokenizerFiles, rope_base, rotary_dim, \
    sizes, weight_and_bias

ENDOFTEXT = "<|endoftext|>"
PADDING = "<|padding|>"
GELUS = {"gelu": "gelu", "gelu_fast": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def read_args(f: ConfigFields, position: str | None = None) -> ModelArgs:
    common = sizes(f, "gpt-neox")
    act = f.text("hidden_act", default="gelu", choices=tuple(GELUS))
    bias = f.flag("attention_bias", default=True)
    head_dim = f.head_dim(common["dim"], common["n_heads"])
    return ModelArgs(**common, head_dim=head_dim, intermediate_size=f.integer("intermediate_size"),
                     max_seq_len=f.integer("max_position_embeddings"), norm="layer",
                     norm_eps=f.number("layer_norm_eps", default=1e-5, positive=True), rope_base=rope_base(f),
                     rotary_dim=rotary_dim(f, head_dim), qkv_bias=bias, o_bias=bias, mlp="gelu",
                     activation=GELUS[act], mlp_bias=True,
                     parallel_residual=f.flag("use_parallel_residual", default=True))


def tiny_config(spec: ModelSpec, base: dict, ids: dict) -> dict:
    return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **base, **ids,
            "hidden_act": "gelu_fast", "layer_norm_eps": 1e-5, "max_position_embeddings": spec.max_seq_len,
            "rotary_emb_base": 10000, "rotary_pct": 0.25, "use_parallel_residual": True,
            "attention_probs_dropout_prob": 0, "hidden_dropout_prob": 0, "torch_dtype": "float16",
            "transformers_version": "4.24.0"}


FAMILY = Family(
    name="gpt-neox",
    title="GPT-NeoX",
    model_types=("gpt_neox",),
    architectures=("GPTNeoXForCausalLM",),
    read_args=read_args,
    names=NameTable(
        # transformers 5 renamed embed_out to lm_head; read both, write the original.
        top={"gpt_neox.embed_in.weight": "tok_embeddings.weight", "embed_out.weight": "output.weight",
             "lm_head.weight": "output.weight",
             **weight_and_bias({"gpt_neox.final_layer_norm": "norm"})},
        layer_prefix="gpt_neox.layers.",
        layer=weight_and_bias({"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
                               "attention.query_key_value": "attention.wqkv", "attention.dense": "attention.wo",
                               "mlp.dense_h_to_4h": "feed_forward.w1", "mlp.dense_4h_to_h": "feed_forward.w2"}),
    ),
    qkv=QKV_PER_HEAD,
    # GPT-NeoX pads with <|padding|> (its own training code does) unless the config names a pad token.
    tokenizer=TokenizerFiles(files=("tokenizer.json",), add_bos=False,
                             specials={"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": PADDING}),
    tiny=TinyLayout(
        weights="safetensors",
        config=tiny_config,
        # Same pipeline as gpt-neox-20b's tokenizer.json: NFC, byte-level without prefix space.
        tokenizer=TinyTokenizer(kind="byte-level-bpe", vocab_size=1000, special_tokens=(ENDOFTEXT, PADDING),
                                extra_files={
            "tokenizer_config.json": {"add_prefix_space": False, "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT,
                                      "tokenizer_class": "GPTNeoXTokenizer", "unk_token": ENDOFTEXT},
            "special_tokens_map.json": {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT},
        }),
    ),
)
