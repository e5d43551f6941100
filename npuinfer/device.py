"""The device layer: the only module that knows npu from cuda from cpu.

Everything else asks a `Device` to synchronize, report memory, seed, or name its
torch.distributed backend, so a timing or memory figure means the same thing on every
accelerator.
"""
from __future__ import annotations

import importlib
import os
import random
import re
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import psutil
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DIST_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}

# Defaults that Ascend bring-up guides set before torch_npu starts; a user's own value wins.
NPU_ENV_DEFAULTS = {"TASK_QUEUE_ENABLE": "1"}
NPU_ENV_IN_DOCKER = {"TASK_QUEUE_ENABLE": "0", "ATB_OPERATION_EXECUTE_ASYNC": "0"}

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|npu)(?::(\d+))?$")


class DeviceError(RuntimeError):
    """A device was asked for that this machine cannot provide."""


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _in_docker() -> bool:
    return os.path.exists("/.dockerenv")


@cache
def _import_torch_npu() -> tuple[object | None, str | None]:
    """Import torch_npu once; return (module, None) or (None, reason)."""
    env = NPU_ENV_IN_DOCKER if _in_docker() else NPU_ENV_DEFAULTS
    for key, value in env.items():
        os.environ.setdefault(key, value)
    try:
        module = importlib.import_module("torch_npu")
    except Exception as exc:  # ImportError, OSError from the CANN libraries, ...
        reason = f"{type(exc).__name__}: {exc}"
        if "static TLS block" in str(exc):
            reason += (
                "\nhint: preload libgomp before starting Python, e.g. "
                "export LD_PRELOAD=$(find / -name 'libgomp.so.1' 2>/dev/null | head -n 1):$LD_PRELOAD"
            )
        return None, reason
    return module, None


def npu_available() -> bool:
    module, _ = _import_torch_npu()
    return module is not None and torch.npu.is_available() and torch.npu.device_count() > 0  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Device:
    type: str  # "cpu" | "cuda" | "npu"
    index: int | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type if self.index is None else f"{self.type}:{self.index}")

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    @property
    def label(self) -> str:
        """File-name friendly name, e.g. ``npu0``."""
        return self.type if self.index is None else f"{self.type}{self.index}"

    @property
    def is_accelerator(self) -> bool:
        return self.type != "cpu"

    @property
    def _backend(self):
        return getattr(torch, self.type)

    def synchronize(self) -> None:
        if self.is_accelerator:
            self._backend.synchronize(self.torch_device)

    def set_current(self) -> None:
        if self.is_accelerator and self.index is not None:
            self._backend.set_device(self.index)

    def seed(self, seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)  # seeds cuda/npu generators too
        if self.is_accelerator:
            self._backend.manual_seed_all(seed)

    def empty_cache(self) -> None:
        if self.is_accelerator:
            self._backend.empty_cache()

    def reset_peak_memory(self) -> None:
        if self.is_accelerator:
            self._backend.reset_peak_memory_stats(self.torch_device)

    def peak_memory_bytes(self) -> int | None:
        """Peak bytes allocated by torch on the device since the last reset; None on cpu."""
        if not self.is_accelerator:
            return None
        return int(self._backend.max_memory_allocated(self.torch_device))

    def peak_reserved_bytes(self) -> int | None:
        """Peak bytes torch's caching allocator held on the device since the last reset (the allocated peak plus
        its cache and fragmentation: what the process took from the device); None on cpu."""
        if not self.is_accelerator:
            return None
        return int(self._backend.max_memory_reserved(self.torch_device))

    def total_memory_bytes(self) -> int | None:
        if not self.is_accelerator:
            return None
        return int(self._backend.get_device_properties(self.torch_device).total_memory)

    def free_memory_bytes(self) -> int | None:
        """Bytes free for new tensors now: on an accelerator the device's free memory plus what torch's caching
        allocator holds unused, on cpu the host's available memory (psutil: MemAvailable on Linux); None where
        unknown."""
        if not self.is_accelerator:
            return int(psutil.virtual_memory().available)
        mem_get_info = getattr(self._backend, "mem_get_info", None)
        if mem_get_info is None:
            return None
        free, _ = mem_get_info(self.torch_device)
        cached = self._backend.memory_reserved(self.torch_device) - self._backend.memory_allocated(self.torch_device)
        return int(free + max(0, cached))

    def is_out_of_memory(self, exc: BaseException) -> bool:
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        text = str(exc)
        return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "NPU out of memory" in text)

    @property
    def dist_backend(self) -> str:
        return DIST_BACKENDS[self.type]

    @property
    def collective_float_dtype(self) -> torch.dtype:
        """The widest float the backend's all-reduce takes (hccl has no float64)."""
        return torch.float32 if self.type == "npu" else torch.float64

    def profiler_activities(self) -> list:
        """torch.profiler activities that see this device's kernels (torch_npu ships its own profiler)."""
        from torch.profiler import ProfilerActivity

        return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.type == "cuda" else [])

    @property
    def profiler_sort_key(self) -> str:
        return "self_cuda_time_total" if self.type == "cuda" else "self_cpu_time_total"

    @property
    def builds_ahead_of_time(self) -> bool:
        """cpu captures the decode step with AOTInductor (``build_ahead_of_time``); cuda and npu with
        torch.compile (``compile``), whose CUDA/NPU graphs replay without Python in between anyway."""
        return self.type == "cpu"

    def compile(self, fn):
        """``fn`` (the static-shape decode step) captured for this accelerator: CUDA graphs through inductor's
        reduce-overhead mode on cuda, torchair's graph mode on npu."""
        if self.type == "cuda":
            return torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)
        if self.type == "npu":
            try:
                import torchair  # type: ignore[import-not-found]
            except ImportError as exc:
                raise DeviceError(f"--compile on npu needs torchair (shipped with torch_npu): {exc}") from exc
            return torch.compile(fn, backend=torchair.get_npu_backend(), fullgraph=True, dynamic=False)
        raise DeviceError(f"{self} builds its decode step ahead of time (build_ahead_of_time), not with compile")

    def build_ahead_of_time(self, program, package: Path):
        """An exported program built by AOTInductor into ``package`` and loaded: its ``boxed_run`` takes the
        inputs as a list. Weights are frozen in, so inductor prepacks them and generates its own GEMMs with
        the element-wise work fused in (on a 130M model faster than the same matmuls through aten)."""
        import torch._inductor
        import torch._inductor.config as inductor_config

        if not hasattr(torch._inductor, "aoti_load_package"):
            raise DeviceError(f"--compile on cpu needs AOTInductor packages (torch >= 2.6), this is {torch.__version__}")
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # inductor's own GEMM selection
        options = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                   # the GEMM choice is made quietly: no AUTOTUNE tables on stderr
                   "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
        options = {k: v for k, v in options.items() if hasattr(inductor_config, k)}  # an older torch lacks some
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(package), inductor_configs=options)
        try:  # one caller at a time: no runner pool or lock around each step
            return torch._inductor.aoti_load_package(path, run_single_threaded=True).loader
        except TypeError:  # torch 2.6 has no such option
            return torch._inductor.aoti_load_package(path).loader

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        if self.type == "cuda" and dtype == torch.bfloat16:
            # torch.cuda.is_bf16_supported() answers for the *current* device and counts pre-Ampere emulation
            return bool(torch.version.hip) or native_bf16(torch.cuda.get_device_capability(self.torch_device))
        return True

    def check_dtype(self, dtype: torch.dtype) -> None:
        if not self.supports_dtype(dtype):
            raise DeviceError(f"--dtype {dtype_name(dtype)} is not supported on {self}")

    def activity(self, since: float | None = None) -> dict[str, float | int]:
        """What the driver tells about this device now, for the noise guard (npuinfer.noise): ``util_pct``
        (all processes), ``other_processes`` and ``other_util_pct`` (others' share, where the driver attributes
        utilisation per process; ``since`` is the time.time() the interval began), ``temperature_c``,
        ``clock_mhz``. A figure the driver does not give is left out; {} on cpu."""
        if self.type == "cuda":
            return _cuda_activity(self.torch_device, since)
        if self.type == "npu":
            return _npu_activity(self.torch_device)
        return {}

    def name(self) -> str:
        """Human-readable hardware name for result tables."""
        if self.type == "cuda":
            return torch.cuda.get_device_name(self.torch_device)
        if self.type == "npu":
            return torch.npu.get_device_name(self.torch_device)  # type: ignore[attr-defined]
        return cpu_model_name()


def _cuda_activity(device: torch.device, since: float | None) -> dict[str, float | int]:
    """NVML through torch.cuda (needs pynvml); other processes' SM utilisation from NVML's per-process samples
    when this process's pid is among them (inside a container NVML reports host pids: then not attributed)."""
    out: dict[str, float | int] = {}
    for key, read in (("util_pct", "utilization"), ("temperature_c", "temperature"), ("clock_mhz", "clock_rate")):
        try:
            out[key] = float(getattr(torch.cuda, read)(device))
        except Exception:  # no pynvml, an older torch, a driver without the counter
            pass
    try:
        import pynvml  # type: ignore[import-not-found]

        handle = torch.cuda._get_pynvml_handler(device)  # maps CUDA_VISIBLE_DEVICES indices to NVML's
        pids = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    except Exception:
        return out
    own = os.getpid()
    out["other_processes"] = len(pids - {own}) if own in pids or not pids else len(pids) - 1
    if own in pids and since is not None:
        other = other_processes_util(pynvml, handle, own, since)
        if other is not None:
            out["other_util_pct"] = other
    return out


def other_processes_util(pynvml, handle, own: int, since: float) -> float | None:
    """Other processes' SM utilisation (%) from NVML's per-process samples since ``since`` (time.time()).
    Only NVML_ERROR_NOT_FOUND means "no samples in the interval" (0%); anything else, NOT_SUPPORTED (MIG,
    vGPU) or NO_PERMISSION included, means NVML gives no figure: None, never a quiet 0%."""
    try:
        samples = pynvml.nvmlDeviceGetProcessUtilization(handle, int(since * 1e6))
    except Exception as exc:
        if getattr(exc, "value", None) != getattr(pynvml, "NVML_ERROR_NOT_FOUND", NVML_ERROR_NOT_FOUND):
            return None
        samples = []
    per_pid: dict[int, list[int]] = {}
    for sample in samples:
        if sample.pid != own:
            per_pid.setdefault(sample.pid, []).append(sample.smUtil)
    return float(sum(sum(v) / len(v) for v in per_pid.values()))


NVML_ERROR_NOT_FOUND = 6  # nvml.h: the query found nothing (no samples in the interval)


def native_bf16(capability: tuple[int, int]) -> bool:
    """bf16 in hardware: compute capability 8.0 (Ampere) and later; older cards only emulate it, slowly."""
    return tuple(capability) >= (8, 0)


def _npu_activity(device: torch.device) -> dict[str, float | int]:
    """torch_npu gives the AI Core utilisation of all processes together (no per-process figure)."""
    try:
        return {"util_pct": float(torch.npu.utilization(device))}  # type: ignore[attr-defined]
    except Exception:
        return {}


@cache
def cpuinfo_field(name: str) -> str | None:
    """The first value of ``name`` in /proc/cpuinfo ("model name", "flags"); None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


@cache
def cpu_model_name() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Processor"), not just "x86_64": cpu baselines keep
    rows per CPU model, because the calibration workload and a model's forward scale differently across them."""
    import platform

    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def get_device(spec: str = "auto", local_rank: int | None = None) -> Device:
    """Parse ``auto | cpu | cuda[:N] | npu[:N]``; auto picks npu, then cuda, then cpu.

    ``local_rank`` (tensor parallel runs) offsets the index so rank r of a run given
    ``npu:2`` uses npu:(2+r).
    """
    match = _DEVICE_RE.match(spec.strip())
    if not match:
        raise ValueError(f"--device: expected auto, cpu, cuda[:N] or npu[:N], got {spec!r}")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        if npu_available():
            kind = "npu"
        elif torch.cuda.is_available():
            kind = "cuda"
        else:
            kind = "cpu"
    if kind == "cpu":
        return Device("cpu")
    if kind == "npu":
        module, reason = _import_torch_npu()
        if module is None:
            raise DeviceError(f"--device {spec}: torch_npu could not be imported: {reason}")
        count = torch.npu.device_count()  # type: ignore[attr-defined]
    else:
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: CUDA is not available in this torch build or on this machine")
        count = torch.cuda.device_count()
    base = int(index) if index is not None else 0
    chosen = base + (local_rank or 0)
    if chosen >= count:
        raise DeviceError(f"--device {spec}: {kind}:{chosen} requested but only {count} {kind} device(s) present")
    return Device(kind, chosen)
