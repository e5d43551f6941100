"""Name or directory -> a ready model: checkpoint + Transformer + tokenizer on a device."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import check_state_dict, checkpoint_identity, env_max_seq_len, read_canonical, read_model_config
from . import dummy, quant
from .decode_graph import compile_decode
from .device import Device, dtype_name, get_device, parse_dtype
from .kernels import MODES as KERNEL_MODES
from .kernels import kernels_for
from .model import ModelArgs, Transformer
from .parallel import dist as tp_dist
from .parallel.shard import load_shard, reject_part_dir
from .quant.files import find_quant_files, has_npy_layout
from .locate import resolve_model_dir
from .options import RunConfig
from .registry import ModelSpec, get_spec
from .tiny import ensure_tiny
from .tokenizer import load_tokenizer
from .weight_files import own_small_tensors


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
    dummy_seed: int | None = None  # set when the weights are seeded random ones (npuinfer.dummy), not a checkpoint

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def kernels(self):  # npuinfer.kernels.KernelSet
        return self.model.resolve_kernels()

    @property
    def weights(self) -> str:
        """The ``weights`` column of rows: ``checkpoint`` or ``dummy(seed N)``."""
        return "checkpoint" if self.dummy_seed is None else f"dummy(seed {self.dummy_seed})"

    @property
    def checkpoint_id(self) -> str:
        """Identity of the weights on disk (config + file names and sizes), for result caches."""
        if self.dummy_seed is not None:
            return dummy.dummy_identity(self.args, self.dummy_seed)
        return checkpoint_identity(self.model_dir)


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
    dummy_weights: bool = False,
    seed: int = 0,
    memory_limit: int | None = None,
) -> LoadedModel:
    """Load a registry model (``name``) or any supported directory (``model_path``) ready to run.

    ``kernels``: "fused" (the device's fused ops, each checked against plain torch here first) or "plain".
    ``dummy_weights``: the real shapes with seeded random weights made on the device (npuinfer.dummy), refused
    before allocating when they cannot fit ``memory_limit`` / the device / the host.
    """
    if kernels not in KERNEL_MODES:
        raise ValueError(f"--kernels: expected one of {', '.join(KERNEL_MODES)}, got {kernels!r}")

    if name is None and model_path is None:
        raise ValueError("give a model name (--model) or a checkpoint directory (--model-path)")
    if dummy_weights:
        return _load_dummy(name, model_path, device, dtype, max_seq_len, attention, compile, seed, memory_limit,
                           kernels)
    spec: ModelSpec | None = get_spec(name) if name else None
    model_dir = resolve_model_dir(name, model_path) if name else Path(model_path)
    dev = device if isinstance(device, Device) else get_device(device, tp_dist.local_rank())
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else (dtype or default_dtype(dev))
    dev.check_dtype(torch_dtype)

    cap = max_seq_len if max_seq_len is not None else env_max_seq_len()
    config, family, args = read_model_config(model_dir, spec, cap)

    parallel = tp_dist.tp_world()  # (world size, rank) under torch.distributed, else None
    if compile and parallel is not None:
        raise ValueError("--compile is not supported with tensor parallelism (--tp > 1) yet: the all-reduce "
                         "after each row-parallel layer is outside the captured graph; drop one of the two")
    if parallel is not None:  # tensor parallel: this rank reads only part_model/{rank}
        args = args.with_(tp_size=parallel[0], tp_rank=parallel[1])
    else:
        reject_part_dir(config, model_dir)
    # --memory-limit (and the device, the host) hold for a checkpoint as for dummy weights: refused before reading
    dummy.check_fits(args, torch_dtype, dev, memory_limit, str(model_dir), weights="checkpoint",
                     int8_linears=find_quant_files(model_dir) is not None or has_npy_layout(model_dir))
    if parallel is not None:
        state, origin = load_shard(model_dir, config, args)
    else:
        state, origin = read_canonical(model_dir, config, family, args)
    with torch.device("meta"):
        model = Transformer(args)
    quant.swap_linears(model, quant.plan_from_state(state))  # int8 layers where the tensors are quantized
    expected = {k: v.shape for k, v in model.state_dict().items()}
    # missing tensors are named as the family's files name them (part_model/ files hold canonical names)
    check_state_dict(state, expected, origin, str(model_dir), family if parallel is None else None)
    state = own_small_tensors({k: v.to(device=dev.torch_device, dtype=quant.load_dtype(k, v, torch_dtype))
                               for k, v in state.items()})
    model.load_state_dict(state, assign=True, strict=True)
    del state  # the model holds the tensors now: use_kernels' prepacking then replaces them, never doubles them
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


def load_model_from(config: RunConfig, device: str | Device | None = None, seed: int = 0) -> LoadedModel:
    """``load_model`` with a RunConfig's values (the CLI's or a pytest session's); ``device`` overrides its
    device string with a Device already made (a tensor-parallel rank's, an xdist worker's)."""
    return load_model(config.model, config.model_path, device if device is not None else config.device,
                      config.dtype, config.max_seq_len, config.attention, compile=config.compile,
                      kernels=config.kernels, dummy_weights=config.dummy_weights, seed=seed,
                      memory_limit=config.memory_limit)


def _load_dummy(name, model_path, device, dtype, max_seq_len, attention, compile, seed, memory_limit,
                kernels) -> LoadedModel:
    dev = device if isinstance(device, Device) else get_device(device, tp_dist.local_rank())
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else (dtype or default_dtype(dev))
    dev.check_dtype(torch_dtype)
    args, tok_dir, origin = dummy.dummy_source(name, model_path, max_seq_len)
    parallel = tp_dist.tp_world()
    if parallel is not None:
        args = args.with_(tp_size=parallel[0], tp_rank=parallel[1])
    label = name or Path(model_path).name
    dummy.check_fits(args, torch_dtype, dev, memory_limit, f"{label} ({origin})")
    model = dummy.build_dummy_model(args, dev, torch_dtype, seed)
    model.set_attention(attention)
    model.use_kernels(kernels_for(args, dev.torch_device, torch_dtype, kernels))  # the self-check runs here
    if compile:
        compile_decode(model, dev)
    if parallel is not None:
        tp_dist.install_all_reduce(model)
    if tok_dir is None:  # a real name without a download: the tiny stand-in's tokenizer (ids < its vocab)
        tok_dir = ensure_tiny(get_spec(name).stand_in)
    tokenizer = load_tokenizer(tok_dir, args.family)
    return LoadedModel(label, args.family, tok_dir, args, model, tokenizer, dev, torch_dtype, dummy_seed=seed)

