"""npuinfer's own cpu kernels (C++ in csrc/), compiled on first use by torch's extension builder and cached.

One kernel so far: the W8A16 matrix-vector product of a few rows (csrc/w8a16_gemv.cpp; why: its header). It is
built where the processor has AVX-512F and a C++ compiler and ninja are found; the build takes about a minute
once, then the cached library loads in a fraction of a second (``$TORCH_EXTENSIONS_DIR``, default
~/.cache/torch_extensions: one folder per source content, flags and torch version, shared by every checkout).
Anywhere else, with ``$NPUINFER_CPU_KERNELS=0``, or when the build fails, ``load`` says why and the kernel tables
run torch's own ops instead (quant/kernels.py records the reason among the kernel notes). Nothing is compiled at
import.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path
from types import ModuleType

from ..atomic import write_atomic
from ..device import cpuinfo_field

DISABLE_ENV = "NPUINFER_CPU_KERNELS"
SOURCE = Path(__file__).with_name("csrc") / "w8a16_gemv.cpp"
NAME = "npuinfer_w8a16_gemv"
FLAGS = ["-O3", "-mavx512f", "-fopenmp"]  # the kernel splits its rows over OpenMP threads, as torch's cpu builds do


class Unavailable(RuntimeError):
    """npuinfer's cpu kernels cannot run here; the message says why."""


def why_not() -> str | None:
    """Why the kernels cannot be built here (None: they can be tried), without building anything."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"${DISABLE_ENV}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 processor ({platform.machine()})"
    if "avx512f" not in (cpuinfo_field("flags") or "").split():
        return "the processor has no AVX-512F (/proc/cpuinfo)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++, or $CXX) on PATH"
    if shutil.which("ninja") is None:
        return "ninja, which torch's extension builder runs, is not on PATH"
    return None


def _stable_source() -> tuple[Path, Path]:
    """(build folder, source copy) named by the source's content, the flags and torch's version: ninja rebuilds when
    a source's path changes, so every checkout of the same source shares one copy and one build."""
    import torch

    text = SOURCE.read_bytes()
    digest = hashlib.sha256(text + " ".join([*FLAGS, torch.__version__]).encode()).hexdigest()[:12]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    folder = root / f"{NAME}_{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / SOURCE.name
    if not copy.exists() or copy.read_bytes() != text:  # processes may race here: each writes whole
        write_atomic(copy, text)
    return folder, copy


@functools.lru_cache(maxsize=None)
def _build() -> ModuleType | str:
    reason = why_not()
    if reason is not None:
        return reason
    from torch.utils.cpp_extension import load as build

    try:
        folder, source = _stable_source()
        if not (folder / f"{NAME}.so").exists():
            print(f"npuinfer: building its cpu kernel {SOURCE.name} in {folder} (about a minute, once)",
                  file=sys.stderr)
        return build(name=NAME, sources=[str(source)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                     build_directory=str(folder), verbose=False)
    except Exception as exc:  # a compiler or linker error: torch's ops run instead, and the notes say why
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return f"the build failed: {first[:300]}"


def load() -> ModuleType:
    """The compiled kernels (built on the first call in a machine's life); Unavailable says why not."""
    built = _build()
    if isinstance(built, str):
        raise Unavailable(built)
    return built
