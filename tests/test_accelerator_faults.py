"""The cuda and npu paths' faults whose logic runs on cpu (issue 31): NVML's per-process reading, native bf16,
the nccl barrier's device, --compile with --tp on dummy weights, OOM recovery outside the handler, the W8A8
probe's unpadded rows, doctor's CANN version."""
from __future__ import annotations

import os
import types
import weakref
from pathlib import Path

import torch
import torch.multiprocessing as mp

from npuinfer.commands.doctor import cann_version
from npuinfer.device import Device, native_bf16, other_processes_util
from npuinfer.memory import MaxBatchSearch
from npuinfer.parallel.dist import barrier_options
from npuinfer.parallel.launch import free_port
from npuinfer.kernels import registration
from npuinfer.quant import kernels as quant_kernels
from npuinfer.quant.linear import QuantLinear
from npuinfer.quant.scheme import W8A8

# ------------------------------------------------------------------ NVML


class _NVMLError(Exception):
    """pynvml's NVMLError carries the NVML return code as ``value``."""

    def __init__(self, value: int):
        super().__init__(f"NVML error {value}")
        self.value = value


def _pynvml(result) -> types.SimpleNamespace:
    """A stand-in pynvml (no NVML here) whose per-process query returns ``result`` or raises it."""

    def query(handle, since_us):
        if isinstance(result, Exception):
            raise result
        return result

    return types.SimpleNamespace(NVML_ERROR_NOT_FOUND=6, nvmlDeviceGetProcessUtilization=query)


def test_nvml_not_supported_or_no_permission_reads_no_figure_only_not_found_reads_no_samples():
    own = os.getpid()
    assert other_processes_util(_pynvml(_NVMLError(3)), None, own, 0.0) is None  # NOT_SUPPORTED (MIG, vGPU)
    assert other_processes_util(_pynvml(_NVMLError(4)), None, own, 0.0) is None  # NO_PERMISSION
    assert other_processes_util(_pynvml(RuntimeError("driver gone")), None, own, 0.0) is None
    assert other_processes_util(_pynvml(_NVMLError(6)), None, own, 0.0) == 0.0  # NOT_FOUND: no samples
    sample = types.SimpleNamespace
    samples = [sample(pid=own, smUtil=90), sample(pid=own + 1, smUtil=20), sample(pid=own + 1, smUtil=40)]
    assert other_processes_util(_pynvml(samples), None, own, 0.0) == 30.0


def test_bf16_counts_as_supported_only_in_hardware():
    assert not native_bf16((7, 5)) and not native_bf16((6, 1))  # Turing, Pascal: emulated
    assert native_bf16((8, 0)) and native_bf16((9, 0))
    assert Device("cpu").supports_dtype(torch.bfloat16)


# ------------------------------------------------------------------ the barrier's device, --compile with --tp


def test_the_nccl_barrier_is_given_the_ranks_own_device():
    assert barrier_options(Device("cuda", 3), "nccl") == {"device_ids": [3]}
    assert barrier_options(Device("cpu"), "gloo") == {} and barrier_options(None, "nccl") == {}


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NPUINFER_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    from npuinfer.parallel.dist import barrier, init_tensor_parallel
    from npuinfer.runtime import load_model

    device = init_tensor_parallel(2, "cpu")
    barrier()  # gloo, through the same options
    try:
        load_model("qwen-tiny", device=device, dtype="fp32", compile=True, dummy_weights=True)
        message = "loaded"
    except ValueError as exc:
        message = str(exc)
    Path(out, f"rank{rank}.txt").write_text(message)


def test_dummy_weights_refuse_compile_with_tensor_parallelism(tmp_path, npuinfer_cache):
    mp.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert "--compile is not supported with tensor parallelism" in text, text


# ------------------------------------------------------------------ OOM recovery


def test_oom_memory_is_freed_outside_the_handler(load_tiny, monkeypatch):
    """A trial that runs out of memory: when the search frees memory, the failed frame's tensors are gone (in
    the except block the traceback would still hold them)."""
    import npuinfer.memory as memory

    loaded = load_tiny("qwen-tiny")
    held: list[weakref.ref] = []

    def failing_generate(model, ids, steps, mask):
        activations = torch.empty(1 << 20)
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("stand-in: out of memory")

    search = MaxBatchSearch(loaded, Device("cpu"), input_len=4, output_len=2, limit=1 << 40)
    released: list[bool] = []
    release = search._release
    monkeypatch.setattr(search, "_release", lambda: (released.append(bool(held) and held[-1]() is None), release()))
    monkeypatch.setattr(memory, "generate", failing_generate)
    try:
        assert search.trial(1) == (False, None, "oom")
    finally:
        loaded.model.setup_caches(1, 1)
    assert released[-1] is True


# ------------------------------------------------------------------ W8A8 probe rows


def test_the_w8a8_probe_checks_prefill_rows_beyond_16(monkeypatch):
    """A kernel right up to 16 rows and wrong beyond (cuda's unpadded _int_mm path) is passed over."""
    layer = QuantLinear(32, 24, W8A8, bias=False)
    gen = torch.Generator().manual_seed(0)
    layer.weight.copy_(torch.randint(-127, 128, (24, 32), generator=gen, dtype=torch.int8))
    layer.input_scale.fill_(0.02)
    layer.input_offset.fill_(0.0)
    layer.quant_bias.zero_()
    layer.deq_scale.fill_(1e-4)
    seen: list[int] = []

    def wrong_beyond_16(x, layer):
        seen.append(x.shape[0])
        y = quant_kernels.w8a8_dequantize(x, layer)
        return y if x.shape[0] <= 16 else y * 2

    monkeypatch.setitem(registration._FUSED, (quant_kernels.OP[W8A8], "cpu"),
                        registration.Kernel(quant_kernels.OP[W8A8], "wrong beyond 16 rows", wrong_beyond_16, True,
                                            __name__))
    layer.prepare("cpu", torch.float32)
    assert {1, 17, 33} <= set(seen)
    assert layer.kernel_name == quant_kernels.DEQUANTIZE


# ------------------------------------------------------------------ doctor


def test_doctor_reads_the_cann_version_torch_npu_sets(monkeypatch):
    monkeypatch.setattr(torch.version, "cann", "8.0.RC3", raising=False)
    assert cann_version() == "8.0.RC3"
    monkeypatch.delattr(torch.version, "cann")
    assert cann_version() is None
