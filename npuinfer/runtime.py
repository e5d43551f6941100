"""Name or directory -> a ready model: checkpoint + Transformer + tokenizer on a device."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import (
    CheckpointError,
    args_from_config,
    check_config_matches,
    check_state_dict,
    checkpoint_files,
    detect_family,
    env_max_seq_len,
    read_canonical,
    read_config,
)
from . import quant
from .device import Device, dtype_name, get_device, parse_dtype
from .model import ModelArgs, Transformer
from .parallel import dist as tp_dist
from .registry import ModelSpec, get_spec, resolve_model_dir


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
    def checkpoint_id(self) -> str:
        """Identity of the weights on disk (config + file names and sizes), for result caches."""
        return checkpoint_identity(self.model_dir)


def checkpoint_identity(model_dir: Path) -> str:
    digest = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    from .quant.npy_dict import npy_files  # the older ModelSlim .npy dicts override float weights beside them

    for path in checkpoint_files(model_dir) + npy_files(model_dir):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


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
) -> LoadedModel:
    """Load a registry model (``name``) or any supported directory (``model_path``) ready to run."""
    from .tokenizer import load_tokenizer

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
        from .parallel.shard import load_shard

        args = args.with_(tp_size=parallel[0], tp_rank=parallel[1])
        state, origin = load_shard(model_dir, config, args)
    else:
        from .parallel.shard import reject_part_dir

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
    quantization = quant.prepare(model, dev.type, torch_dtype)
    if compile:
        from .decode_graph import compile_decode

        compile_decode(model, dev)
    if parallel is not None:
        tp_dist.install_all_reduce(model)  # sum the row-parallel partial outputs (attention wo, mlp w2)

    tokenizer = load_tokenizer(model_dir, family)
    return LoadedModel(name or model_dir.name, family, model_dir, args, model, tokenizer, dev, torch_dtype,
                       quantization)


def config_summary(loaded: LoadedModel) -> str:
    a = loaded.args
    return json.dumps({"model": loaded.name, "family": a.family, "layers": a.n_layers, "hidden": a.dim,
                       "heads": a.n_heads, "params": a.num_parameters(), "device": str(loaded.device),
                       "dtype": loaded.dtype_name, "max_seq_len": a.max_seq_len, **loaded.quantization})
