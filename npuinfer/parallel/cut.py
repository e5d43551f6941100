"""Cut a checkpoint into ``part_model/{rank}/``: one folder per tensor-parallel rank.

Each folder holds ``config.json`` and safetensors weights. config.json is the checkpoint's own
config.json with one field added::

    "npuinfer_tp": {
        "format": 1,                  # bumped when the shard layout changes; older cuts must be redone
        "tp_size": 2,                 # ranks the checkpoint was cut for
        "rank": 0,                    # the rank this folder belongs to
        "family": "qwen",             # npuinfer family the weights were read as
        "source_checkpoint": "…",     # checkpoint.checkpoint_identity of the parent (config, file names, sizes)
        "source_digest": "…",         # sha256 of bytes sampled from each weight file (same-size checkpoints differ)
        "layout": "canonical"         # tensor names are npuinfer.model's canonical names
    }

The weights are in canonical names (see npuinfer/model.py), already converted from the family's
fused layout (Qwen contiguous [Q|K|V], Baichuan2 W_pack, InternLM separate q/k/v, GPT-NeoX per-head
qkv) and already split, so a rank reads nothing but its own tensors:

- column-parallel (output features split): ``attention.wqkv`` by heads, taking the rank's heads from
  each of the Q, K and V blocks (grouped-query attention: the rank's share of the K/V heads, or, where tp
  exceeds the K/V heads, the one K/V head its query heads read, replicated to tp / n_kv_heads ranks as vLLM
  does); Qwen3's per-head q/k norms are replicated; ``feed_forward.w1`` and ``w3`` (gate and up) by rows. Biases split
  the same way.
- row-parallel (input features split): ``attention.wo`` by the columns of the rank's heads and
  ``feed_forward.w2`` (down) by the columns of its rows of w1/w3. Each rank's partial output is
  summed by an all-reduce; their biases are kept on rank 0 and zero elsewhere, so a bias is added once.
- replicated: norms, ``tok_embeddings`` and ``output`` (the head). Baichuan2's NormHead is normalised
  over the full rows when the checkpoint is canonicalised, before the cut, so every rank holds the
  same normalised head.
- W8 checkpoints (npuinfer.quant): int8 weights split like float ones; per-output-channel parameters
  (weight_scale, weight_offset, deq_scale, quant_bias) go with the rows of column-parallel layers and are
  replicated for row-parallel ones, whose row-parallel W8A8 quant_bias is re-split so the ranks' int32
  partial sums add up exactly; per-tensor activation scales (input_scale, input_offset) are replicated.
- ALiBi slopes are not weights: the model computes the slopes of its own heads from ``tp_rank``.

Embedding and head are replicated rather than vocab-parallel on purpose. A vocab-parallel head
leaves each rank with a slice of the logits, so greedy decoding would need a gather (or an
argmax-and-index reduce) every step and accuracy scoring a gather of full log-probabilities; a
vocab-parallel embedding needs one more all-reduce per forward. Replicated, every rank computes
the same full logits and picks the same token with no extra communication. The price is memory:
qwen-7b's embedding and head are 2 x 151936 x 4096 fp16 = 2.5 GB per rank, about 9 GB per rank at
tp=2 instead of 7.7 GB; gpt-neox-20b's are 1.2 GB. That fits the 32-64 GB devices these models run on.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import fsync_tree, recover_interrupted_swap, swap_directory
from ..checkpoint import read_canonical as read_canonical_weights
from ..checkpoint import (
    args_from_config,
    check_state_dict,
    checkpoint_identity,
    detect_family,
    read_config,
)
from ..model import ModelArgs, Transformer
from ..progress import progress
from ..quant.linear import QUANT_PARAMS, TENSOR_PARAMS, plan_from_state, swap_linears
from .layout import FORMAT, PART_DIR, TP_KEY, content_digest, part_dir

MAX_FILE_BYTES = 4 << 30  # split a rank's weights into files of at most this size, with an index

COLUMN_BY_HEADS = ("attention.wqkv.weight", "attention.wqkv.bias")
COLUMN = ("feed_forward.w1.weight", "feed_forward.w1.bias", "feed_forward.w3.weight", "feed_forward.w3.bias")
ROW = ("attention.wo.weight", "feed_forward.w2.weight")
ROW_BIAS = ("attention.wo.bias", "feed_forward.w2.bias")


class CutError(ValueError):
    """A checkpoint cannot be cut for the asked tensor parallel size."""


def check_tp(args: ModelArgs, tp: int, where: str) -> None:
    """tp must divide the attention heads and the MLP width (per branch for SwiGLU), and divide the K/V heads or
    be a multiple of them (each K/V head is then replicated to tp / n_kv_heads ranks)."""
    if tp < 1:
        raise CutError(f"tensor parallel size must be >= 1, got {tp}")
    wrong = [f"{what} {n}" for what, n in (("attention heads", args.n_heads),
                                          ("MLP width (intermediate size per branch)", args.intermediate_size))
             if n % tp]
    if wrong:
        raise CutError(f"{where}: tensor parallel size {tp} does not divide the {' nor the '.join(wrong)}; "
                       f"choose a tp that divides both")
    if args.n_kv_heads % tp and tp % args.n_kv_heads:
        raise CutError(f"{where}: tensor parallel size {tp} neither divides the {args.n_kv_heads} K/V heads nor is a "
                       f"multiple of them; choose a tp that does one or the other")


def _heads(tensor: Tensor, args: ModelArgs, tp: int, rank: int) -> Tensor:
    """The rank's query heads of the Q block and its K/V heads (its share, or its replicated head) of K and V."""
    local = args.with_(tp_size=tp, tp_rank=rank)
    d = args.head_dim
    q, k, v = tensor.split([args.n_heads * d, args.n_kv_heads * d, args.n_kv_heads * d], dim=0)
    q_rows = slice(rank * local.n_local_heads * d, (rank + 1) * local.n_local_heads * d)
    kv_rows = slice(local.kv_head_start * d, (local.kv_head_start + local.n_local_kv_heads) * d)
    return torch.cat([q[q_rows], k[kv_rows], v[kv_rows]], dim=0)


def shard_tensor(name: str, tensor: Tensor, args: ModelArgs, tp: int, rank: int) -> Tensor:
    """Rank ``rank``'s piece of the canonical tensor ``name`` (a view where possible)."""
    suffix = name.split(".", 2)[2] if name.startswith("layers.") else name
    linear, _, param = suffix.rpartition(".")
    if param in QUANT_PARAMS:  # W8 (npuinfer.quant): int8 weights split as float ones, above and below
        return _shard_quant_param(name, f"{linear}.weight", param, tensor, args, tp, rank)
    if suffix in COLUMN_BY_HEADS:
        return _heads(tensor, args, tp, rank)
    if suffix in COLUMN:
        return tensor.chunk(tp, dim=0)[rank]
    if suffix in ROW:
        return tensor.chunk(tp, dim=1)[rank]
    if suffix in ROW_BIAS:
        return tensor if rank == 0 else torch.zeros_like(tensor)
    return tensor  # norms, embedding, head: replicated


def _shard_quant_param(name: str, weight: str, param: str, tensor: Tensor, args: ModelArgs, tp: int,
                       rank: int) -> Tensor:
    """Per-output-channel parameters go with the weight's rows; per-tensor activation scales are replicated;
    a row-parallel layer's rows are not split, so its per-channel scales are replicated too."""
    if param in TENSOR_PARAMS or weight in ROW:
        if weight in ROW and param == "quant_bias":
            raise CutError(f"{name}: a row-parallel quant_bias is split by shard_state (it needs the weights)")
        return tensor
    if weight in COLUMN_BY_HEADS:
        return _heads(tensor, args, tp, rank)
    if weight in COLUMN:
        return tensor.chunk(tp, dim=0)[rank]
    raise CutError(f"{name}: quantization parameter of a layer that is not tensor parallel")


def _row_quant_bias(state: dict[str, Tensor], prefix: str, tp: int, rank: int) -> Tensor:
    """quant_bias of rank ``rank`` for a row-parallel W8A8 linear.

    quant_bias = round(bias / deq_scale) - input_offset * sum_k(weight); each rank sums its own columns of the
    weight, so rank r takes -input_offset * sum over its columns, and rank 0 also the folded float bias: the
    ranks' int32 partial products then add up (by the all-reduce) to exactly the unsharded output.
    """
    weight, offset = state[f"{prefix}.weight"].long(), state[f"{prefix}.input_offset"].double()
    if not torch.equal(offset, offset.round()):
        raise CutError(f"{prefix}.input_offset = {offset.tolist()} is not an integer; its quant_bias cannot be split "
                       f"exactly across ranks")
    off = int(offset.round().item())
    partial = -off * weight.chunk(tp, dim=1)[rank].sum(dim=1)
    if rank == 0:
        partial = partial + state[f"{prefix}.quant_bias"].long() + off * weight.sum(dim=1)
    if partial.abs().max() >= 2**31:
        raise CutError(f"{prefix}.quant_bias of rank {rank} overflows int32")
    return partial.to(torch.int32)


def shard_state(state: dict[str, Tensor], args: ModelArgs, tp: int, rank: int) -> dict[str, Tensor]:
    out = {}
    for name, t in state.items():
        prefix, _, param = name.rpartition(".")
        row_linear = name.startswith("layers.") and f"{prefix.split('.', 2)[2]}.weight" in ROW
        if param == "quant_bias" and row_linear:
            out[name] = _row_quant_bias(state, prefix, tp, rank)
        else:
            out[name] = shard_tensor(name, t, args, tp, rank)
    return out


def read_checkpoint_args(model_dir: Path) -> tuple[dict, str, ModelArgs]:
    """config.json, family and (unsharded) ModelArgs of an original checkpoint directory."""
    config = read_config(model_dir)
    if TP_KEY in config:
        raise CutError(f"{model_dir} is a tensor-parallel shard (its config.json has {TP_KEY}), not a checkpoint; "
                       f"use the directory that holds {PART_DIR}/")
    config_path = str(Path(model_dir) / "config.json")
    family = detect_family(config, config_path)
    return config, family, args_from_config(config, family, path=config_path)


def read_canonical(model_dir: Path, config: dict, family: str, args: ModelArgs) -> dict[str, Tensor]:
    """The full canonical state, checked against the unsharded model."""
    state, origin = read_canonical_weights(model_dir, config, family, args)
    check_state_dict(state, _expected(args, plan_from_state(state)), origin, str(model_dir))
    return state


def _expected(args: ModelArgs, plan: dict | None = None) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = Transformer(args)
        swap_linears(model, plan or {})  # W8 layers where the checkpoint is quantized
        return {k: v.shape for k, v in model.state_dict().items()}


def cut_checkpoint(model_dir: str | os.PathLike, tp: int) -> list[Path]:
    """Write ``model_dir/part_model/{0..tp-1}/``; returns the rank folders.

    Everything is checked before the first file is written; the folders are written under a
    temporary name and renamed into place, so a failed or interrupted cut leaves no partial part_model.
    An existing part_model (another tp size, an older cut) is replaced.
    """
    model_dir = Path(model_dir)
    config, family, args = read_checkpoint_args(model_dir)
    check_tp(args, tp, str(model_dir))  # before reading any weights
    state = read_canonical(model_dir, config, family, args)
    source = {"source_checkpoint": checkpoint_identity(model_dir), "source_digest": content_digest(model_dir)}
    shards = []
    for rank in range(tp):
        shard = shard_state(state, args, tp, rank)
        check_state_dict(shard, _expected(args.with_(tp_size=tp, tp_rank=rank), plan_from_state(state)), {},
                         f"rank {rank} of the cut")
        shards.append(shard)

    recover_interrupted_swap(model_dir / PART_DIR)
    staging = _staging_dir(model_dir)
    try:
        for rank, shard in enumerate(progress(shards, desc=f"writing part_model/ for tp {tp}", unit="rank")):
            out = staging / str(rank)
            out.mkdir()
            meta = {"format": FORMAT, "tp_size": tp, "rank": rank, "family": family, **source, "layout": "canonical"}
            (out / "config.json").write_text(
                json.dumps({**config, TP_KEY: meta}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            _save(shard, out, f"{rank}/{tp}")
        fsync_tree(staging)  # on disk before it is swapped in: a crash after the swap leaves no torn shard
        swap_directory(staging, model_dir / PART_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [part_dir(model_dir, rank) for rank in range(tp)]


def _save(state: dict[str, Tensor], out: Path, label: str) -> None:
    """One model.safetensors, or numbered files with an index when larger than MAX_FILE_BYTES."""
    from safetensors.torch import save_file

    files: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if files[-1] and size + nbytes > MAX_FILE_BYTES:
            files.append({})
            size = 0
        files[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt", TP_KEY: label}
    if len(files) == 1:
        save_file(_owned(files[0]), str(out / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, part in enumerate(files, 1):
        fname = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        save_file(_owned(part), str(out / fname), metadata=metadata)
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _owned(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses views of larger tensors and tensors sharing memory (tied embeddings)
    return {name: t.contiguous().clone() for name, t in state.items()}


def _staging_dir(parent: Path) -> Path:
    """A new hidden directory next to part_model (mkdir, so the umask applies as to any folder)."""
    path = parent / f".{PART_DIR}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path
