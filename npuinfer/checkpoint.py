"""Hugging Face checkpoint directory -> ModelArgs + canonical state dict, and back.

Each family's tensor-name table lives here (the converter owns the mapping, model.py only
knows canonical names). Code in the model directory is never imported: config.json is
read as JSON and pickled .bin files are opened with ``weights_only=True``.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from .model import ModelArgs
from .registry import FAMILIES, ModelSpec

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory, file or tensor is not what the family expects."""


# ---------------------------------------------------------------- config.json

MODEL_TYPES = {"qwen": "qwen", "baichuan": "baichuan2", "internlm": "internlm", "llama": "internlm",
               "gpt_neox": "gpt-neox"}


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"{model_dir}: checkpoint directory does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; a Hugging Face checkpoint directory holds config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def detect_family(config: dict, config_path: str = "config.json") -> str:
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{config_path}: model_type {model_type!r} is not supported; expected one of {', '.join(MODEL_TYPES)}"
        )
    return MODEL_TYPES[model_type]


def _get(config: dict, *names: str, default=None, path: str = "config.json"):
    """First present field among ``names``; dotted names look inside nested dicts."""
    for name in names:
        node = config
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if node is not None:
            return node
    if default is None:
        raise CheckpointError(f"{path}: missing field {' or '.join(names)}")
    return default


def _rope_base(config: dict, path: str) -> float:
    return float(_get(config, "rope_parameters.rope_theta", "rope_theta", "rotary_emb_base", "rotary.base",
                      default=10000.0, path=path))


def _check_mha(config: dict, path: str) -> None:
    kv = config.get("num_key_value_heads")
    if kv is not None and kv != config["num_attention_heads"]:
        raise CheckpointError(f"{path}: num_key_value_heads={kv} (grouped-query attention) is not supported; "
                              f"expected {config['num_attention_heads']}")


def args_from_config(config: dict, family: str, *, position: str | None = None, path: str = "config.json",
                     max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs from config.json, reading legacy field names and those transformers 5 writes."""
    g = lambda *names, default=None: _get(config, *names, default=default, path=path)  # noqa: E731
    dim, heads = int(g("hidden_size")), int(g("num_attention_heads"))
    common = dict(family=family, vocab_size=int(g("vocab_size")), dim=dim, n_layers=int(g("num_hidden_layers")),
                  n_heads=heads)
    if family == "qwen":
        # Qwen's dynamic NTK and logn scaling act only beyond seq_length, so the cache stops there.
        args = ModelArgs(**common, head_dim=int(g("kv_channels", default=dim // heads)),
                         intermediate_size=int(g("intermediate_size")) // 2, max_seq_len=int(g("seq_length")),
                         norm_eps=float(g("layer_norm_epsilon", default=1e-6)), rope_base=_rope_base(config, path),
                         qkv_bias=True, o_bias=not g("no_bias", default=True),
                         rotary_dim=_rotary_dim(config, dim // heads, path))
    elif family in ("baichuan2", "internlm"):
        _check_mha(config, path)
        if family == "baichuan2":
            # Baichuan2-13B (ALiBi) ships no max_position_embeddings; the 7B (RoPE) does.
            position = position or ("rope" if "max_position_embeddings" in config else "alibi")
            bias = False
        else:
            position = "rope"
            bias = bool(g("bias", "attention_bias", default=False))
        args = ModelArgs(**common, head_dim=int(g("head_dim", default=dim // heads)),
                         intermediate_size=int(g("intermediate_size")),
                         max_seq_len=int(g("max_position_embeddings", "model_max_length")),
                         norm_eps=float(g("rms_norm_eps", default=1e-6)), position=position,
                         rope_base=_rope_base(config, path), qkv_bias=bias, o_bias=bias,
                         norm_head=family == "baichuan2")
        if g("hidden_act", default="silu") != "silu":
            raise CheckpointError(f"{path}: hidden_act {config['hidden_act']!r} not supported; expected 'silu'")
    elif family == "gpt-neox":
        act = g("hidden_act", default="gelu")
        if act not in ("gelu", "gelu_fast", "gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{path}: hidden_act {act!r} not supported; expected gelu, gelu_fast or gelu_new")
        bias = bool(g("attention_bias", default=True))
        args = ModelArgs(**common, head_dim=dim // heads, intermediate_size=int(g("intermediate_size")),
                         max_seq_len=int(g("max_position_embeddings")), norm="layer",
                         norm_eps=float(g("layer_norm_eps", default=1e-5)), rope_base=_rope_base(config, path),
                         rotary_dim=_rotary_dim(config, dim // heads, path), qkv_bias=bias, o_bias=bias,
                         mlp="gelu", activation="gelu" if act == "gelu" else "gelu_tanh", mlp_bias=True,
                         parallel_residual=bool(g("use_parallel_residual", default=True)))
    else:
        raise CheckpointError(f"family {family!r} not supported; expected one of {', '.join(FAMILIES)}")
    if max_seq_len is not None:
        args = args.with_(max_seq_len=min(args.max_seq_len, max_seq_len))
    return args


def _rotary_dim(config: dict, head_dim: int, path: str) -> int | None:
    pct = float(_get(config, "rope_parameters.partial_rotary_factor", "partial_rotary_factor", "rotary_pct",
                     default=1.0, path=path))
    return None if pct == 1.0 else int(head_dim * pct)


def check_config_matches(spec: ModelSpec, family: str, args: ModelArgs, path: str) -> None:
    """A config.json must describe the registry model it was given as."""
    found = {"family": family, "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
             "num_attention_heads": args.n_heads, "position": args.position}
    expected = {"family": spec.family, "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
                "num_attention_heads": spec.num_heads, "position": spec.position}
    wrong = [f"{key}: expected {expected[key]}, found {found[key]}" for key in expected if expected[key] != found[key]]
    if wrong:
        raise CheckpointError(f"{path} does not describe {spec.name}: " + "; ".join(wrong))


# ---------------------------------------------------------------- weight files


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a directory, from its index when sharded."""
    model_dir = Path(model_dir)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({exc})") from None
            files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).is_file():
            return [model_dir / single]
    from .quant.layout import quant_weight_files  # a MindIE quantized directory holds only its own files

    if quant_weight_files(model_dir):
        return quant_weight_files(model_dir)
    raise CheckpointError(
        f"{model_dir}: no weights found; expected model.safetensors, pytorch_model.bin, "
        f"or an index ({SAFETENSORS_INDEX} / {BIN_INDEX}) with its shards"
    )


def read_weight_file(path: Path) -> dict[str, Tensor]:
    """All tensors of one file, memory-mapped where the format allows."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            # A legacy (pre-zip) torch.save file cannot be memory-mapped; read it whole, still weights_only.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: cannot read weights: the file is corrupt, or its pickle holds objects other "
                              f"than tensors, which are refused (weights_only=True; checkpoint code is never run) "
                              f"({_reason(exc)})") from None
    except Exception as exc:  # truncated or corrupt files raise many kinds of errors
        raise CheckpointError(f"{path}: cannot read weights, the file is truncated or corrupt ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensor name -> tensor")
    return state


def _reason(exc: BaseException) -> str:
    """The specific line of torch's weights_only error, without its generic advice to disable the check."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    generic = ("Weights only load failed", "Please file an issue", "Check the documentation")
    specific = [line for line in lines if not line.startswith(generic)]
    return (specific or lines or [type(exc).__name__])[0]


def read_weights(model_dir: Path) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for path in checkpoint_files(model_dir):
        state.update(read_weight_file(path))
    return state


# ---------------------------------------------------------------- family name tables


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


def _both(pairs: dict[str, str], kinds=("weight", "bias")) -> dict[str, str]:
    return {f"{src}.{k}": f"{dst}.{k}" for src, dst in pairs.items() for k in kinds}


_LLAMA_LIKE = NameTable(
    top={"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
         "lm_head.weight": "output.weight"},
    layer_prefix="model.layers.",
    layer={"input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
           "self_attn.W_pack.weight": "attention.wqkv.weight",
           **_both({f"self_attn.{p}_proj": f"attention.w{p}" for p in "qkvo"}),
           "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
           "mlp.down_proj.weight": "feed_forward.w2.weight"},
)

NAME_TABLES: dict[str, NameTable] = {
    "qwen": NameTable(
        top={"transformer.wte.weight": "tok_embeddings.weight", "transformer.ln_f.weight": "norm.weight",
             "lm_head.weight": "output.weight"},
        layer_prefix="transformer.h.",
        layer={"ln_1.weight": "attention_norm.weight", "ln_2.weight": "ffn_norm.weight",
               **_both({"attn.c_attn": "attention.wqkv", "attn.c_proj": "attention.wo"}),
               # Qwen's MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate.
               "mlp.w2.weight": "feed_forward.w1.weight", "mlp.w1.weight": "feed_forward.w3.weight",
               "mlp.c_proj.weight": "feed_forward.w2.weight"},
    ),
    "baichuan2": _LLAMA_LIKE,
    "internlm": _LLAMA_LIKE,
    "gpt-neox": NameTable(
        # transformers 5 renamed embed_out to lm_head; read both, write the original.
        top={"gpt_neox.embed_in.weight": "tok_embeddings.weight", "embed_out.weight": "output.weight",
             "lm_head.weight": "output.weight",
             **_both({"gpt_neox.final_layer_norm": "norm"})},
        layer_prefix="gpt_neox.layers.",
        layer=_both({"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
                     "attention.query_key_value": "attention.wqkv", "attention.dense": "attention.wo",
                     "mlp.dense_h_to_4h": "feed_forward.w1", "mlp.dense_4h_to_h": "feed_forward.w2"}),
    ),
}

# Buffers some checkpoints carry that hold no weights (recomputed by the model).
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")


def _neox_heads_to_blocks(t: Tensor, heads: int) -> Tensor:
    """GPT-NeoX fuses qkv per head ([h0: q k v][h1: q k v]...); canonical is [Q; K; V]."""
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _neox_blocks_to_heads(t: Tensor, heads: int) -> Tensor:
    return t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def to_canonical(family: str, state: dict[str, Tensor], args: ModelArgs) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Rename a family's tensors to canonical names; returns (state, canonical -> source name)."""
    table = NAME_TABLES[family]
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unknown = []
    for name, tensor in state.items():
        canonical = table.canonical(name)
        if canonical is not None:
            out[canonical], origin[canonical] = tensor, name
        elif not _IGNORED.match(name):
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"unexpected tensors for a {family} checkpoint: {_describe(unknown, state)}")
    width = args.n_heads * args.head_dim
    for i in range(args.n_layers):
        prefix = f"layers.{i}.attention."
        for kind in ("weight", "bias"):
            key = f"{prefix}wqkv.{kind}"
            parts = [f"{prefix}w{p}.{kind}" for p in "qkv"]
            part_shape = (width, args.dim) if kind == "weight" else (width,)
            if any(p in out for p in parts):  # InternLM / Llama: separate projections
                absent = [p for p in parts if p not in out]
                if absent:
                    raise CheckpointError(f"missing tensors for a {family} checkpoint: " + ", ".join(
                        f"{table.original(p) or p} {part_shape}" for p in absent))
                _check_shape(family, [(origin[p], out[p], part_shape) for p in parts])
                out[key] = torch.cat([out.pop(p) for p in parts], dim=0)
                origin[key] = origin.pop(parts[0]).replace("q_proj", "{q,k,v}_proj")
            if family == "gpt-neox" and key in out:
                _check_shape(family, [(origin[key], out[key], (3 * part_shape[0], *part_shape[1:]))])
                out[key] = _neox_heads_to_blocks(out[key], args.n_heads)
    if args.norm_head and "output.weight" in out:
        # Baichuan2's NormHead: the head's rows are L2-normalised before use (in fp32, once).
        head = out["output.weight"]
        out["output.weight"] = torch.nn.functional.normalize(head.float(), dim=-1).to(head.dtype)
    return out, origin


def _check_shape(family: str, items: list[tuple[str, Tensor, tuple]]) -> None:
    bad = [f"{name} is {tuple(t.shape)}, expected {tuple(shape)}" for name, t, shape in items if tuple(t.shape) != shape]
    if bad:
        raise CheckpointError(f"tensors of a {family} checkpoint have the wrong shape: " + "; ".join(bad))


def source_name(family: str, canonical: str) -> str:
    """The family's own checkpoint name for a canonical tensor (for messages)."""
    table = NAME_TABLES.get(family)
    if table is None:
        return canonical
    if family == "internlm" and ".attention.wqkv." in canonical:  # stored as separate q/k/v projections
        name = table.original(canonical.replace(".wqkv.", ".wq."))
        return name.replace("q_proj", "{q,k,v}_proj") if name else canonical
    return table.original(canonical) or canonical


def read_canonical(model_dir: Path, config: dict, family: str, args: ModelArgs) -> tuple[dict[str, Tensor], dict]:
    """A directory's weights under canonical names (a tied head filled from the embedding), with their sources."""
    from .quant.layout import read_canonical_quantized  # the one hook for quantized layouts (npuinfer/quant/)

    quantized = read_canonical_quantized(model_dir, family, args)
    state, origin = quantized or to_canonical(family, read_weights(model_dir), args)
    if "output.weight" not in state and config.get("tie_word_embeddings") and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state, origin


def from_canonical(family: str, state: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Canonical tensors -> the family's real tensor names and fused layouts (used to write checkpoints)."""
    state = dict(state)
    width = args.n_heads * args.head_dim
    for i in range(args.n_layers):
        prefix = f"layers.{i}.attention."
        for kind in ("weight", "bias"):
            key = f"{prefix}wqkv.{kind}"
            if key not in state:
                continue
            if family == "internlm":
                for name, part in zip("qkv", state.pop(key).split(width, dim=0)):
                    state[f"{prefix}w{name}.{kind}"] = part
            elif family == "gpt-neox":
                state[key] = _neox_blocks_to_heads(state[key], args.n_heads)
    table = NAME_TABLES[family]
    out = {}
    for name, tensor in state.items():
        target = table.original(name)
        if target is None:
            raise CheckpointError(f"no {family} name for canonical tensor {name}")
        out[target] = tensor.contiguous()
    return out


def _describe(names: Iterable[str], state: dict[str, Tensor]) -> str:
    names = sorted(names)
    shown = [f"{n} {tuple(state[n].shape)}" if n in state else n for n in names[:20]]
    more = f" ... and {len(names) - 20} more" if len(names) > 20 else ""
    return ", ".join(shown) + more


def check_state_dict(state: dict[str, Tensor], expected: dict[str, torch.Size], origin: dict[str, str],
                     where: str, family: str | None = None) -> None:
    """Missing, unexpected and mis-shaped tensors, named with their checkpoint names and shapes."""
    if family is not None:  # a missing tensor has no origin yet: use the family's own name for it
        origin = {**{n: source_name(family, n) for n in expected}, **origin}
    problems = []
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    if missing:
        problems.append("missing: " + ", ".join(f"{origin.get(n, n)} {tuple(expected[n])}" for n in missing[:20]))
    if unexpected:
        problems.append("unexpected: " + ", ".join(f"{origin.get(n, n)} {tuple(state[n].shape)}" for n in unexpected))
    bad = [n for n in expected if n in state and state[n].shape != expected[n]]
    if bad:
        problems.append("wrong shape: " + ", ".join(
            f"{origin.get(n, n)} is {tuple(state[n].shape)}, expected {tuple(expected[n])}" for n in bad))
    if problems:
        raise CheckpointError(f"{where}: tensors do not match the config: " + "; ".join(problems))


def env_max_seq_len() -> int | None:
    value = os.environ.get("MAX_SEQ_LEN")
    if not value:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"MAX_SEQ_LEN: expected a positive integer, got {value!r}")
    return int(value)
