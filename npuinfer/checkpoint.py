"""Hugging Face checkpoint directory -> ModelArgs + canonical state dict, and back.

The family records (npuinfer.families) say what each family's names and layouts are; this module reads the
files and converts (model.py only knows canonical names). Code in the model directory is never imported:
config.json is read as JSON and pickled .bin files are opened with ``weights_only=True``. Weights are read
from the model directory only, and must be floating point.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path, PurePosixPath
from typing import Iterable

import torch
from torch import Tensor

from .families import QKV_PER_HEAD, QKV_SEPARATE, family_of_config, get_family, read_model_args
from .hf_config import CheckpointError, read_config
from .model import ModelArgs
from .registry import ModelSpec

__all__ = ["CheckpointError", "read_config"]  # re-exported: callers meet them here with the rest of loading

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


# ---------------------------------------------------------------- config.json


def detect_family(config: dict, config_path: str = "config.json") -> str:
    """The name of the family config.json describes (see npuinfer.families)."""
    return family_of_config(config, config_path).name


def args_from_config(config: dict, family: str, *, position: str | None = None, path: str = "config.json",
                     max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs from config.json, reading legacy field names and those transformers 5 writes."""
    args = read_model_args(config, family, position=position, path=path)
    if max_seq_len is not None:
        args = args.with_(max_seq_len=min(args.max_seq_len, max_seq_len))
    return args


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
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
            outside = [name for name in dict.fromkeys(weight_map.values()) if not _inside(name)]
            if outside:
                raise CheckpointError(f"{index} names weight files outside {model_dir}: {', '.join(outside)}; "
                                      f"weights are read from the model directory only")
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


def _inside(name: str) -> bool:
    """An index's file name stays inside the model directory: relative, no '..' (symlinks, as the Hugging Face
    cache uses them, are the directory's own business)."""
    path = PurePosixPath(name.replace("\\", "/"))
    return bool(name) and not path.is_absolute() and ".." not in path.parts and ":" not in name


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


# ---------------------------------------------------------------- names and layouts


# Buffers some checkpoints carry that hold no weights (recomputed by the model).
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")


def _per_head_to_blocks(t: Tensor, heads: int) -> Tensor:
    """qkv fused per head ([h0: q k v][h1: q k v]..., GPT-NeoX) -> canonical [Q; K; V]."""
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _blocks_to_per_head(t: Tensor, heads: int) -> Tensor:
    return t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def to_canonical(family: str, state: dict[str, Tensor], args: ModelArgs) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Rename a family's tensors to canonical names; returns (state, canonical -> source name)."""
    record = get_family(family)
    table = record.names
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
    _check_floating(out, origin, family)  # before q/k/v are concatenated, which would promote an int part
    width = args.n_heads * args.head_dim
    for i in range(args.n_layers):
        prefix = f"layers.{i}.attention."
        for kind in ("weight", "bias"):
            key = f"{prefix}wqkv.{kind}"
            parts = [f"{prefix}w{p}.{kind}" for p in "qkv"]
            part_shape = (width, args.dim) if kind == "weight" else (width,)
            if any(p in out for p in parts):  # separate q/k/v projections (InternLM, Llama)
                absent = [p for p in parts if p not in out]
                if absent:
                    raise CheckpointError(f"missing tensors for a {family} checkpoint: " + ", ".join(
                        f"{table.original(p) or p} {part_shape}" for p in absent))
                _check_shape(family, [(origin[p], out[p], part_shape) for p in parts])
                out[key] = torch.cat([out.pop(p) for p in parts], dim=0)
                origin[key] = origin.pop(parts[0]).replace("q_proj", "{q,k,v}_proj")
            if record.qkv == QKV_PER_HEAD and key in out:
                _check_shape(family, [(origin[key], out[key], (3 * part_shape[0], *part_shape[1:]))])
                out[key] = _per_head_to_blocks(out[key], args.n_heads)
    if args.norm_head and "output.weight" in out:
        # Baichuan2's NormHead: the head's rows are L2-normalised before use (in fp32, once).
        head = out["output.weight"]
        out["output.weight"] = torch.nn.functional.normalize(head.float(), dim=-1).to(head.dtype)
    return out, origin


def _check_floating(state: dict[str, Tensor], origin: dict[str, str], where: str) -> None:
    bad = [f"{origin.get(n, n)} is {str(t.dtype).removeprefix('torch.')}" for n, t in state.items()
           if not t.is_floating_point()]
    if bad:
        raise CheckpointError(f"a {where} checkpoint holds integer or bool tensors where floating point weights "
                              f"belong: "
                              + ", ".join(bad))


def _check_shape(family: str, items: list[tuple[str, Tensor, tuple]]) -> None:
    bad = [f"{name} is {tuple(t.shape)}, expected {tuple(shape)}" for name, t, shape in items if tuple(t.shape) != shape]
    if bad:
        raise CheckpointError(f"tensors of a {family} checkpoint have the wrong shape: " + "; ".join(bad))


def source_name(family: str, canonical: str) -> str:
    """The family's own checkpoint name for a canonical tensor (for messages)."""
    record = get_family(family)
    if record.qkv == QKV_SEPARATE and ".attention.wqkv." in canonical:  # stored as separate q/k/v projections
        name = record.names.original(canonical.replace(".wqkv.", ".wq."))
        return name.replace("q_proj", "{q,k,v}_proj") if name else canonical
    return record.names.original(canonical) or canonical


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
    record = get_family(family)
    state = dict(state)
    width = args.n_heads * args.head_dim
    for i in range(args.n_layers):
        prefix = f"layers.{i}.attention."
        for kind in ("weight", "bias"):
            key = f"{prefix}wqkv.{kind}"
            if key not in state:
                continue
            if record.qkv == QKV_SEPARATE:
                for name, part in zip("qkv", state.pop(key).split(width, dim=0)):
                    state[f"{prefix}w{name}.{kind}"] = part
            elif record.qkv == QKV_PER_HEAD:
                state[key] = _blocks_to_per_head(state[key], args.n_heads)
    table = record.names
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
    not_float = [n for n in expected if n in state and not state[n].is_floating_point()]
    if not_float:
        problems.append("not floating point: " + ", ".join(
            f"{origin.get(n, n)} is {str(state[n].dtype).removeprefix('torch.')}" for n in not_float))
    if problems:
        raise CheckpointError(f"{where}: tensors do not match the config: " + "; ".join(problems))


def env_max_seq_len() -> int | None:
    value = os.environ.get("MAX_SEQ_LEN")
    if not value:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"MAX_SEQ_LEN: expected a positive integer, got {value!r}")
    return int(value)


def checkpoint_identity(model_dir: Path) -> str:
    """Identity of the weights on disk (config + weight file names and sizes), for result caches and tp cuts."""
    digest = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    for path in checkpoint_files(model_dir):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]
