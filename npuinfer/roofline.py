"""The roofline of one generate call: bytes a decode step must read, FLOPs a prefill must do, and the peaks
they are measured against (REFERENCE.md section 9).

Everything per step is computed from first principles, from ModelArgs (per tensor-parallel rank: args.tp_size),
batch, position and dtype, never from a loaded model:

* weight bytes read by a decode step: every weight matrix, bias and norm once, except the embedding table, of
  which a step reads only its batch's rows (counting the whole table would credit a step with 1.2 GB it never
  reads on qwen-7b);
* KV bytes read by a decode step at ``window`` cache slots: 2 (K and V) x layers x batch x window x local K/V
  heads x head_dim x dtype bytes; a row's mean over its decode steps uses the mean window, input + output / 2;
* prefill FLOPs: 2 x (matrix parameters of the layers) x batch x tokens, + the head on the last position only
  (npuinfer projects only that one), + causal attention 2 x 2 x batch x heads x head_dim x tokens^2 / 2 per layer
  (q.k^T and p.v, half the square under the causal mask).

MBU = bytes / next-token time / peak bandwidth; MFU = prefill FLOPs / first-token time / peak FLOP/s.

The peak bandwidth is measured on the device by `probe_bandwidth`: the best of several passes of kernels that do
nothing but read a buffer several times larger than the last-level cache (a reduction, a matrix-vector product
in fp32 and in the run's dtype, the kernel a decode step is made of). A decode step at the real size has to read
at least the bytes counted above from the same memory, with those same kernels plus other work between them, so
it cannot stream faster than the best of them: MBU <= 1. If a row ever shows MBU > 1 the probe is missing a
faster way to read memory, and the probe is what must change (a warning says so); values are never clipped.
A model whose bytes per step fit in the last-level cache (the tiny stand-ins) is not bounded by this probe: its
MBU says how far it is from being memory-bound, not that it is cache-bound.
The peak FLOP/s is measured by `probe_flops`: 2048^3 products (8192^3 on an accelerator) in the run's dtype, by
aten and by the kernel table's linear on a prepared weight, with the threads torch uses, read in turn many times
over at least 1.5 s; its best reading is the peak, so a prefill timed whole cannot beat it: MFU <= 1.
Spec figures are given where the device is known (``spec_*`` columns, marked spec), never used for MBU.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock

from .atomic import write_atomic
from .kernels import select_kernels
from .model import ModelArgs
from .progress import progress

GB = 1e9
TFLOP = 1e12


# --------------------------------------------------------------------------------------------- bytes and FLOPs


def _norm_params(args: ModelArgs) -> int:
    return args.dim * (2 if args.norm == "layer" else 1)


def _qkv_rows(args: ModelArgs) -> int:
    """Output rows of one rank's fused q/k/v projection: its query heads and its K/V heads."""
    return (args.n_local_heads + 2 * args.n_local_kv_heads) * args.head_dim


def layer_matrix_params(args: ModelArgs) -> int:
    """Weight-matrix parameters of one layer on one rank (what a token multiplies through)."""
    d, h, i = args.dim, args.n_local_heads * args.head_dim, args.local_intermediate_size
    n_mats = 3 if args.mlp == "swiglu" else 2
    return d * _qkv_rows(args) + h * d + n_mats * d * i


def layer_params(args: ModelArgs) -> int:
    """Every parameter of one layer on one rank: matrices, biases (row-parallel output biases are whole on every
    rank), the two norms and Qwen3's per-head q/k norms."""
    d, i = args.dim, args.local_intermediate_size
    biases = (_qkv_rows(args) if args.qkv_bias else 0) + (d if args.o_bias else 0) + ((i + d) if args.mlp_bias else 0)
    qk_norms = 2 * args.head_dim if args.qk_norm else 0
    return layer_matrix_params(args) + biases + 2 * _norm_params(args) + qk_norms


def weight_bytes_per_step(args: ModelArgs, batch: int, dtype_bytes: int) -> int:
    """Weight bytes one decode step reads on one rank: all layers, final norm and head once, and ``batch`` rows
    of the embedding table."""
    params = args.n_layers * layer_params(args) + _norm_params(args) + args.vocab_size * args.dim
    return (params + batch * args.dim) * dtype_bytes


def kv_bytes_per_step(args: ModelArgs, batch: int, window: float, dtype_bytes: int) -> float:
    """KV-cache bytes one decode step reads on one rank when it attends to ``window`` slots (at the K/V heads:
    grouped-query attention reads each K/V head once for the query heads that share it)."""
    return 2 * args.n_layers * batch * window * args.n_local_kv_heads * args.head_dim * dtype_bytes


def mean_decode_window(input_len: int, output_len: int) -> float:
    """Mean slots attended over the decode steps of input -> output: step s (1..output-1) attends input + s."""
    return input_len + output_len / 2


def prefill_flops(args: ModelArgs, batch: int, tokens: int) -> float:
    """FLOPs of a prefill over ``tokens`` per row on one rank (logits of the last position only)."""
    h = args.n_local_heads * args.head_dim
    matmuls = 2 * args.n_layers * layer_matrix_params(args) * batch * tokens
    head = 2 * args.dim * args.vocab_size * batch
    attention = args.n_layers * 2 * 2 * batch * h * tokens * tokens / 2
    return matmuls + head + attention


# --------------------------------------------------------------------------------------------- peaks


@dataclass(frozen=True)
class Peak:
    value: float  # bytes/s or FLOP/s
    source: str


# Datasheet figures of devices whose name we can recognise (dense, no sparsity). Ascend figures seen so far are
# press numbers (REFERENCE.md section 9), so none are listed: measure.
_SPEC = [  # (substring of the device name, bytes/s, {dtype: FLOP/s}, where from)
    ("H200", 4.8e12, {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}, "NVIDIA H200 SXM datasheet"),
    ("H100 80GB HBM3", 3.35e12, {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
     "NVIDIA H100 SXM datasheet"),
    ("A100-SXM4-80GB", 2.039e12, {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
     "NVIDIA A100 80GB SXM datasheet"),
]


def spec_peaks(device_name: str, dtype: torch.dtype) -> tuple[Peak | None, Peak | None]:
    """(bandwidth, FLOP/s) from a datasheet when the device is known, else (None, None)."""
    for key, bandwidth, flops, where in _SPEC:
        if key in device_name:
            f = flops.get(dtype)
            return Peak(bandwidth, f"spec: {where}"), (Peak(f, f"spec: {where}") if f else None)
    return None, None


def last_level_cache_bytes() -> int | None:
    """The cpu's largest cache (Linux sysfs), None where unknown."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def probe_size(device) -> int:
    """Buffer bytes for the bandwidth probe: well beyond the last-level cache (4x, at least 512 MiB; 2 GiB on
    an accelerator, whose L2 is tens of MiB), and at most an eighth of the memory free for it, but never under
    twice the last-level cache."""
    if device.is_accelerator:
        size, free = 2 * 1024**3, device.total_memory_bytes()
    else:
        size, free = max(512 * 1024**2, 4 * (last_level_cache_bytes() or 0)), device.free_memory_bytes()
    if free:
        size = min(size, free // 8)
    # never small enough to live in the cache: that would measure the cache, not the memory
    floor = 64 * 1024**2 if device.is_accelerator else 2 * (last_level_cache_bytes() or 32 * 1024**2)
    return max(floor, size)


@torch.inference_mode()
def probe_bandwidth(device, dtype: torch.dtype = torch.float32, size: int | None = None,
                    repeats: int = 3) -> Peak:
    """The device's read bandwidth in bytes/s: the best pass of a reduction and of a matrix-vector product (fp32
    and ``dtype``; aten's, and the kernel table's fused linear on its prepared weight where it prepares one, e.g.
    oneDNN's prepacked bf16 on cpu, which streams faster than aten's: a decode through it must not beat the
    probe) over a buffer of ``size`` bytes (`probe_size`), each the best of ``repeats``."""
    size = size or probe_size(device)
    desc = f"bandwidth probe on {device} ({size / 2**30:.3g} GiB)"
    cols = 4096
    linear = select_kernels(device.type).kernels["linear"]
    results = []
    for kind in dict.fromkeys((torch.float32, dtype)):
        rows = size // (cols * kind.itemsize)
        matrix = torch.full((rows, cols), 0.5, dtype=kind, device=device.torch_device)
        vector = torch.ones(1, cols, dtype=kind, device=device.torch_device)
        nbytes = matrix.numel() * matrix.element_size()
        name = str(kind).replace("torch.", "")
        ops = [TimedOp(f"{name} matrix-vector", nbytes, lambda: torch.nn.functional.linear(vector, matrix))]
        if kind == torch.float32:
            ops.append(TimedOp(f"{name} sum", nbytes, matrix.sum))
        results += [(rate, how) for how, rate in best_rates(device, ops, repeats, desc=desc).items()]
        prepared = linear.prepared(matrix)
        if prepared is not matrix:
            del matrix, ops  # the prepared copy replaces it, as in a model: one buffer's memory at a time
            op = TimedOp(f"{name} matrix-vector ({linear.name})", nbytes, lambda: linear.fn(vector, prepared, None))
            results += [(rate, how) for how, rate in best_rates(device, [op], repeats, desc=desc).items()]
        del prepared
        matrix = None
        device.empty_cache()
    value, how = max(results)
    threads = torch.get_num_threads()
    return Peak(value, f"probe: {how} over {size / 1024**3:.3g} GiB, best of {repeats}, {threads} threads")


@dataclass(frozen=True)
class TimedOp:
    """One operation a probe times: ``fn()`` does ``work`` units (bytes or FLOPs), named ``label``."""
    label: str
    work: float
    fn: Callable[[], object]


def rate_readings(device, ops: list[TimedOp], repeats: int, min_seconds: float = 0.0,
                  max_repeats: int = 20, desc: str = "probing") -> dict[str, list[float]]:
    """Each op's rates (work per second), one per timed call, the ops taken in turn (op 1, op 2, ..., op 1, op 2,
    ...) after one untimed call each, so every op is sampled across the same stretch of time: a slow spell of a
    shared machine hits them all. At least ``repeats`` rounds; more, up to ``max_repeats``, until ``min_seconds``
    have passed (more chances to catch a quiet moment on a busy machine, where one reading can be 3x another).
    ``desc`` heads the progress bar (one step a round)."""
    with progress(desc=desc, total=repeats, unit="round") as bar:
        bar.set_postfix_str("first touch")
        for op in ops:
            op.fn()  # first touch / kernel selection / oneDNN primitive cache
        bar.set_postfix_str(", ".join(op.label for op in ops))
        readings: dict[str, list[float]] = {op.label: [] for op in ops}
        began, rounds = time.perf_counter(), 0
        while rounds < repeats or (rounds < max_repeats and time.perf_counter() - began < min_seconds):
            for op in ops:
                device.synchronize()
                start = time.perf_counter()
                op.fn()
                device.synchronize()
                readings[op.label].append(op.work / (time.perf_counter() - start))
            rounds += 1
            bar.update()
    return readings


def best_rates(device, ops: list[TimedOp], repeats: int, min_seconds: float = 0.0,
               max_repeats: int = 20, desc: str = "probing") -> dict[str, float]:
    """Each op's best rate of `rate_readings`: the reading of its quietest moment."""
    return {label: max(rates) for label, rates in rate_readings(device, ops, repeats, min_seconds,
                                                                 max_repeats, desc).items()}


def flops_probe_size(device) -> int:
    """n of the FLOP/s probe's n x n x n products: 8192 on an accelerator, 2048 on a cpu (17 GFLOP a product,
    0.1-0.4 s on this project's 2-core Xeon). Measured there in bf16, read in turn (issue #15): quiet, a prefill's
    128-row linears ran at 0.95-1.0x the 2048^3 product and 1024^3 read anywhere from 0.5x to 1x of 2048^3; under
    load (2 threads beside other work) the 128-row linears beat 1024^3 by up to 1.14x and 2048^3 in 3 of 8 single
    best-of-5 readings. So the size only keeps the product at the kernel's full rate; what keeps a prefill below
    the probe is reading it many times over a stretch of time (`probe_flops`): a real-size prefill's median rate
    read 0.44-0.74 of the probe under load."""
    return 8192 if device.is_accelerator else 2048


def flops_probe_ops(device, dtype: torch.dtype, n: int) -> list[TimedOp]:
    """The FLOP/s probe's operations: an n x n x n product in ``dtype`` by aten's matmul, and, where the kernel
    table's linear prepares its weight (oneDNN prepacked bf16 on cpu), the same product through that linear on
    a prepared weight, as a model's projections run."""
    a = torch.full((n, n), 0.5, dtype=dtype, device=device.torch_device)
    b = torch.full((n, n), 0.25, dtype=dtype, device=device.torch_device)
    kind = str(dtype).replace("torch.", "")
    ops = [TimedOp(f"{n}^3 {kind} matmul", 2 * n**3, lambda: a @ b)]
    linear = select_kernels(device.type).kernels["linear"]
    prepared = linear.prepared(b)
    if prepared is not b:
        ops.append(TimedOp(f"{n}^3 {kind} matmul ({linear.name})", 2 * n**3, lambda: linear.fn(a, prepared, None)))
    return ops


FLOPS_PROBE_REPEATS = 5  # rounds at least ...
FLOPS_PROBE_SECONDS = 1.5  # ... and more (up to 20) until this long


@torch.inference_mode()
def probe_flops(device, dtype: torch.dtype, n: int | None = None, repeats: int = FLOPS_PROBE_REPEATS,
                min_seconds: float = FLOPS_PROBE_SECONDS) -> Peak:
    """The device's matrix-multiply rate in FLOP/s, in the run's ``dtype`` with the threads torch uses now: the
    best reading of `flops_probe_ops` (n: `flops_probe_size`), taken in turn, at least ``repeats`` times and for
    at least ``min_seconds`` (`best_rates`). A prefill runs the same kernels on fewer rows, with other work between
    them, and is timed whole, so it cannot run faster than their best single reading: MFU <= 1."""
    n = n or flops_probe_size(device)
    rates = best_rates(device, flops_probe_ops(device, dtype, n), repeats, min_seconds,
                       desc=f"FLOP/s probe on {device} ({n}^3 products)")
    how, value = max(rates.items(), key=lambda kv: kv[1])
    return Peak(value, f"probe: {how}, best of >= {repeats} over >= {min_seconds:g} s, {torch.get_num_threads()} "
                       "threads")


PEAKS_FILE_ENV = "NPUINFER_PEAKS_FILE"


def shared_peak(kind: str, device, dtype: torch.dtype, probe: Callable[[], Peak]) -> Peak:
    """``probe()``; where $NPUINFER_PEAKS_FILE names a file, the peak an earlier process recorded there for this
    kind, device and dtype (the first one probes, under a lock, and records it). The test suite sets it, so its
    dozens of bench and infer subprocesses probe once, not each (a 1 GiB probe costs seconds to first touch).
    Unset, as for any user: every process probes."""
    path = os.environ.get(PEAKS_FILE_ENV)
    if not path:
        return probe()
    key = f"{kind} {device} {dtype} {torch.get_num_threads()} threads"  # a peak read with other threads is not this one
    with FileLock(f"{path}.lock"):
        known = _read_peaks_file(Path(path))
        if key not in known:
            peak = probe()
            known[key] = [peak.value, peak.source]
            write_atomic(path, json.dumps(known))
        return Peak(*known[key])


class PeaksFileError(ValueError):
    """$NPUINFER_PEAKS_FILE holds something other than the peaks an earlier process recorded."""


def _read_peaks_file(path: Path) -> dict[str, list]:
    """The peaks recorded in $NPUINFER_PEAKS_FILE: {key: [value > 0, source]}; anything else is refused in one
    line naming the variable, the file and the entry (a zero peak divided by zero, a string failed deep inside)."""
    if not path.exists():
        return {}
    where = f"environment variable {PEAKS_FILE_ENV}: {path}"
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PeaksFileError(f"{where}: not a peaks file written by npuinfer ({exc}); delete it or point the "
                             "variable at a new file") from None
    if not isinstance(known, dict):
        raise PeaksFileError(f"{where}: expected a JSON object of peaks, got {type(known).__name__}; delete it or "
                             "point the variable at a new file")
    for key, entry in known.items():
        value = entry[0] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise PeaksFileError(f"{where}: entry {key!r} is {entry!r}; expected [a finite peak above zero, its "
                                 "source]; delete the file (it is a cache) or point the variable at a new one")
    return known


@lru_cache(maxsize=None)
def session_peaks(device, dtype: torch.dtype) -> tuple[Peak, Peak]:
    """(bandwidth, FLOP/s) probed once per process, device and dtype (the first row of a session pays ~1 s)."""
    return (shared_peak("bandwidth", device, dtype, lambda: probe_bandwidth(device, dtype)),
            shared_peak("flops", device, dtype, lambda: probe_flops(device, dtype)))


# --------------------------------------------------------------------------------------------- a row's figures


ROOFLINE_COLUMNS = ["weight_bytes_per_step", "kv_bytes_per_step", "achieved_bandwidth(GB/s)", "MBU",
                    "prefill_FLOPs", "achieved_TFLOP/s", "MFU", "peak_bandwidth(GB/s)", "peak_bandwidth_source",
                    "peak_TFLOP/s", "peak_TFLOP/s_source", "spec_bandwidth(GB/s)", "spec_TFLOP/s", "spec_source"]


def roofline_figures(args: ModelArgs, batch: int, input_len: int, output_len: int, dtype: torch.dtype,
                     first_token_ms: float | None, next_token_ms: float | None, bandwidth: Peak, flops: Peak,
                     device_name: str = "") -> dict[str, object]:
    """The roofline columns of a performance row (next-token time is the mean over the decode steps, so the KV
    bytes are those at the mean window)."""
    nbytes = dtype.itemsize
    weights = weight_bytes_per_step(args, batch, nbytes)
    kv = kv_bytes_per_step(args, batch, mean_decode_window(input_len, output_len), nbytes)
    flop = prefill_flops(args, batch, input_len)
    achieved_bw = (weights + kv) / (next_token_ms / 1e3) if next_token_ms else None
    achieved_flops = flop / (first_token_ms / 1e3) if first_token_ms else None
    spec_bw, spec_fl = spec_peaks(device_name, dtype)
    return {
        "weight_bytes_per_step": weights, "kv_bytes_per_step": kv,
        "achieved_bandwidth(GB/s)": achieved_bw / GB if achieved_bw else None,
        "MBU": achieved_bw / bandwidth.value if achieved_bw else None,
        "prefill_FLOPs": flop, "achieved_TFLOP/s": achieved_flops / TFLOP if achieved_flops else None,
        "MFU": achieved_flops / flops.value if achieved_flops else None,
        "peak_bandwidth(GB/s)": bandwidth.value / GB, "peak_bandwidth_source": bandwidth.source,
        "peak_TFLOP/s": flops.value / TFLOP, "peak_TFLOP/s_source": flops.source,
        "spec_bandwidth(GB/s)": spec_bw.value / GB if spec_bw else None,
        "spec_TFLOP/s": spec_fl.value / TFLOP if spec_fl else None,
        "spec_source": spec_bw.source if spec_bw else "",
    }
