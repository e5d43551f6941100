"""torch.distributed for tensor parallelism: process group, all-reduce hooks, rank-0 helpers.

Ranks are started by torchrun (or ``launch.run_under_torchrun``), which sets ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; the group is initialised from that
environment with the backend the device layer names (hccl on npu, nccl on cuda, gloo on cpu).
Rank r runs on device index base + LOCAL_RANK (``--device npu:2`` with 2 ranks per node: npu:2, npu:3).

Nothing waits forever: the group is created with a timeout (``$NPUINFER_DIST_TIMEOUT`` seconds,
default 600, long enough for the slowest rank to load a 20B shard from disk) that bounds every
collective, and torchrun stops all ranks as soon as one exits with an error.
"""
from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ..device import DIST_BACKENDS, Device, get_device

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "NPUINFER_DIST_TIMEOUT"

_device: Device | None = None  # this rank's device, set by init_tensor_parallel


class ParallelError(RuntimeError):
    """Tensor parallelism asked for in a way that cannot run (wrong launch, world size, shards)."""


def timeout() -> timedelta:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV}: expected a positive number of seconds, got {value!r}")
    return timedelta(seconds=seconds)


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the torch.distributed environment)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def local_rank() -> int | None:
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else None


def tp_world() -> tuple[int, int] | None:
    """(world size, rank) when torch.distributed is initialised with more than one rank, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size(), dist.get_rank()
    return None


def init_tensor_parallel(tp: int, device: str | Device = "auto") -> Device:
    """Join the torchrun process group for ``tp`` ranks; returns this rank's device.

    ``tp == 1`` outside torchrun does nothing but pick the device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp == 1 and world == 1:
        return device if isinstance(device, Device) else get_device(device)
    if not launched():
        raise ParallelError(f"--tp {tp} needs {tp} processes, one per rank: start it with "
                            f"torchrun --nproc-per-node {tp} -m npuinfer ... --tp {tp}")
    if world != tp:
        raise ParallelError(f"--tp {tp} but torchrun started {world} processes (WORLD_SIZE={world}); "
                            f"use torchrun --nproc-per-node {tp} (x --nnodes) to match --tp")
    dev = device if isinstance(device, Device) else get_device(device, local_rank())
    dev.set_current()
    if not dist.is_initialized():
        dist.init_process_group(backend=dev.dist_backend, timeout=timeout())
        atexit.register(_destroy)
    global _device
    _device = dev
    return dev


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(x: Tensor) -> Tensor:
    """Sum over ranks in place: the reduce hook after a row-parallel layer."""
    dist.all_reduce(x)
    return x


def install_all_reduce(model: torch.nn.Module) -> None:
    """Set the reduce hook of every row-parallel layer (attention wo, feed-forward w2) to all_reduce."""
    for layer in model.layers:
        layer.attention.reduce = all_reduce
        layer.feed_forward.reduce = all_reduce


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    """True on the rank that prints and writes result rows (and in any single-process run)."""
    return rank() == 0


def barrier() -> None:
    if tp_world() is not None:
        dist.barrier(**barrier_options(_device, dist.get_backend()))


def barrier_options(device: Device | None, backend: str) -> dict:
    """nccl's barrier without ``device_ids`` runs on GPU (global rank % local GPU count), which for
    ``--device cuda:N`` with N > 0 is another card than the rank's: a context and communicator made there."""
    if backend == "nccl" and device is not None and device.torch_device.index is not None:
        return {"device_ids": [device.torch_device.index]}
    return {}


def _backend_device() -> Device:
    """A device the current group's backend can reduce on, for groups not made by init_tensor_parallel."""
    kind = {backend: kind for kind, backend in DIST_BACKENDS.items()}.get(dist.get_backend(), "cpu")
    return Device("cpu") if kind == "cpu" else Device(kind, getattr(torch, kind).current_device())


def max_over_ranks(value: float) -> float:
    """The largest ``value`` over all ranks (every rank must call it); ``value`` itself outside a group.

    Under tensor parallelism each rank times its own forwards; a report takes the max over ranks.
    """
    if tp_world() is None:
        return float(value)
    device = _device if _device is not None else _backend_device()
    t = torch.tensor([float(value)], dtype=device.collective_float_dtype, device=device.torch_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
