"""Named models: the real checkpoints and their tiny stand-ins (pure data; families are in npuinfer.families).

A real name is resolved to a directory through ``--model-path`` or ``$NPUINFER_MODELS_DIR/<name>``;
a tiny name is built by tiny.py into the local cache on first use (both in ``runtime.resolve_model_dir``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int  # as config.json states it (Qwen's is both MLP branches together)
    vocab_size: int
    max_seq_len: int
    position: str = "rope"  # "rope" | "alibi"
    tiny: bool = False
    stand_in: str | None = None  # the tiny model that mimics this one's layout
    num_kv_heads: int | None = None  # grouped-query attention; None: num_heads
    explicit_head_dim: int | None = None  # config.json's head_dim where it is not hidden_size / num_heads (Qwen3)
    tied_embeddings: bool = False  # tie_word_embeddings: no lm_head tensor, the head is the embedding table

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


# Real sizes: used to check a loaded config.json and to plan memory before loading.
_REAL = [
    ModelSpec("qwen-7b", "qwen", 4096, 32, 32, 22016, 151936, 8192, stand_in="qwen-tiny"),
    ModelSpec("qwen-14b", "qwen", 5120, 40, 40, 27392, 152064, 2048, stand_in="qwen-tiny"),
    ModelSpec("baichuan2-7b", "baichuan2", 4096, 32, 32, 11008, 125696, 4096, stand_in="baichuan2-7b-tiny"),
    ModelSpec("baichuan2-13b", "baichuan2", 5120, 40, 40, 13696, 125696, 4096, position="alibi",
              stand_in="baichuan2-13b-tiny"),
    ModelSpec("internlm-7b", "internlm", 4096, 32, 32, 11008, 103168, 2048, stand_in="internlm-tiny"),
    ModelSpec("gpt-neox-20b", "gpt-neox", 6144, 44, 64, 24576, 50432, 2048, stand_in="gpt-neox-tiny"),
    # Grouped-query attention families (their published config.json)
    ModelSpec("qwen2.5-7b-instruct", "qwen2", 3584, 28, 28, 18944, 152064, 32768, stand_in="qwen2-tiny",
              num_kv_heads=4),
    ModelSpec("qwen2.5-14b-instruct", "qwen2", 5120, 48, 40, 13824, 152064, 32768, stand_in="qwen2-tiny",
              num_kv_heads=8),
    ModelSpec("llama-3.1-8b-instruct", "llama", 4096, 32, 32, 14336, 128256, 131072, stand_in="llama3-tiny",
              num_kv_heads=8),
    ModelSpec("qwen3-8b", "qwen3", 4096, 36, 32, 12288, 151936, 40960, stand_in="qwen3-tiny", num_kv_heads=8,
              explicit_head_dim=128),
]

# Tiny stand-ins: several heads and layers, small enough for the suites to run in minutes on 2 cores.
# vocab_size is the embedding rows written to config.json (>= the trained tokenizer, as real models pad).
_TINY = [
    ModelSpec("qwen-tiny", "qwen", 64, 3, 4, 256, 1536, 2048, tiny=True),
    ModelSpec("baichuan2-7b-tiny", "baichuan2", 64, 3, 4, 160, 1024, 2048, tiny=True),
    ModelSpec("baichuan2-13b-tiny", "baichuan2", 64, 3, 4, 160, 1024, 2048, position="alibi", tiny=True),
    ModelSpec("internlm-tiny", "internlm", 64, 3, 4, 160, 1024, 2048, tiny=True),
    ModelSpec("gpt-neox-tiny", "gpt-neox", 64, 3, 4, 256, 1024, 2048, tiny=True),
    # 4 query heads over 2 K/V heads; Qwen2's head tied to the embedding (as Qwen2.5 up to 3B), Qwen3's heads
    # wider than hidden / heads (as Qwen3-0.6B), Llama 3's RoPE scaled (llama3 type)
    ModelSpec("qwen2-tiny", "qwen2", 64, 3, 4, 160, 1024, 2048, tiny=True, num_kv_heads=2, tied_embeddings=True),
    ModelSpec("llama3-tiny", "llama", 64, 3, 4, 160, 1024, 2048, tiny=True, num_kv_heads=2),
    ModelSpec("qwen3-tiny", "qwen3", 64, 3, 4, 160, 1024, 2048, tiny=True, num_kv_heads=2, explicit_head_dim=32),
]

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _REAL + _TINY}
DEFAULT_MODEL = "qwen-tiny"


class ModelNotFound(LookupError):
    pass


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelNotFound(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def models_dir() -> Path | None:
    value = os.environ.get("NPUINFER_MODELS_DIR")
    return Path(value) if value else None


def discover_models() -> list[str]:
    """Registry names that have a directory under $NPUINFER_MODELS_DIR."""
    base = models_dir()
    if base is None:
        return []
    return [spec.name for spec in _REAL if (base / spec.name).is_dir()]
