"""Model families, one record each: what config.json says it is, how its fields become ModelArgs, its tensor
names and qkv layout, the tokenizer files it may hold, and the layout of its tiny checkpoint.

A new family is a new module here with a ``FAMILY`` record, listed in ``FAMILIES`` below (plus its named
models in registry.py). No other module branches on a family's name.
"""
from __future__ import annotations

from ..hf_config import CheckpointError, ConfigFields
from ..model import ModelArgs
from . import baichuan2, gpt_neox, internlm, llama, qwen, qwen2, qwen3
from .base import QKV_FUSED, QKV_PER_HEAD, QKV_SEPARATE, Family, NameTable

FAMILIES: dict[str, Family] = {f.name: f for f in (qwen.FAMILY, baichuan2.FAMILY, internlm.FAMILY, gpt_neox.FAMILY,
                                                  llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY)}

__all__ = ["FAMILIES", "Family", "NameTable", "QKV_FUSED", "QKV_PER_HEAD", "QKV_SEPARATE", "family_of_config",
           "get_family", "read_model_args"]


def get_family(name: str | Family) -> Family:
    """The record of a family name (``gpt_neox`` and ``GPT-NeoX`` spell ``gpt-neox`` too)."""
    if isinstance(name, Family):
        return name
    key = name.strip().lower().replace("_", "-")
    if key not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILIES[key]


def family_of_config(config: dict, config_path: str = "config.json") -> Family:
    """The family a config.json describes: by model_type, or by architectures when model_type is absent."""
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    architectures = config.get("architectures")
    if model_type is None and isinstance(architectures, list):
        for family in FAMILIES.values():
            if any(arch in family.architectures for arch in architectures):
                return family
    types = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    archs = ", ".join(a for f in FAMILIES.values() for a in f.architectures)
    raise CheckpointError(f"{config_path}: model_type {model_type!r} is not supported; expected one of {types} "
                          f"(or, without model_type, architectures naming one of {archs})")


def read_model_args(config: dict, family: str | Family, *, position: str | None = None,
                    path: str = "config.json") -> ModelArgs:
    """ModelArgs from config.json through the family's reader; wrong types and impossible sizes are refused."""
    return get_family(family).read_args(ConfigFields(config, path), position)
