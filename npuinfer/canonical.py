"""A family's tensor names and fused qkv layouts <-> the canonical names model.py knows.

The family records (npuinfer.families) say what the names and layouts are; this module converts. (Split from
checkpoint.py so that npuinfer.quant can convert its quantized tensors without importing the loader.)
"""
from __future__ import annotations

import re
from typing import Collection, Iterable

import torch
from torch import Tensor

from .families import QKV_PER_HEAD, QKV_SEPARATE, get_family
from .hf_config import CheckpointError
from .model import ModelArgs

# Buffers some checkpoints carry that hold no weights (recomputed by the model).
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")


def per_head_to_blocks(t: Tensor, heads: int) -> Tensor:
    """qkv fused per head ([h0: q k v][h1: q k v]..., GPT-NeoX) -> canonical [Q; K; V]."""
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def blocks_to_per_head(t: Tensor, heads: int) -> Tensor:
    return t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def to_canonical(family: str, state: dict[str, Tensor], args: ModelArgs, *, int8: Collection[str] = ()
                 ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Rename a family's tensors to canonical names; returns (state, canonical -> source name).

    ``int8``: source names that may hold int8 (a quantized layout's linear weights, see npuinfer.quant);
    every other tensor must be floating point."""
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
    _check_floating(out, origin, family, set(int8))  # before q/k/v are concatenated, which would promote an int part
    widths = args.qkv_widths
    for i in range(args.n_layers):
        prefix = f"layers.{i}.attention."
        for kind in ("weight", "bias"):
            key = f"{prefix}wqkv.{kind}"
            parts = [f"{prefix}w{p}.{kind}" for p in "qkv"]
            part_shapes = [(w, args.dim) if kind == "weight" else (w,) for w in widths]
            if any(p in out for p in parts):  # separate q/k/v projections (InternLM, Llama, Qwen2, Qwen3)
                absent = [(p, shape) for p, shape in zip(parts, part_shapes) if p not in out]
                if absent:
                    raise CheckpointError(f"missing tensors for a {family} checkpoint: " + ", ".join(
                        f"{table.original(p) or p} {shape}" for p, shape in absent))
                _check_shape(family, [(origin[p], out[p], shape) for p, shape in zip(parts, part_shapes)])
                out[key] = torch.cat([out.pop(p) for p in parts], dim=0)
                origin[key] = origin.pop(parts[0]).replace("q_proj", "{q,k,v}_proj")
            if record.qkv == QKV_PER_HEAD and key in out:
                _check_shape(family, [(origin[key], out[key], (sum(widths), *part_shapes[0][1:]))])
                out[key] = per_head_to_blocks(out[key], args.n_heads)
    if args.norm_head and "output.weight" in out:
        # Baichuan2's NormHead: the head's rows are L2-normalised before use (in fp32, once).
        head = out["output.weight"]
        out["output.weight"] = torch.nn.functional.normalize(head.float(), dim=-1).to(head.dtype)
    return out, origin


def _check_floating(state: dict[str, Tensor], origin: dict[str, str], where: str, int8: set[str]) -> None:
    bad = [f"{origin.get(n, n)} is {str(t.dtype).removeprefix('torch.')}" for n, t in state.items()
           if not t.is_floating_point() and not (t.dtype == torch.int8 and origin.get(n, n) in int8)]
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


def from_canonical(family: str, state: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Canonical tensors -> the family's real tensor names and fused layouts (used to write checkpoints)."""
    record = get_family(family)
    state = dict(state)
    for i in range(args.n_layers):
        prefix = f"layers.{i}.attention."
        for kind in ("weight", "bias"):
            key = f"{prefix}wqkv.{kind}"
            if key not in state:
                continue
            if record.qkv == QKV_SEPARATE:
                for name, part in zip("qkv", state.pop(key).split(list(args.qkv_widths), dim=0)):
                    state[f"{prefix}w{name}.{kind}"] = part
            elif record.qkv == QKV_PER_HEAD:
                state[key] = blocks_to_per_head(state[key], args.n_heads)
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
