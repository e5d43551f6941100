"""`npuinfer doctor`: the first command on a new machine. Device facts, then every fused kernel checked
against plain torch on this device at a model's head size and dtype, with its speed against plain.

Facts are a list of (label, function of the device) printed as ``label: value`` lines: add one with
``@device_fact("label")``."""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import args_from_config, detect_family, read_config
from ..device import Device, dtype_name, get_device, parse_dtype
from ..kernels import PLAIN, KernelShapes, check_kernels, select_kernels
from ..kernels.check import cases, time_call
from ..options import add_device_options, add_model_options
from ..locate import resolve_model_dir
from ..noise import system_facts
from ..progress import progress
from ..results.table import significant
from ..roofline import probe_bandwidth

FactFn = Callable[[Device], "str | list[str]"]  # one line, or several (printed indented under the label)
DEVICE_FACTS: list[tuple[str, FactFn]] = []


def device_fact(label: str) -> Callable[[FactFn], FactFn]:
    def add(fn: FactFn) -> FactFn:
        DEVICE_FACTS.append((label, fn))
        return fn

    return add


@device_fact("device")
def _device(device: Device) -> str:
    return f"{device} ({device.name()})"


@device_fact("memory")
def _memory(device: Device) -> str:
    total = device.total_memory_bytes()
    if total is None:
        import os

        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return f"{host / 2**30:.1f} GiB host memory (cpu)"
    return f"{total / 2**30:.1f} GiB"


@device_fact("torch")
def _torch(device: Device) -> str:
    return f"{torch.__version__} (python {platform.python_version()}, {torch.get_num_threads()} threads)"


@device_fact("torch_npu / CANN")
def _npu_versions(device: Device) -> str:
    if device.type != "npu":
        return "not used"
    import torch_npu  # type: ignore[import-not-found]

    cann = cann_version() or "unknown (torch.version.cann)"
    return f"torch_npu {getattr(torch_npu, '__version__', '?')}, CANN {cann}"


def cann_version() -> str | None:
    """The CANN version torch_npu found: importing torch_npu sets ``torch.version.cann`` (torch_npu.version has
    no such field)."""
    return getattr(torch.version, "cann", None)


@device_fact("CUDA")
def _cuda(device: Device) -> str:
    if device.type != "cuda":
        return "not used"
    return f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"


@device_fact("collective backend")
def _collective(device: Device) -> str:
    import torch.distributed as dist

    backend = device.dist_backend
    available = dist.is_available() and dist.is_backend_available(backend)
    return f"{backend} ({'available' if available else 'NOT available in this torch build'})"


@device_fact("memory bandwidth")
def _bandwidth(device: Device) -> str:
    peak = probe_bandwidth(device)
    return f"{significant(peak.value / 1e9)} GB/s ({peak.source})"


@device_fact("system")
def _system(device: Device) -> list[str]:
    return system_lines(system_facts(device))


def system_lines(facts: dict) -> list[str]:
    """``noise.system_facts()`` as ``key: value`` lines."""
    cpus = facts["allowed_cpus"]
    busiest = ", ".join(f"{p['name']} (pid {p['pid']}, {p['cpu']:.0%})" for p in facts["busiest_other_processes"])
    clock = f"{facts['cpu_mhz']:.0f} MHz" if facts.get("cpu_mhz") else "not exposed"
    if facts.get("cpu_mhz_max"):
        clock += f" (max {facts['cpu_mhz_max']:.0f} MHz)"
    lines = [
        f"cpu model: {facts['cpu_model']}",
        f"cpus: {facts['logical_cpus']} logical, this process on {cpus}",
        f"memory available: {facts['memory_available_gib']} GiB",
        f"load average: {' '.join(f'{x:.2f}' for x in facts.get('load_average') or []) or 'not exposed'}",
        f"other processes: {facts['other_cpu']:.0%} of cpus {cpus} over {facts['sample_s']:g} s"
        + (f" (busiest: {busiest})" if busiest else ""),
        f"cpu governor: {facts['governor'] or 'not exposed'}",
        f"cpu clock: {clock}",
        "hottest sensor: " + (f"{facts['temperature_c']:.0f} C" if facts.get("temperature_c") else "not exposed"),
    ]
    device = facts.get("device")
    if device:
        known = ", ".join(f"{k} {v:g}" for k, v in device.items() if k != "name")
        lines.append(f"{device['name']}: {known or 'the driver reports no utilisation, temperature or clock'}")
    return lines + [f"advice: {line}" for line in facts.get("advice", [])]


def add_parser(sub) -> None:
    parser = sub.add_parser("doctor", help="device facts and every fused kernel checked against plain torch")
    add_device_options(parser.add_argument)
    add_model_options(parser.add_argument,
                      model_help="registry name: check at its head size, heads and position encoding (default: "
                                 "7B-class sizes, 32 heads x 128, RoPE and ALiBi)",
                      path_help="checkpoint directory (only its config.json is read)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per kernel for the speed column")
    parser.set_defaults(run=run)


def _shapes(args: argparse.Namespace):
    name, path = args.npuinfer_model, args.npuinfer_model_path
    if name is None and path is None:
        return "7B-class sizes", KernelShapes(dim=4096, heads=32, head_dim=128, rot_dim=128, intermediate=11008,
                                              rope=True, alibi=True)
    model_dir = resolve_model_dir(name, path) if name else Path(path)
    config = read_config(model_dir)
    config_path = str(model_dir / "config.json")
    model_args = args_from_config(config, detect_family(config, config_path), path=config_path)
    return f"{name or model_dir.name} ({config_path})", KernelShapes.from_args(model_args)


def _facts(device: Device) -> list[str]:
    """``label: value`` lines; a fact of several lines is indented under its label."""
    lines = []
    for label, fn in progress(DEVICE_FACTS, desc="doctor: device facts", unit="fact"):
        try:
            value = fn(device)
        except Exception as exc:
            value = f"unavailable: {type(exc).__name__}: {exc}"
        if isinstance(value, list):
            lines += [f"{label}:"] + [f"  {line}" for line in value]
        else:
            lines.append(f"{label}: {value}")
    return lines


def _speed(op: str, kernel, shapes, device: Device, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """Median ms of the fused and the plain kernel at a working size (128 new tokens over 1024 keys)."""
    t = 1 if op == "decode_attention" else 128
    _, call_args = next(cases(op, shapes, device.torch_device, dtype, b=1, t=t, s=1024))
    fused_s = plain_s = float("inf")
    with torch.inference_mode():
        for _ in range(2):  # interleaved: a drift of the machine hits both
            fused_s = min(fused_s, time_call(kernel.fn, call_args, device.synchronize, repeats))
            plain_s = min(plain_s, time_call(PLAIN[op].fn, call_args, device.synchronize, repeats))
    return fused_s * 1e3, plain_s * 1e3


def run(args: argparse.Namespace) -> int:
    device = get_device(args.npuinfer_device)
    dtype = parse_dtype(args.npuinfer_dtype) if args.npuinfer_dtype else (torch.float16 if device.is_accelerator else torch.float32)
    device.check_dtype(dtype)
    where, shapes = _shapes(args)
    facts = _facts(device)
    print("npuinfer doctor")
    for line in facts:
        print(f"  {line}")
    with progress(desc=f"doctor: checking the fused kernels on {device}", total=1):
        kernels = check_kernels(select_kernels(device.type, "fused"), shapes, device.torch_device, dtype,
                                raise_on_failure=False)
    print(f"\nkernels on {device}, {dtype_name(dtype)}, shapes of {where}: dim {shapes.dim}, "
          f"{shapes.heads} heads ({shapes.k_heads} K/V) x {shapes.head_dim}, rotary {shapes.rot_dim}, "
          f"mlp {shapes.intermediate}")
    header = f"  {'op':<18} {'implementation':<42} {'check vs plain':<36} {'fused ms':>9} {'plain ms':>9} {'speed-up':>8}"
    print(header)
    failed = []
    rows = []
    for op, kernel in progress(kernels.kernels.items(), desc="doctor: timing fused vs plain", unit="op"):
        results = [c for c in kernels.checks if c.op == op]
        if not shapes.uses(op):
            rows.append(f"  {op:<18} {kernel.label:<42} not used by this model")
            continue
        if not kernel.fused:
            rows.append(f"  {op:<18} {'plain torch (no fused op on ' + device.type + ')':<42} -")
            continue
        bad = [c for c in results if not c.ok]
        failed += bad
        worst_abs = max(c.max_abs for c in results)
        worst_rel = max(c.max_rel for c in results)
        verdict = f"{'FAILED' if bad else 'ok'} abs {worst_abs:.2g} rel {worst_rel:.2g} ({len(results)} cases)"
        if bad:
            speed = ""
        else:
            fused_ms, plain_ms = _speed(op, kernel, shapes, device, dtype, args.repeats)
            speed = f"{significant(fused_ms):>9} {significant(plain_ms):>9} {plain_ms / fused_ms:7.2f}x"
        rows.append(f"  {op:<18} {kernel.label:<42} {verdict:<36} {speed}".rstrip())
    print("\n".join(rows))
    if failed:
        print("\nfused kernel check FAILED:", file=sys.stderr)
        for c in failed:
            print(f"  {c.describe()}", file=sys.stderr)
        print("Run with --kernels plain to use the plain torch ops instead.", file=sys.stderr)
        return 1
    print("\nall fused kernels match plain torch (speed: median of interleaved runs; a shared machine is noisy)")
    return 0
