"""Hugging Face checkpoint directory -> ModelArgs + canonical state dict, and back.

The family records (npuinfer.families) say what each family's names and layouts are. This module puts loading
together: config.json, the weight files (npuinfer.weight_files), the conversion to canonical names
(npuinfer.canonical; model.py only knows canonical names) and, for a quantized directory, npuinfer.quant's
layouts. Code in the model directory is never imported: config.json is read as JSON and pickled .bin files are
opened with ``weights_only=True``. Weights are read from the model directory only, and must be floating point
(except a quantized layout's int8 linears).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor

from .canonical import from_canonical, source_name, to_canonical
from .families import family_of_config, read_model_args
from .hf_config import CheckpointError, read_config
from .model import ModelArgs
from .quant_files import npy_files
from .quant.layout import read_canonical_quantized
from .quant.linear import wrong_dtypes
from .registry import ModelSpec
from .weight_files import BIN_INDEX, SAFETENSORS_INDEX, checkpoint_files, read_weight_file, read_weights

# re-exported: callers meet them here with the rest of loading
__all__ = ["BIN_INDEX", "CheckpointError", "SAFETENSORS_INDEX", "checkpoint_files", "from_canonical", "read_config",
           "read_weight_file", "read_weights", "source_name", "to_canonical"]


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
             "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
             "position": args.position}
    expected = {"family": spec.family, "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
                "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.kv_heads,
                "head_dim": spec.head_dim, "position": spec.position}
    wrong = [f"{key}: expected {expected[key]}, found {found[key]}" for key in expected if expected[key] != found[key]]
    if wrong:
        raise CheckpointError(f"{path} does not describe {spec.name}: " + "; ".join(wrong))


def read_model_config(model_dir: Path, spec: ModelSpec | None = None,
                      max_seq_len: int | None = None) -> tuple[dict, str, ModelArgs]:
    """(config.json, family, ModelArgs) of a checkpoint directory, checked against ``spec`` when the run named a
    registry model: its family first (a clear message for a wrong model type), then its sizes."""
    config = read_config(model_dir)
    config_path = str(Path(model_dir) / "config.json")
    family = detect_family(config, config_path)
    if spec is not None and spec.family != family:
        raise CheckpointError(f"{config_path} describes a {family} model (model_type "
                              f"{config.get('model_type')!r}), not {spec.name} ({spec.family})")
    # Position encoding comes from config.json, never from the name: a name that says ALiBi given a RoPE
    # config is a contradiction that check_config_matches reports.
    args = args_from_config(config, family, path=config_path, max_seq_len=max_seq_len)
    if spec is not None:
        check_config_matches(spec, family, args, config_path)
    return config, family, args


def read_canonical(model_dir: Path, config: dict, family: str, args: ModelArgs) -> tuple[dict[str, Tensor], dict]:
    """A directory's weights under canonical names (a tied head filled from the embedding), with their sources."""
    quantized = read_canonical_quantized(model_dir, family, args)  # the one hook for quantized layouts
    state, origin = quantized or to_canonical(family, read_weights(model_dir), args)
    if "output.weight" not in state and config.get("tie_word_embeddings") and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state, origin


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
    wrong = wrong_dtypes({n: state[n] for n in expected if n in state})  # int8 only where quantized
    if wrong:
        problems.append("wrong dtype: " + ", ".join(
            f"{origin.get(n, n)} is {str(state[n].dtype).removeprefix('torch.')}, expected {dtype}"
            for n, dtype in wrong.items()))
    if problems:
        raise CheckpointError(f"{where}: tensors do not match the config: " + "; ".join(problems))


def env_max_seq_len() -> int | None:
    value = os.environ.get("MAX_SEQ_LEN")
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) <= 0:  # isdigit alone takes '²', which int() refuses
        raise ValueError(f"environment variable MAX_SEQ_LEN: expected a positive integer such as 4096, got {value!r}")
    return int(value)


def checkpoint_identity(model_dir: Path) -> str:
    """Identity of the weights on disk (config + weight file names and sizes), for result caches and tp cuts.

    The older ModelSlim .npy dicts count too: they override the float weights beside them."""
    digest = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    for path in checkpoint_files(model_dir) + npy_files(model_dir):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]
