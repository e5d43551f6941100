"""Name or directory -> a ready model: checkpoint + Transformer + tokenizer on a device."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import check_state_dict, checkpoint_identity, env_max_seq_len, read_canonical, read_model_config
from . import dummy, quant
from .families import Family, get_family
from .decode_graph import compile_decode
from .device import Device, dtype_name, get_device, parse_dtype
from .kernels import MODES as KERNEL_MODES
from .kernels import kernels_for
from .model import ModelArgs, Transformer
from .parallel import dist as tp_dist
from .parallel.cut import cut_checkpoint
from .parallel.shard import check_part, load_shard, reject_part_dir
from .quant_files import find_quant_files, has_npy_layout
from .locate import resolve_model_dir
from .options import RunConfig
from .registry import ModelSpec, get_spec
from .tiny import MARKER, ensure_tiny
from .tokenizer import load_tokenizer
from .weight_files import own_small_tensors


@dataclass
class LoadedModel:
    name: str  # registry name, or the directory name for --model-path alone
    family: Family
    model_dir: Path  # the checkpoint's directory (dummy weights: the directory whose tokenizer is used)
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


@dataclass(frozen=True)
class ModelSource:
    """What a run's model is before any weight is read: its shapes, family record and files."""

    label: str  # registry name, or the directory's name for --model-path alone
    model_dir: Path | None  # the checkpoint (and tokenizer) directory; None: dummy weights of a name not downloaded
    family: Family
    args: ModelArgs  # already this rank's (tp_size, tp_rank) under tensor parallelism
    config: dict | None  # config.json; None for registry dimensions
    where: str  # where the shapes came from (config.json's path, or the registry)


def load(config: RunConfig, device: str | Device | None = None) -> LoadedModel:
    """The one way in: a RunConfig (the CLI's or a pytest session's) -> a model ready to run on ``device``
    (default: the config's device string; a Device already made for a tensor-parallel rank or xdist worker).

    One weight step (``checkpoint`` | ``part_model`` shard under torchrun | ``dummy`` seeded random weights at the
    real size, refused before allocating when they cannot fit), then one tail for all three: weights placed on the
    device, int8 layers where the tensors are quantized, the kernel set (self-checked), compile, the all-reduce
    hooks, the tokenizer.
    """
    if config.kernels not in KERNEL_MODES:
        raise ValueError(f"--kernels: expected one of {', '.join(KERNEL_MODES)}, got {config.kernels!r}")
    if config.model is None and config.model_path is None:
        raise ValueError("give a model name (--model) or a checkpoint directory (--model-path)")
    device = device if device is not None else config.device
    dev = device if isinstance(device, Device) else get_device(device, tp_dist.local_rank())
    dtype = parse_dtype(config.dtype) if config.dtype else default_dtype(dev)
    dev.check_dtype(dtype)
    parallel = tp_dist.tp_world()  # (world size, rank) under torch.distributed, else None
    if config.compile and parallel is not None:
        raise ValueError("--compile is not supported with tensor parallelism (--tp > 1) yet: the all-reduce "
                         "after each row-parallel layer is outside the captured graph; drop one of the two")
    source = model_source(config, parallel)
    state, origin = weight_state(config, source, dev, dtype, parallel)
    with torch.device("meta"):
        model = Transformer(source.args)
    quant.swap_linears(model, quant.plan_from_state(state))  # int8 layers where the tensors are quantized
    expected = {k: v.shape for k, v in model.state_dict().items()}
    # missing tensors are named as the family's files name them (part_model/ files hold canonical names)
    check_state_dict(state, expected, origin, str(source.model_dir or source.where),
                     source.family.name if origin and parallel is None else None)
    state = own_small_tensors({k: v.to(device=dev.torch_device, dtype=quant.load_dtype(k, v, dtype))
                               for k, v in state.items()})
    model.load_state_dict(state, assign=True, strict=True)
    del state  # the model holds the tensors now: use_kernels' prepacking then replaces them, never doubles them
    model.eval().requires_grad_(False)
    model.set_attention(config.attention)
    model.use_kernels(kernels_for(source.args, dev.torch_device, dtype, config.kernels))  # the self-check runs here
    quantization = quant.prepare(model, dev.type, dtype, config.kernels)  # --kernels plain: dequantize
    if config.compile:
        compile_decode(model, dev)
    if parallel is not None:
        tp_dist.install_all_reduce(model)  # sum the row-parallel partial outputs (attention wo, mlp w2)
    tok_dir = source.model_dir
    if tok_dir is None:  # a real name without a download: the tiny stand-in's tokenizer (ids < its vocab)
        tok_dir = ensure_tiny(get_spec(config.model).stand_in)
    tokenizer = load_tokenizer(tok_dir, source.family)
    return LoadedModel(source.label, source.family, tok_dir, source.args, model, tokenizer, dev, dtype,
                       quantization, dummy_seed=config.dummy_seed if config.dummy_weights else None)


def model_source(config: RunConfig, parallel: tuple[int, int] | None = None) -> ModelSource:
    """The run's model before its weights: config.json of the checkpoint (or, for dummy weights of a name not
    downloaded, the registry's dimensions), checked against the registry name when there is one."""
    cap = config.max_seq_len if config.max_seq_len is not None else env_max_seq_len()
    label = config.model or Path(config.model_path).name
    if config.dummy_weights:
        args, model_dir, where = dummy.dummy_source(config.model, config.model_path, cap)
        cfg = None
    else:
        spec: ModelSpec | None = get_spec(config.model) if config.model else None
        model_dir = resolve_model_dir(config.model, config.model_path) if config.model else Path(config.model_path)
        cfg, _, args = read_model_config(model_dir, spec, cap)
        where = str(model_dir / "config.json")
    if parallel is not None:
        args = args.with_(tp_size=parallel[0], tp_rank=parallel[1])
    return ModelSource(label, model_dir, get_family(args.family), args, cfg, where)


def weight_state(config: RunConfig, source: ModelSource, dev: Device, dtype: torch.dtype,
                 parallel: tuple[int, int] | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The weights under canonical names, and the file each came from ({} for dummy weights): the one step that
    differs between a checkpoint, this rank's part_model/ shard and dummy weights."""
    if config.dummy_weights:
        dummy.check_fits(source.args, dtype, dev, config.memory_limit, f"{source.label} ({source.where})")
        return dummy.build_dummy_model(source.args, dev, dtype, config.dummy_seed).state_dict(), {}
    if parallel is None:
        reject_part_dir(source.config, source.model_dir)
    # --memory-limit (and the device, the host) hold for a checkpoint as for dummy weights: refused before reading
    quantized = find_quant_files(source.model_dir) is not None or has_npy_layout(source.model_dir)
    dummy.check_fits(source.args, dtype, dev, config.memory_limit, str(source.model_dir), weights="checkpoint",
                     int8_linears=quantized)
    if parallel is not None:  # tensor parallel: this rank reads only part_model/{rank}
        _cut_tiny_parts(source.model_dir, source.config, parallel[0])
        return load_shard(source.model_dir, source.config, source.args)
    return read_canonical(source.model_dir, source.config, source.family.name, source.args)


def load_model(name: str | None = None, model_path: str | Path | None = None, device: str | Device = "auto",
               dtype: str | torch.dtype | None = None, **settings) -> LoadedModel:
    """``load`` with RunConfig's fields as keywords (scripts, tests): ``load_model("qwen-tiny", device="cpu")``."""
    if isinstance(dtype, torch.dtype):
        dtype = dtype_name(dtype)
    return load(RunConfig(model=name, model_path=None if model_path is None else str(model_path), dtype=dtype,
                          **settings), device)


def _cut_tiny_parts(model_dir: Path, config: dict, tp: int) -> None:
    """npuinfer's tiny checkpoints are cut on first use (local rank 0 cuts, every rank waits)."""
    if not (model_dir / MARKER).is_file():
        return
    local = tp_dist.local_rank()
    if (local == 0) if local is not None else tp_dist.rank() == 0:
        try:
            for rank in range(tp):
                check_part(model_dir, config, tp, rank)
        except tp_dist.ParallelError:
            cut_checkpoint(model_dir, tp)
    tp_dist.barrier()
