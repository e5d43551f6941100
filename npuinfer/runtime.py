"""Name or directory -> a ready model: checkpoint + Transformer + tokenizer on a device."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import (
    CheckpointError,
    args_from_config,
    check_config_matches,
    check_state_dict,
    checkpoint_files,
    checkpoint_identity,
    detect_family,
    env_max_seq_len,
    read_canonical,
    read_config,
)
from . import quant
from .decode_graph import compile_decode
from .device import Device, dtype_name, get_device, parse_dtype
from .kernels import MODES as KERNEL_MODES
from .kernels import kernels_for
from .model import ModelArgs, Transformer
from .parallel import dist as tp_dist
from .parallel.cut import PART_DIR
from .parallel.shard import load_shard, reject_part_dir
from .registry import DEFAULT_MODEL, ModelNotFound, ModelSpec, get_spec, models_dir
from .tiny import ensure_tiny
from .tokenizer import load_tokenizer


@dataclass
class LoadedModel:
    name: str  # registry name, or the directory name for --model-path alone
    family: str
    model_dir: Path
    args: ModelArgs
    model: Transformer
    tokenizer: object  # npuinfer.tokenizer.Tokenizer
    device: Device
    dtype: torch.dtype
    # {"quantization": "none" | "W8A16" | "W8A8", "quant_kernel": the matmul its layers run, ...} (npuinfer.quant)
    quantization: dict = field(default_factory=lambda: {"quantization": "none", "quant_kernel": ""})

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def kernels(self):  # npuinfer.kernels.KernelSet
        return self.model.resolve_kernels()

    @property
    def checkpoint_id(self) -> str:
        """Identity of the weights on disk (config + file names and sizes), for result caches."""
        return checkpoint_identity(self.model_dir)


def resolve_model_dir(name: str, model_path: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory for a registry name (tiny ones are built on first use)."""
    spec = get_spec(name)
    if model_path is not None:
        return Path(model_path)
    if spec.tiny:
        return ensure_tiny(name)
    base = models_dir()
    if base is not None and (base / name).is_dir():
        return base / name
    where = f"$NPUINFER_MODELS_DIR/{name} ({base / name} does not exist)" if base else "$NPUINFER_MODELS_DIR/<name>"
    raise ModelNotFound(
        f"model {name!r} needs its checkpoint directory: pass --model-path DIR, or put the download at {where}. "
        f"To try the harness without weights use the tiny stand-in --model {spec.stand_in}"
    )


class ModelUnavailable(LookupError):
    """A model named on the command line has no usable checkpoint: the message says what was looked for,
    what was wrong with it, and the stand-in to try instead."""


def locate_model(name: str | None, model_path: str | Path | None = None, *, tp: int = 1,
                 dummy_weights: bool = False) -> Path | None:
    """Where a model's checkpoint is, checked before anything is loaded (config.json read, weight files
    present, no tensor read): the one place a session start or ``npuinfer infer`` asks. None for a tiny
    model without ``model_path`` (built on first use). Raises ModelUnavailable.

    ``dummy_weights``: a real name whose checkpoint is missing runs on random weights of its real size
    (helper wt-15's --dummy-weights; until it lands nothing passes True).
    """
    if name is None and model_path is None:
        raise ModelUnavailable("give a model name (--model) or a checkpoint directory (--model-path)")
    try:
        spec = get_spec(name) if name is not None else None
    except ModelNotFound as exc:
        raise ModelUnavailable(str(exc)) from None
    if model_path is not None:
        return _checked_dir(Path(model_path), spec, tp, f"--model-path {model_path}")
    if spec.tiny:
        return None
    base = models_dir()
    if base is not None and (base / spec.name).is_dir():
        return _checked_dir(base / spec.name, spec, tp, f"$NPUINFER_MODELS_DIR/{spec.name}")
    if dummy_weights:
        return None
    try:
        resolve_model_dir(spec.name)  # the registry's own message: both places looked at, and the stand-in
    except ModelNotFound as exc:
        raise ModelUnavailable(str(exc)) from None
    raise AssertionError("resolve_model_dir found a directory locate_model did not")  # pragma: no cover


def _checked_dir(model_dir: Path, spec: ModelSpec | None, tp: int, looked_at: str) -> Path:
    """``model_dir`` if it holds a checkpoint of ``spec``'s family and size, else ModelUnavailable."""
    try:
        config = read_config(model_dir)
        config_path = str(model_dir / "config.json")
        family = detect_family(config, config_path)
        if spec is not None and spec.family != family:
            raise CheckpointError(f"{config_path} describes a {family} model (model_type "
                                  f"{config.get('model_type')!r}), not {spec.name} ({spec.family})")
        if spec is not None:
            check_config_matches(spec, family, args_from_config(config, family, path=config_path), config_path)
        if not (tp > 1 and (model_dir / PART_DIR).is_dir()):  # tp nodes may hold only their part_model/ shards
            checkpoint_files(model_dir)
    except CheckpointError as exc:
        stand_in = spec.name if spec is not None and spec.tiny else (spec.stand_in if spec is not None else None)
        hint = (f"the tiny stand-in --model {stand_in}" if stand_in
                else f"a tiny stand-in such as --model {DEFAULT_MODEL} (without --model-path)")
        raise ModelUnavailable(f"{looked_at}: not a usable checkpoint: {exc}. To try the harness without "
                               f"weights use {hint}") from None
    return model_dir


def default_dtype(device: Device) -> torch.dtype:
    return torch.float16 if device.is_accelerator else torch.float32


def load_model(
    name: str | None = None,
    model_path: str | Path | None = None,
    device: str | Device = "auto",
    dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
    attention: str = "sdpa",
    compile: bool = False,
    kernels: str = "fused",
) -> LoadedModel:
    """Load a registry model (``name``) or any supported directory (``model_path``) ready to run.

    ``kernels``: "fused" (the device's fused ops, each checked against plain torch here first) or "plain"."""
    if kernels not in KERNEL_MODES:
        raise ValueError(f"--kernels: expected one of {', '.join(KERNEL_MODES)}, got {kernels!r}")

    if name is None and model_path is None:
        raise ValueError("give a model name (--model) or a checkpoint directory (--model-path)")
    spec: ModelSpec | None = get_spec(name) if name else None
    model_dir = resolve_model_dir(name, model_path) if name else Path(model_path)
    dev = device if isinstance(device, Device) else get_device(device, tp_dist.local_rank())
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else (dtype or default_dtype(dev))
    dev.check_dtype(torch_dtype)

    config = read_config(model_dir)
    config_path = str(model_dir / "config.json")
    family = detect_family(config, config_path)
    if spec is not None and spec.family != family:
        raise CheckpointError(f"{config_path} describes a {family} model (model_type "
                              f"{config.get('model_type')!r}), not {spec.name} ({spec.family})")
    cap = max_seq_len if max_seq_len is not None else env_max_seq_len()
    # Position encoding comes from config.json, never from the name: a name that says ALiBi given a RoPE
    # config is a contradiction that check_config_matches reports.
    args = args_from_config(config, family, path=config_path, max_seq_len=cap)
    if spec is not None:
        check_config_matches(spec, family, args, config_path)

    parallel = tp_dist.tp_world()  # (world size, rank) under torch.distributed, else None
    if compile and parallel is not None:
        raise ValueError("--compile is not supported with tensor parallelism (--tp > 1) yet: the all-reduce "
                         "after each row-parallel layer is outside the captured graph; drop one of the two")
    if parallel is not None:  # tensor parallel: this rank reads only part_model/{rank}
        args = args.with_(tp_size=parallel[0], tp_rank=parallel[1])
        state, origin = load_shard(model_dir, config, args)
    else:
        reject_part_dir(config, model_dir)
        state, origin = read_canonical(model_dir, config, family, args)
    with torch.device("meta"):
        model = Transformer(args)
    quant.swap_linears(model, quant.plan_from_state(state))  # int8 layers where the tensors are quantized
    expected = {k: v.shape for k, v in model.state_dict().items()}
    # missing tensors are named as the family's files name them (part_model/ files hold canonical names)
    check_state_dict(state, expected, origin, str(model_dir), family if parallel is None else None)
    state = {k: v.to(device=dev.torch_device, dtype=quant.load_dtype(k, v, torch_dtype)) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    model.eval().requires_grad_(False)
    model.set_attention(attention)
    model.use_kernels(kernels_for(args, dev.torch_device, torch_dtype, kernels))  # the self-check runs here
    quantization = quant.prepare(model, dev.type, torch_dtype)
    if compile:
        compile_decode(model, dev)
    if parallel is not None:
        tp_dist.install_all_reduce(model)  # sum the row-parallel partial outputs (attention wo, mlp w2)

    tokenizer = load_tokenizer(model_dir, family)
    return LoadedModel(name or model_dir.name, family, model_dir, args, model, tokenizer, dev, torch_dtype,
                       quantization)

