"""The weight files of a checkpoint directory and their tensors, read without running code from it.

Sharded checkpoints are read through their index; pickled .bin files are opened with ``weights_only=True``;
every file named follows npuinfer.weight_index's rule. (Split from checkpoint.py so that npuinfer.quant can
read float weights without importing the loader that dispatches to it.)
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor

from .hf_config import CheckpointError
from .progress import progress
from .quant_files import quant_weight_files
from .weight_index import check_weight_files, read_index

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a directory, from its index when sharded (npuinfer.weight_index's rule for each)."""
    model_dir = Path(model_dir)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = model_dir / index_name
        if index.is_file():
            return read_index(index, model_dir)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).exists() or (model_dir / single).is_symlink():
            return check_weight_files([model_dir / single], model_dir)
    quantized = quant_weight_files(model_dir)  # a MindIE quantized directory holds only its own files
    if quantized:
        return quantized
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


def own_small_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies of the vectors (norms, biases, per-channel scales) that are slices of a memory-mapped weight file.
    A file's mapping, with every page read from it, lives as long as any of its tensors: when prepacking or an
    int8 copy replaces a file's matrices, these few bytes alone would keep the whole file resident beside the
    replacements (a full-size bf16 Qwen-7B peaked at 22.5 GiB RSS for 14.4 GiB of weights, issue 13). Matrices
    stay mapped: copying them would double the peak."""
    return {k: v.clone() if is_file_memory(v) and (v.dim() < 2 or min(v.shape) == 1) else v for k, v in state.items()}


def is_file_memory(t: Tensor) -> bool:
    """A cpu tensor whose memory torch did not allocate: a memory-mapped file's (safetensors, torch.load(mmap=True);
    such storages cannot be resized)."""
    return t.device.type == "cpu" and t.layout == torch.strided and not t.untyped_storage().resizable()


def _reason(exc: BaseException) -> str:
    """The specific line of torch's weights_only error, without its generic advice to disable the check."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    generic = ("Weights only load failed", "Please file an issue", "Check the documentation")
    specific = [line for line in lines if not line.startswith(generic)]
    return (specific or lines or [type(exc).__name__])[0]


def read_weights(model_dir: Path) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for path in progress(checkpoint_files(model_dir), desc=f"reading {model_dir.name}", unit="file"):
        state.update(read_weight_file(path))
    return state
