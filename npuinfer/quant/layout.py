"""MindIE / msModelSlim safetensors layout: ``quant_model_weight_w8a16.safetensors`` (or ``_w8a8``, or a
sharded set with ``quant_model_weight*.safetensors.index.json``) plus ``quant_model_description*.json``.

The description maps every tensor name to its type: ``"FLOAT"`` for tensors left in floating point,
``"W8A16"`` / ``"W8A8"`` for a quantized linear's ``weight`` (int8 [n, k]) and its parameters, and holds
``"model_quant_type"``. Tensor names are the family's own (``transformer.h.0.attn.c_attn.weight_scale``,
``model.layers.0.self_attn.W_pack.deq_scale``): a quantized linear is its float name plus the parameter.
Here they are mapped onto canonical names (npuinfer/model.py), fused layouts keeping their scales row by row.
Which files make a quantized directory is files.py's business (the loader asks it without importing this).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..canonical import blocks_to_per_head, from_canonical, per_head_to_blocks, to_canonical
from ..families import QKV_PER_HEAD, QKV_SEPARATE, get_family
from ..hf_config import CheckpointError, read_json_object
from ..model import ModelArgs
from ..quant_files import QuantFiles, find_quant_files, has_npy_layout
from .linear import QUANT_PARAMS, ROW_PARAMS, TENSOR_PARAMS, plan_from_state, split_param
from .npy_dict import read_npy_layout
from .scheme import SCHEMES

FLOAT = "FLOAT"
META_KEYS = ("model_quant_type", "kv_cache_type", "version", "group_size")


def read_description(path: Path) -> tuple[str, dict[str, str]]:
    """(model_quant_type, tensor name -> type), checked."""
    desc = read_json_object(path, " of tensor name -> quantization type")
    scheme = desc.get("model_quant_type")
    if scheme not in SCHEMES:
        raise CheckpointError(f"{path}: model_quant_type {scheme!r} is not supported; expected one of "
                              f"{', '.join(SCHEMES)}")
    if desc.get("kv_cache_type") not in (None, "", FLOAT):
        raise CheckpointError(f"{path}: kv_cache_type {desc['kv_cache_type']!r} (a quantized KV cache) is not "
                              f"supported; expected none")
    types = {k: v for k, v in desc.items() if k not in META_KEYS}
    bad = [f"{k}: {v!r}" for k, v in types.items() if v not in (FLOAT, *SCHEMES)]
    if bad:
        raise CheckpointError(f"{path}: unknown tensor types ({', '.join(bad[:5])}); expected FLOAT, "
                              f"{' or '.join(SCHEMES)}")
    return scheme, types


def read_quant_files(files: QuantFiles) -> dict[str, Tensor]:
    """The tensors of the layout, each one the description names present, and described consistently."""
    state: dict[str, Tensor] = {}
    for path in files.weights:
        try:
            state.update(load_file(str(path)))
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read weights, the file is truncated or corrupt "
                                  f"({type(exc).__name__})") from None
    _, types = read_description(files.description)
    where = ", ".join(p.name for p in files.weights)
    missing = [n for n in types if n not in state]
    if missing:
        raise CheckpointError(f"{files.description}: names tensors that {where} does not hold: "
                              f"{', '.join(f'{n} ({types[n]})' for n in missing[:10])}"
                              f"{f' and {len(missing) - 10} more' if len(missing) > 10 else ''}")
    undescribed = [n for n in state if n not in types]
    if undescribed:
        raise CheckpointError(f"{files.description}: does not describe tensors of {where}: "
                              f"{', '.join(undescribed[:10])}")
    wrong = [n for n, t in state.items() if (t.dtype == torch.int8) != (types[n] != FLOAT)
             and split_param(n)[1] == "weight"]
    if wrong:
        raise CheckpointError(f"{files.description}: types disagree with the tensors (an int8 weight must be typed "
                              f"W8A16/W8A8, a float one FLOAT): {', '.join(f'{n} {types[n]} {state[n].dtype}' for n in wrong[:5])}")
    return state


# ---------------------------------------------------------------- family names <-> canonical, with parameters


def quant_to_canonical(family: str, state: dict[str, Tensor], args: ModelArgs
                       ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Like canonical.to_canonical, for a state that also holds quantization parameters."""
    record = get_family(family)
    table = record.names
    extras = {n: t for n, t in state.items() if split_param(n)[1] in QUANT_PARAMS}
    quantized = {f"{split_param(n)[0]}.weight" for n in extras}  # their weights are int8
    out, origin = to_canonical(family, {n: t for n, t in state.items() if n not in extras}, args, int8=quantized)
    params: dict[str, dict[str, Tensor]] = {}
    for name, tensor in extras.items():
        prefix, param = split_param(name)
        canonical = table.canonical(f"{prefix}.weight")
        if canonical is None:
            raise CheckpointError(f"unexpected quantization tensor for a {family} checkpoint: {name} "
                                  f"{tuple(tensor.shape)}")
        cprefix = canonical[: -len(".weight")]
        params.setdefault(cprefix, {})[param] = tensor
        origin[f"{cprefix}.{param}"] = name
    for i in range(args.n_layers):
        parts = [f"layers.{i}.attention.w{p}" for p in "qkv"]
        fused = f"layers.{i}.attention.wqkv"
        if any(p in params for p in parts):  # q/k/v stored (and quantized) separately: fused here row by row
            groups = [params.get(p) for p in parts]
            if any(g is None or g.keys() != groups[0].keys() for g in groups):
                raise CheckpointError(f"layer {i}: the q, k and v projections must be quantized alike "
                                      f"({', '.join(table.original(p + '.weight') or p for p in parts)})")
            merged = {}
            for param in groups[0]:
                pieces = [g[param] for g in groups]
                if param in TENSOR_PARAMS:
                    if not all(torch.equal(pieces[0], x) for x in pieces[1:]):
                        raise CheckpointError(f"layer {i}: q, k and v have different {param} although they read "
                                              f"the same input; npuinfer fuses them into one W8A8 matmul")
                    merged[param] = pieces[0]
                else:
                    merged[param] = torch.cat(pieces, dim=0)
                source = origin[f"{parts[0]}.{param}"].replace("q_proj", "{q,k,v}_proj")
                for p in parts:
                    origin.pop(f"{p}.{param}")
                origin[f"{fused}.{param}"] = source
            for p in parts:
                del params[p]
            params[fused] = merged
        if record.qkv == QKV_PER_HEAD and fused in params:  # per-output-row parameters follow the rows
            for param in ROW_PARAMS:
                if param in params[fused]:
                    params[fused][param] = per_head_to_blocks(params[fused][param], args.n_heads)
    for cprefix, group in params.items():
        for param, tensor in group.items():
            out[f"{cprefix}.{param}"] = tensor
    return out, origin


def quant_from_canonical(family: str, state: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Canonical tensors (quantization parameters included) -> the family's names and fused layouts."""
    record = get_family(family)
    table = record.names
    extras = {n: t for n, t in state.items() if split_param(n)[1] in QUANT_PARAMS}
    out = from_canonical(family, {n: t for n, t in state.items() if n not in extras}, args)
    for name, tensor in extras.items():
        cprefix, param = split_param(name)
        pieces = {cprefix: tensor}
        if cprefix.endswith("attention.wqkv"):
            if record.qkv == QKV_SEPARATE:
                base = cprefix[: -len("wqkv")]
                # per-tensor parameters are copied to each of q, k, v (safetensors refuses shared storage)
                if param in ROW_PARAMS:  # rows of Q, then K and V (n_kv_heads wide each)
                    split = tensor.split(list(args.qkv_widths), dim=0)
                else:
                    split = [tensor.clone() for _ in "qkv"]
                pieces = {f"{base}w{p}": part for p, part in zip("qkv", split)}
            elif record.qkv == QKV_PER_HEAD and param in ROW_PARAMS:
                pieces = {cprefix: blocks_to_per_head(tensor, args.n_heads)}
        for prefix, part in pieces.items():
            original = table.original(f"{prefix}.weight")
            if original is None:
                raise CheckpointError(f"no {family} name for canonical tensor {prefix}.{param}")
            out[f"{original[: -len('weight')]}{param}"] = part.contiguous()
    return out


def describe_tensors(state: dict[str, Tensor], scheme: str) -> dict[str, str]:
    """The description of a family-named state: quantized linears' weight and parameters typed ``scheme``."""
    quantized = {split_param(n)[0] for n in state if split_param(n)[1] in QUANT_PARAMS}
    types = {"model_quant_type": scheme}
    for name in sorted(state):
        prefix, param = split_param(name)
        types[name] = scheme if prefix in quantized and param != "bias" else FLOAT
    return types


def read_canonical_quantized(model_dir: Path, family: str, args: ModelArgs
                             ) -> tuple[dict[str, Tensor], dict[str, str]] | None:
    """The loader hook: canonical tensors of a quantized directory (MindIE safetensors, or the older ModelSlim
    .npy dicts beside float weights), or None for a float one."""
    files = find_quant_files(model_dir)
    if files is not None:
        state = read_quant_files(files)
    elif has_npy_layout(model_dir):
        state = read_npy_layout(model_dir)
    else:
        return None
    state, origin = quant_to_canonical(family, state, args)
    if not plan_from_state(state):
        where = files.description if files is not None else model_dir
        raise CheckpointError(f"{where}: a quantized layout without any quantized linear (no weight_scale or "
                              f"deq_scale tensors)")
    return state, origin

