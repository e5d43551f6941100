"""Dummy weights: any registered model at its real size with seeded random weights, no checkpoint.

Like vLLM's ``--load-format dummy``: the real dimensions and vocabulary (so every byte a step moves and every
FLOP it does is the real model's), random values made directly in device memory. Where the shapes come from:

* ``--model-path DIR`` or a checkpoint found for the name: that directory's config.json and tokenizer
  (its weight files are never read);
* a tiny name: its own tiny checkpoint's config.json and tokenizer;
* a real name with no checkpoint: the registry's dimensions written as that family's config.json, and the
  tokenizer of its tiny stand-in (``ModelSpec.stand_in``), whose ids are a subset of the real vocabulary; the
  embedding and head still have the real vocab_size rows, and benchmark inputs are drawn from all of them.

Before anything is allocated the memory a model needs is predicted (npuinfer.memory: weights + position tables)
and compared with the memory it may use: ``--memory-limit``, the device's total memory, and on cpu the host
memory available. A model that cannot fit is refused with both figures, having allocated nothing.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .checkpoint import args_from_config, env_max_seq_len, read_model_config
from .device import Device, dtype_name
from .memory import estimate, format_size
from .model import ModelArgs, Transformer
from .progress import progress
from .locate import resolve_model_dir
from .registry import ModelNotFound, ModelSpec, get_spec
from .tiny import config_for

DUMMY_STD = 0.02  # the usual initializer_range: activations stay finite through every layer


class DoesNotFit(RuntimeError):
    """A model (or a case) whose predicted memory exceeds what it may use; nothing was allocated."""


def memory_available(device: Device, memory_limit: int | None) -> tuple[int | None, str]:
    """(bytes a run may use, where that figure comes from): the smallest of --memory-limit, the device's
    total memory, and (cpu) the host memory available now."""
    candidates = []
    if memory_limit is not None:
        candidates.append((memory_limit, f"--memory-limit {format_size(memory_limit)}"))
    total = device.total_memory_bytes()
    if total is not None:
        candidates.append((total, f"{device} total memory {format_size(total)}"))
    if not device.is_accelerator:
        host = device.free_memory_bytes()
        if host is not None:
            candidates.append((host, f"host memory available {format_size(host)}"))
    if not candidates:
        return None, "no limit known"
    return min(candidates)


def dummy_source(name: str | None, model_path: str | Path | None,
                 max_seq_len: int | None = None) -> tuple[ModelArgs, Path | None, str]:
    """(ModelArgs at the real size, the directory whose tokenizer to use, where the shapes came from)."""
    cap = max_seq_len if max_seq_len is not None else env_max_seq_len()
    spec: ModelSpec | None = get_spec(name) if name else None
    model_dir: Path | None = None
    if model_path is not None:
        model_dir = Path(model_path)
    elif spec is not None:
        try:
            model_dir = resolve_model_dir(spec.name)  # tiny: built on first use; real: only if downloaded
        except ModelNotFound:
            model_dir = None
    if model_dir is not None:
        _, _, args = read_model_config(model_dir, spec, cap)
        return args, model_dir, str(model_dir / "config.json")
    assert spec is not None  # a name without any directory
    return registry_args(spec, cap), None, f"registry dimensions of {spec.name}"


def registry_args(spec: ModelSpec, max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs of a registry model, through the config.json its family writes (so the same reader, with
    the same family rules, turns it into ModelArgs as a downloaded checkpoint's)."""
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = config_for(spec, special)
    return args_from_config(config, spec.family, position=spec.position, path=f"registry:{spec.name}",
                            max_seq_len=max_seq_len)


def dummy_identity(args: ModelArgs, seed: int) -> str:
    """The ``checkpoint`` column of dummy rows: the shapes and the seed, never equal to a real checkpoint's."""
    # The grouped-query fields count only where they say something: a multi-head model keeps the identity it had
    # before they existed (its dummy rows stay comparable).
    unsaid = {"n_kv_heads": args.n_heads, "qk_norm": False, "rope_scaling": None}
    fields = {k: v for k, v in vars(args).items() if not (k in unsaid and v == unsaid[k])}
    digest = hashlib.sha256(json.dumps(sorted(fields.items()), default=str).encode()).hexdigest()[:12]
    return f"dummy-s{seed}-{digest}"


def predicted_load_bytes(args: ModelArgs, dtype: torch.dtype, int8_linears: bool = False) -> int:
    """Bytes the model holds once built (weights + position tables), from memory.py's estimate at batch 0;
    ``int8_linears``: a W8 quantized checkpoint, whose layers' linear weights are one byte each (a lower bound:
    their per-channel scales and any layer kept in floating point are not counted)."""
    total = estimate(args, 0, 1, 0, dtype.itemsize).total
    if int8_linears:
        h = args.n_heads * args.head_dim
        linear = args.n_layers * (4 * args.dim * h + (3 if args.mlp == "swiglu" else 2) * args.dim * args.intermediate_size)
        total -= linear * (dtype.itemsize - 1) // args.tp_size
    return total


def check_fits(args: ModelArgs, dtype: torch.dtype, device: Device, memory_limit: int | None, what: str,
               copies: tuple[int, str] | None = None, weights: str = "dummy", int8_linears: bool = False) -> None:
    """Refuses, before anything is allocated, a model whose weights (``weights``: "dummy" ones made on the device,
    or a "checkpoint"'s read into it) cannot fit: the prediction (`predicted_load_bytes`) plus ``copies``
    (bytes, what they are: the copies a backend makes beyond them) against `memory_available`."""
    base = predicted_load_bytes(args, dtype, int8_linears)
    extra, extra_what = copies if copies else (0, "")
    need = base + extra
    limit, source = memory_available(device, memory_limit)
    if limit is not None and need > limit:
        parts = (f"{format_size(base)} for its weights alone (npuinfer.memory prediction: "
                 f"{args.num_parameters() / 1e9:.2f}B parameters / tp {args.tp_size})")
        if extra:
            parts = f"{format_size(need)}: {parts} + {format_size(extra)} for {extra_what}"
        raise DoesNotFit(
            f"{what} with {weights} {dtype_name(dtype)} weights needs about {parts}, more than {source}; nothing "
            "was allocated. Use a smaller --dtype, --tp, or a larger --memory-limit")


def check_case_fits(args: ModelArgs, dtype: torch.dtype, device: Device, memory_limit: int | None, batch: int,
                    input_len: int, output_len: int, held_cache_bytes: int, what: str) -> None:
    """Refuses, before anything of it is allocated, a case (batch x input -> output) of a model already built
    whose predicted memory (npuinfer.memory: weights + KV cache for input + output + the prefill's activations)
    exceeds ``memory_limit``, or whose KV cache and activations exceed the memory free now
    (`Device.free_memory_bytes`), plus ``held_cache_bytes`` (the previous case's KV
    cache, which this one replaces)."""
    est = estimate(args, batch, input_len, output_len, dtype.itemsize)
    case = est.kv_cache + est.activations
    parts = (f"weights {format_size(est.weights)} + KV cache {format_size(est.kv_cache)} + activations "
             f"{format_size(est.activations)}")
    if memory_limit is not None and est.total > memory_limit:
        why = f"needs about {format_size(est.total)} ({parts}), more than --memory-limit {format_size(memory_limit)}"
    else:
        free = device.free_memory_bytes()
        if free is None or case <= free + held_cache_bytes:
            return
        why = (f"needs about {format_size(case)} beyond the weights it holds ({parts}), more than the "
               f"{format_size(free + held_cache_bytes)} free on {device} now")
    raise DoesNotFit(f"{what} at batch {batch}, input {input_len} + output {output_len} with dummy "
                     f"{dtype_name(dtype)} weights {why} (npuinfer.memory prediction); the case was not run and "
                     f"nothing was allocated for it. Use a smaller batch or lengths (--batch-sizes, --case-pairs), "
                     f"or a larger --memory-limit")


BLOCK = 1 << 22  # values in the seeded random block every tensor is cut from


@torch.no_grad()
def build_dummy_model(args: ModelArgs, device: Device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """The Transformer with seeded random weights made in ``device`` memory in ``dtype`` (no fp32 copy, no
    host copy): norm scales 1 + noise, biases and matrices N(0, 0.02).

    One block of 4M N(0, 0.02) values is drawn from the seed on the device and every tensor is filled with windows
    of it at offsets drawn from the same seed: copying runs at memory speed where a random generator does not
    (qwen-7b in bf16 on 2 cpu cores: seconds instead of minutes). Values repeat every 4M elements, which no timing
    can see: every weight still lives in its own memory and is read in full."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device.torch_device)
    gen = torch.Generator(device=device.torch_device).manual_seed(seed)
    block = torch.empty(BLOCK, dtype=dtype, device=device.torch_device).normal_(0.0, DUMMY_STD, generator=gen)
    ring = torch.cat([block, block])
    offsets = torch.randint(0, BLOCK, (sum(1 for _ in model.parameters()),), generator=torch.Generator().manual_seed(seed))
    tensors = progress(zip(model.named_parameters(), offsets.tolist()), total=len(offsets), unit="tensor",
                       desc=f"dummy {dtype_name(dtype)} weights on {device} ({format_size(args.num_parameters() * dtype.itemsize)})")
    for (name, param), offset in tensors:
        flat = param.view(-1)
        for start in range(0, flat.numel(), BLOCK):
            chunk = flat[start:start + BLOCK]
            chunk.copy_(ring[offset:offset + chunk.numel()])
        if name.endswith("norm.weight"):
            param.add_(1.0)
    return model.eval().requires_grad_(False)
